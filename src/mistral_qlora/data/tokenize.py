"""Conversations -> token ids and labels through a chat template (`templates.py`), with over-long
records truncated or dropped and counted.

`tokenize_batch` is the one entry point the data pipeline calls, on batches of conversations: the
template sends the text of the whole batch through the tokenizer at once and returns the batch as
one ragged array (ragged.py); `tokenize_conversations` is the same as a list of examples.
Labels are -100 on BOS and on everything but the assistant turns unless `train_on_prompt`, so the
loss falls on the answers (and their end tokens) only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from mistral_qlora.data.formats import Turn
from mistral_qlora.data.ragged import Ragged
from mistral_qlora.data.templates import IGNORE_INDEX, ChatTemplate, resolve_template

__all__ = ["IGNORE_INDEX", "TokenCounts", "TokenBatch", "tokenize_batch", "tokenize_conversations"]


@dataclass
class TokenCounts:
    records: int = 0
    truncated: int = 0
    dropped: int = 0
    lengths: list[int] = field(default_factory=list)  # of the kept examples, after truncation

    @property
    def kept(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


@dataclass
class TokenBatch:
    """The kept examples of a batch: their ids and labels (the same offsets), which were truncated."""

    ids: Ragged
    labels: Ragged
    truncated: np.ndarray  # bool, one per kept example

    def examples(self) -> list[dict]:
        return [{"input_ids": i, "labels": lab} for i, lab in zip(self.ids.lists(), self.labels.lists())]


def tokenize_batch(
    conversations: Sequence[Sequence[Turn]],
    tokenizer,
    max_seq_len: int,
    overlong: str = "truncate",
    train_on_prompt: bool = False,
    template: ChatTemplate | None = None,
) -> tuple[TokenBatch, TokenCounts]:
    """The kept examples of the conversations, in order, and the counts. A record longer than
    max_seq_len is dropped (`overlong=drop`) or cut to its first max_seq_len tokens, and then
    dropped too when no label is left after its first token (the prompt alone fills the budget).
    `template` is a resolved `ChatTemplate` (`resolve_template`); None resolves `auto` for `tokenizer`."""
    template = template or resolve_template("auto", tokenizer)
    ids, labels = template.encode_ragged(conversations, train_on_prompt)
    lengths = ids.lengths
    keep = np.ones(len(ids), dtype=bool)
    truncated = np.zeros(len(ids), dtype=bool)
    for i in np.flatnonzero(lengths > max_seq_len).tolist():  # few: a loop over them
        start = int(ids.offsets[i])
        if overlong == "drop" or np.all(labels.values[start + 1:start + max_seq_len] == IGNORE_INDEX):
            keep[i] = False
        else:
            truncated[i] = True
    stats = TokenCounts(records=len(ids), truncated=int(truncated.sum()), dropped=int((~keep).sum()))
    if stats.truncated or stats.dropped:
        rows = np.flatnonzero(keep)
        cut = np.minimum(lengths[rows], max_seq_len)
        ids, labels, lengths, truncated = ids.take(rows, cut), labels.take(rows, cut), cut, truncated[rows]
    stats.lengths = lengths.tolist()
    return TokenBatch(ids, labels, truncated), stats


def tokenize_conversations(
    conversations: Sequence[Sequence[Turn]],
    tokenizer,
    max_seq_len: int,
    overlong: str = "truncate",
    train_on_prompt: bool = False,
    template: ChatTemplate | None = None,
) -> tuple[list[dict], TokenCounts]:
    """`tokenize_batch` as examples {"input_ids", "labels"} (Python lists) and the counts."""
    batch, stats = tokenize_batch(conversations, tokenizer, max_seq_len, overlong, train_on_prompt, template)
    return batch.examples(), stats
