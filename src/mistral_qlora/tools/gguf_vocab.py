"""The vocabulary a GGUF file carries, read from the checkpoint the run trained with, in the two
forms llama.cpp's `llama` architecture tokenizes:

- `llama` (SentencePiece): the pieces, scores and token types of a `tokenizer.model` (Mistral v1
  and v3, Llama-2), as llama.cpp's converter reads them;
- `gpt2` (byte-level BPE): the tokens and merges of a `tokenizer.json` (SmolLM, Llama-3 and other
  GPT-2-style vocabularies), with the token types (control for special added tokens,
  user-defined for the other added ones) and `tokenizer.ggml.pre`, the name llama.cpp knows the
  pre-tokenizer's split rules by. The name is read from the pre-tokenizer the file declares (see
  `PRE_TOKENIZERS`), so llama.cpp splits text the way transformers does; a pre-tokenizer llama.cpp
  has no name for is refused, since its tokenization would silently differ;
- Tekken (`tekken.json`, Mistral-Nemo and later): byte-level BPE too (`gpt2`, pre-tokenizer
  `tekken`), as llama.cpp's converter writes it: the special tokens first (control tokens, by
  their names), then each byte piece by rank in GPT-2's byte-to-character form, and the merges
  tiktoken's ranks imply (`tekken_merges`). A tekken.json whose split pattern is not the one
  llama.cpp's `tekken` pre-tokenizer implements is refused.

Each is padded with unused `[PADn]` tokens up to the model's embedding rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mistral_qlora.errors import UserError

# Token types as llama.cpp's vocabulary reads them (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Llama-3's split rule (case-insensitive contractions, words, digits in threes, punctuation, spaces),
# as its tokenizer.json Split pre-tokenizer writes it.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_shape(pre: dict | None) -> tuple:
    """A tokenizer.json pre-tokenizer reduced to what decides the split: each step's kind and
    the settings that change where text is cut."""
    if pre is None:
        return ()
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    shape = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            shape.append(("ByteLevel", bool(step.get("use_regex", True)), bool(step.get("add_prefix_space", False))))
        elif kind == "Digits":
            shape.append(("Digits", bool(step.get("individual_digits", False))))
        elif kind == "Split":
            pattern = step.get("pattern", {})
            shape.append(("Split", pattern.get("Regex", pattern.get("String")), step.get("behavior")))
        else:
            shape.append((kind,))
    return tuple(shape)


# tokenizer.json pre-tokenizer (as _pre_shape reduces it) -> llama.cpp's name for the same split
PRE_TOKENIZERS = {
    (("ByteLevel", True, False),): "gpt-2",
    (("Digits", True), ("ByteLevel", True, False)): "smollm",
    (("Split", _LLAMA3_SPLIT, "Isolated"), ("ByteLevel", False, False)): "llama-bpe",
}


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pieces: list[bytes]
    types: list[int]
    bos: int | None
    eos: int | None
    unk: int | None = None
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    pre: str = "default"
    add_bos: bool = True
    pad: int | None = None


def _pad(vocab: Vocab, size: int, source) -> Vocab:
    n = len(vocab.pieces)
    if n > size:
        raise UserError(f"{source}: {n} tokens, more than the model's {size} embedding rows")
    vocab.pieces += [f"[PAD{i}]".encode() for i in range(n, size)]
    vocab.types += [UNUSED] * (size - n)
    if vocab.scores is not None:
        vocab.scores += [-1000.0] * (size - n)
    return vocab


def read_sentencepiece(model_file: Path, vocab_size: int) -> Vocab:
    """The vocabulary of a SentencePiece model file, as llama.cpp's converter reads it."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(model_file))
    pieces, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        pieces.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i)
                     else UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    vocab = Vocab("llama", pieces, types, bos=sp.bos_id(), eos=sp.eos_id(), unk=sp.unk_id(), scores=scores)
    return _pad(vocab, vocab_size, model_file)


def read_bpe(tokenizer_json: Path, tokenizer, vocab_size: int) -> Vocab:
    """A byte-level BPE vocabulary from tokenizer.json; `tokenizer` (the transformers tokenizer
    of the same folder) says which tokens are BOS/EOS and whether a BOS opens every text."""
    spec = json.loads(Path(tokenizer_json).read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "a SentencePiece-style BPE (byte_fallback)" if model.get("byte_fallback") else model.get("type")
        raise UserError(f"{tokenizer_json}: a {kind} vocabulary; GGUF export takes a SentencePiece tokenizer.model "
                        "or a byte-level BPE tokenizer.json")
    shape = _pre_shape(spec.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(shape)
    if pre is None:
        raise UserError(f"{tokenizer_json}: pre-tokenizer {shape} has no llama.cpp equivalent here (known: "
                        f"{', '.join(PRE_TOKENIZERS.values())}); llama.cpp would split text differently")
    ids = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for t in added.values():
        ids[t["content"]] = t["id"]
    size = max(ids.values()) + 1
    if size > vocab_size:
        raise UserError(f"{tokenizer_json}: {size} tokens, more than the model's {vocab_size} embedding rows")
    by_id: dict[int, str] = {i: tok for tok, i in ids.items()}
    pieces, types = [], []
    for i in range(size):
        if i not in by_id:
            pieces.append(f"[PAD{i}]".encode())
            types.append(UNUSED)
            continue
        pieces.append(by_id[i].encode("utf-8"))
        types.append((CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    vocab = Vocab("gpt2", pieces, types, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                  unk=tokenizer.unk_token_id, merges=merges, pre=pre, add_bos=add_bos)
    return _pad(vocab, vocab_size, tokenizer_json)


# The split rule of Mistral-Nemo's tekken.json: the one llama.cpp's `tekken` pre-tokenizer implements.
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                  r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> character map of byte-level BPE vocabularies: printable Latin-1 bytes
    stand for themselves, the other bytes for the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in kept}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return chars


def tekken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges tiktoken's ranks imply: every split of each multi-byte piece into two pieces
    of the vocabulary, ordered by the rank of the piece they make (then by their own ranks).
    tiktoken merges the adjacent pair whose joined piece ranks lowest; a BPE that applies merges
    in this order makes the same choices."""
    merges = []
    for piece, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(piece[:j], piece[j:]) for j in range(1, len(piece)) if piece[:j] in ranks and piece[j:] in ranks]
        if len(piece) > 1 and not splits:
            raise UserError(f"tekken.json: piece of rank {rank} cannot be made from two others; not a BPE vocabulary")
        merges += sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
    return merges


def read_tekken(tekken_json: Path, vocab_size: int, tekkenizer=None) -> Vocab:
    """A Tekken vocabulary as llama.cpp's converter writes it (see the module docstring);
    `tekkenizer`: mistral-common's Tekkenizer already loaded from that file, if there is one."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    tek = tekkenizer if isinstance(tekkenizer, Tekkenizer) else Tekkenizer.from_file(str(tekken_json))
    pattern = json.loads(Path(tekken_json).read_text()).get("config", {}).get("pattern")
    if pattern != TEKKEN_PATTERN:
        raise UserError(f"{tekken_json}: its split pattern is not Mistral-Nemo's, the only Tekken pre-tokenizer "
                        "llama.cpp implements; llama.cpp would split text differently, so it cannot be exported to GGUF")
    chars = byte_chars()

    def text(piece: bytes) -> bytes:
        return "".join(chars[b] for b in piece).encode("utf-8")

    ranks = tek._model._mergeable_ranks  # byte piece -> rank (id = rank + num_special_tokens)
    by_rank = sorted(ranks, key=ranks.__getitem__)
    specials = tek.num_special_tokens
    pieces = [tek.id_to_piece(i).encode("utf-8") for i in range(specials)] + [text(p) for p in by_rank]
    types = [CONTROL] * specials + [NORMAL] * len(by_rank)
    merges = [f"{text(a).decode()} {text(b).decode()}" for a, b in tekken_merges(ranks)]
    vocab = Vocab("gpt2", pieces, types, bos=tek.bos_id, eos=tek.eos_id, unk=tek.unk_id, merges=merges, pre="tekken",
                  add_bos=True, pad=tek.pad_id if tek.pad_id >= 0 else None)
    return _pad(vocab, vocab_size, tekken_json)


def header_bytes(vocab: Vocab) -> int:
    """About what the vocabulary adds to the file's header."""
    return sum(len(p) + 8 + 4 + 4 for p in vocab.pieces) + sum(len(m) + 8 for m in vocab.merges)


def write_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.pieces)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.bos is not None:
        writer.add_bos_token_id(vocab.bos)
    if vocab.eos is not None:
        writer.add_eos_token_id(vocab.eos)
    if vocab.unk is not None:
        writer.add_unk_token_id(vocab.unk)
    if vocab.pad is not None:
        writer.add_pad_token_id(vocab.pad)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
