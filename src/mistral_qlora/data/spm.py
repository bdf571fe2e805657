"""SentencePiece's own encoder for the Mistral templates' text spans.

mistral-common, the reference of the Mistral templates (templates.py), encodes Mistral's v1 and
v3 text with SentencePiece on the checkpoint's `tokenizer.model`. transformers' tokenizer reaches
ids from its own conversion of the same model: for the v1 vocabulary the same ids, for the v3 one
not always (runs of spaces come out as other pieces), and in either case at well under
SentencePiece's speed, since it also builds offsets and per-token metadata that the templates
never read. So the Mistral templates tokenize with SentencePiece itself (`spm_encoder`) when the
tokenizer was loaded from a SentencePiece model file (its `vocab_file`) with exactly that file's
vocabulary: every id the same piece, and no tokens added beyond it (an added token is one id to
the tokenizer and several pieces to SentencePiece). Otherwise they tokenize with the tokenizer,
special-token strings read as text (`tokenizer_ids`).

Word by word. SentencePiece writes a space as U+2581 ("_" below) and puts one before the text.
When its model is BPE with the identity normalizer, keeps runs of spaces, and no piece has "_"
after any other character (`splits_at_words`, read from the model file: true of Mistral's v1 and
v3 models), no merge ever joins a character to a "_" after it. A text's pieces are then the
pieces of its words, one after another, where a word is a run of spaces and the characters up to
the next space ("_the", "__x"), or a run of spaces that ends the text (a "_" in the text itself is
a space to SentencePiece, so to the split too). Words repeat (a language has far fewer than a
corpus has words), so the encoder keeps each word's ids in a table and asks SentencePiece only for
words it has not seen; the ids are the same as SentencePiece's on the whole text, which the tests
check on hard text. A word "_"*k + w is encoded without its first
space, SentencePiece's own leading space making it k again; the one word that cannot be written
so, a single space ending a text, is encoded once from "a " less "a".

Threads: one per available core, or one where TOKENIZERS_PARALLELISM=false, the switch the fast
tokenizer honours too (the data pipeline sets it in its worker processes, which each tokenize
their own batches).
"""

from __future__ import annotations

import os
import re
from array import array
from itertools import chain, repeat
from pathlib import Path

import numpy as np

from mistral_qlora.data.ragged import Ragged, offsets_of, segments

SPACE = "\u2581"  # SentencePiece's escaped space
# a word: its leading run of spaces (a space, or "_" written as itself) and what follows up to the
# next; a run that ends the text is a word of its own
WORD = re.compile("[ \u2581]*[^ \u2581]+|[ \u2581]+")
CACHED_WORDS = 1 << 20  # words kept per encoder before the dict starts over (bounds its memory)


class SpmEncoder:
    """Batches of text -> ids with a SentencePiece model (no BOS/EOS added); word by word where
    the model allows it (module docstring).

    The seen words are a table: `_index` maps a word to its number, and word k's ids are
    `_pool[_starts[k]:_starts[k] + _lengths[k]]`, so a batch's ids are one numpy gather over its
    words' numbers (ragged.py) instead of a Python list per word."""

    def __init__(self, model_file: str, by_word: bool = False):
        self.model_file = model_file
        self.by_word = by_word
        self._processor = None
        self._forget()

    def _forget(self) -> None:
        self._index: dict[str, int] = {}
        self._pool = array("i")  # every seen word's ids, one word after another
        self._starts = array("q")
        self._lengths = array("q")

    def __getstate__(self):  # worker processes load the model themselves and keep their own words
        state = dict(self.__dict__, _processor=None)
        for k in ("_index", "_pool", "_starts", "_lengths"):
            state.pop(k)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._forget()

    @property
    def processor(self):
        if self._processor is None:
            import sentencepiece

            self._processor = sentencepiece.SentencePieceProcessor(model_file=self.model_file)
        return self._processor

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.encode_ragged(texts).lists()

    def encode_ragged(self, texts: list[str]) -> Ragged:
        if not self.by_word:
            return Ragged.from_lists(self.processor.encode(texts, num_threads=_threads()))
        if len(self._index) > CACHED_WORDS:
            self._forget()
        if not self._index:
            alone = self.processor.encode(["a", "a "])
            self._add([" ", SPACE], [alone[1][len(alone[0]):]] * 2)  # a single space ending a text
        per_text = [WORD.findall(" " + t) if t else [] for t in texts]
        words = list(chain.from_iterable(per_text))
        number = np.fromiter(map(self._index.get, words, repeat(-1)), dtype=np.int64, count=len(words))
        unseen = np.flatnonzero(number < 0).tolist()
        if unseen:
            new = list(dict.fromkeys(words[i] for i in unseen))  # each once, in order
            self._add(new, self.processor.encode([w[1:] for w in new], num_threads=_threads()))
            number[unseen] = [self._index[words[i]] for i in unseen]
        # views of the arrays, dropped at once: an array with a live view cannot grow
        lengths = np.frombuffer(self._lengths, dtype=np.int64)[number]
        ids = np.frombuffer(self._pool, dtype=np.int32)[segments(np.frombuffer(self._starts, dtype=np.int64)[number],
                                                                 lengths)]
        word_ends = offsets_of(np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text)))
        return Ragged(ids, offsets_of(lengths)[word_ends])

    def _add(self, words: list[str], ids: list[list[int]]) -> None:
        for w, piece_ids in zip(words, ids):
            self._index[w] = len(self._starts)
            self._starts.append(len(self._pool))
            self._lengths.append(len(piece_ids))
            self._pool.extend(piece_ids)


def _threads() -> int:
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("false", "0", "off", "no"):
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def splits_at_words(model_proto: bytes) -> bool:
    """Whether a text's pieces are its words' pieces (module docstring): a BPE model with the
    identity normalizer, a leading space added, spaces escaped and kept, and "_" in a piece only
    as a run at its start."""
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(model_proto)
    norm, trainer = m.normalizer_spec, m.trainer_spec
    if not (trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE and norm.name == "identity"
            and not norm.precompiled_charsmap and norm.add_dummy_prefix and norm.escape_whitespaces
            and not norm.remove_extra_whitespaces and not trainer.treat_whitespace_as_suffix):
        return False
    return all(SPACE not in p.piece.lstrip(SPACE) for p in m.pieces)


def tokenizer_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The tokenizer's ids for each text, special-token strings read as text, nothing added."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def spm_encoder(tokenizer) -> SpmEncoder | None:
    """SentencePiece on the tokenizer's own model file, where its vocabulary is exactly that
    file's (module docstring); else None."""
    model_file = getattr(tokenizer, "vocab_file", None)
    if not model_file or not str(model_file).endswith(".model") or not Path(model_file).is_file():
        return None
    encoder = SpmEncoder(str(model_file))
    try:
        sp = encoder.processor
        n = sp.get_piece_size()
        if len(tokenizer) != n:
            return None
        if tokenizer.convert_ids_to_tokens(list(range(n))) != [sp.id_to_piece(i) for i in range(n)]:
            return None
        encoder.by_word = splits_at_words(sp.serialized_model_proto())
    except Exception:  # a file SentencePiece does not read: the tokenizer encodes
        return None
    return encoder
