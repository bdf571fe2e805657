"""Conversations -> token ids and labels through a chat template (`templates.py`), with over-long
records truncated or dropped and counted.

`tokenize_conversations` is the one entry point the data pipeline calls, on batches of
conversations: the template sends the text of the whole batch through the tokenizer at once.
Labels are -100 on BOS and on everything but the assistant turns unless `train_on_prompt`, so the
loss falls on the answers (and their end tokens) only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from mistral_qlora.data.formats import Turn
from mistral_qlora.data.templates import IGNORE_INDEX, ChatTemplate, resolve_template

__all__ = ["IGNORE_INDEX", "TokenizeStats", "tokenize_conversations"]


@dataclass
class TokenizeStats:
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


def tokenize_conversations(
    conversations: Sequence[Sequence[Turn]],
    tokenizer,
    max_seq_len: int,
    overlong: str = "truncate",
    train_on_prompt: bool = False,
    template: ChatTemplate | None = None,
) -> tuple[list[dict], TokenizeStats]:
    """Examples {"input_ids", "labels"} of the conversations that are kept, and the counts.
    `template` is a resolved `ChatTemplate` (`resolve_template`); None resolves `auto` for `tokenizer`."""
    template = template or resolve_template("auto", tokenizer)
    stats = TokenizeStats(records=len(conversations))
    examples = []
    for ids, labels in template.encode(conversations, train_on_prompt):
        if len(ids) > max_seq_len:
            if overlong == "drop":
                stats.dropped += 1
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                stats.dropped += 1  # the prompt alone fills the budget: nothing left to learn from
                continue
            stats.truncated += 1
        stats.lengths.append(len(ids))
        examples.append({"input_ids": ids, "labels": labels})
    return examples, stats
