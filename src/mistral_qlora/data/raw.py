"""Raw documents (`data.format: raw`) -> token ids and labels for continued pretraining.

A raw record is one document: its `text` column, or a whole `.txt` file. It is no conversation,
so no chat template applies: its ids are BOS, the text's ids, EOS (the tokenizer's own BOS and
EOS), and every one of them is a target except the first (BOS is never predicted from anything).
The text is tokenized as the Mistral templates tokenize their text spans: with SentencePiece on
the tokenizer's own model file where that gives the tokenizer's ids exactly (spm.py), else with
the tokenizer, special-token strings read as text.

A document longer than data.max_seq_len:
- `split` (the default for raw records, `data.overlong: auto`): cut into consecutive chunks of
  max_seq_len tokens, the last one shorter; each chunk is a record of its own for packing and
  mixing, and the chunks one after another are the document's ids, no token left out. The first
  token of each chunk is not a target (nothing before it in its row), as for any record;
- `truncate`: its first max_seq_len tokens;
- `drop`: left out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mistral_qlora.data.ragged import ID, Ragged, offsets_of, segments
from mistral_qlora.data.spm import spm_encoder, tokenizer_ids
from mistral_qlora.data.tokenize import IGNORE_INDEX, TokenBatch, TokenCounts
from mistral_qlora.errors import UserError

CHAT_OVERLONG = "truncate"  # what `data.overlong: auto` means for chat records


def overlong_for(form: str, setting: str, source: str) -> str:
    """What data.overlong means for a source of this form: `auto` is `split` for raw documents,
    `truncate` for chat records; `split` is refused for chat records, whose chunks would start in
    the middle of a conversation with no prompt before their answers."""
    if setting == "auto":
        return "split" if form == "raw" else CHAT_OVERLONG
    if setting == "split" and form != "raw":
        raise UserError(f"{source}: data.overlong=split cuts raw documents into chunks; this source's records are "
                        f"{form} conversations, which cannot be split; set data.overlong to auto (split raw "
                        "sources, truncate the others), truncate or drop")
    return setting


class RawEncoder:
    """Documents -> (ids, labels) as ragged batches: BOS + text + EOS, every token a target but the first."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.encoder = spm_encoder(tokenizer)
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def text_ids(self, texts: list[str]) -> Ragged:
        if self.encoder is not None:
            return self.encoder.encode_ragged(texts)
        return Ragged.from_lists(tokenizer_ids(self.tokenizer, texts))

    def encode_ragged(self, texts: Sequence[str]) -> Ragged:
        """Each document's ids: BOS (where the tokenizer has one), the text's ids, EOS (likewise)."""
        body = self.text_ids(list(texts))
        ends = [t for t in (self.bos, self.eos) if t is not None]
        if not ends:
            return body
        head = 1 if self.bos is not None else 0
        tail = 1 if self.eos is not None else 0
        lengths = body.lengths + head + tail
        offsets = offsets_of(lengths)
        ids = np.empty(int(offsets[-1]), dtype=ID)
        # the body's values into each document's range after its BOS, one gather
        inner = segments(offsets[:-1] + head, body.lengths)
        ids[inner] = body.values
        if head:
            ids[offsets[:-1]] = self.bos
        if tail:
            ids[offsets[1:] - 1] = self.eos
        return Ragged(ids, offsets)


def chunk_ragged(docs: Ragged, size: int) -> tuple[Ragged, np.ndarray]:
    """Every document cut into consecutive chunks of `size` values (the last one shorter): the
    chunks in order, and which document each came from."""
    lengths = docs.lengths
    per_doc = np.maximum(1, -(-lengths // size))  # chunks of each document (an empty one stays one)
    doc_of_chunk = np.repeat(np.arange(len(docs), dtype=np.int64), per_doc)
    first_chunk = offsets_of(per_doc)[:-1]
    k = np.arange(len(doc_of_chunk), dtype=np.int64) - np.repeat(first_chunk, per_doc)  # chunk number in its doc
    starts = k * size
    chunk_lengths = np.minimum(size, lengths[doc_of_chunk] - starts)
    return Ragged(docs.values[segments(docs.offsets[doc_of_chunk] + starts, chunk_lengths)],
                  offsets_of(chunk_lengths)), doc_of_chunk


def tokenize_raw(texts: Sequence[str], encoder: RawEncoder, max_seq_len: int, overlong: str
                 ) -> tuple[TokenBatch, TokenCounts]:
    """The documents as records of at most max_seq_len tokens (module docstring) and the counts:
    `records` counts documents, `lengths` the records made of them (chunks when split);
    `truncated` marks the documents cut short (never with `split`, which loses no token)."""
    ids = encoder.encode_ragged(texts)
    lengths = ids.lengths
    over = lengths > max_seq_len
    truncated = np.zeros(len(ids), dtype=bool)
    dropped = 0
    if over.any():
        if overlong == "split":
            ids, _ = chunk_ragged(ids, max_seq_len)
            truncated = np.zeros(len(ids), dtype=bool)
        elif overlong == "drop":
            keep = np.flatnonzero(~over)
            dropped = int(over.sum())
            ids = ids.take(keep)
            truncated = truncated[keep]
        else:
            ids = ids.take(np.arange(len(ids)), np.minimum(lengths, max_seq_len))
            truncated = over
    labels = ids.values.copy()
    firsts = ids.offsets[:-1][ids.lengths > 0]
    labels[firsts] = IGNORE_INDEX
    stats = TokenCounts(records=len(texts), truncated=int(truncated.sum()), dropped=dropped,
                        lengths=ids.lengths.tolist())
    return TokenBatch(ids, Ragged(labels, ids.offsets), truncated), stats
