"""Conversations -> token ids and labels, in the Mistral v1 instruct template.

`<s>[INST] q1 [/INST] a1</s>[INST] q2 [/INST] a2</s>`, tokenized span by span exactly as
mistral-common's v1 encoder does (each span with SentencePiece's leading space). Labels are -100
on BOS and on the `[INST] ... [/INST]` spans unless `train_on_prompt`, so the loss falls on the
answers (and their EOS) only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mistral_qlora.data.formats import Turn

IGNORE_INDEX = -100


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


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_conversations(
    conversations: list[list[Turn]],
    tokenizer,
    max_seq_len: int,
    overlong: str = "truncate",
    train_on_prompt: bool = False,
) -> tuple[list[dict], TokenizeStats]:
    prompts = [f"[INST] {p} [/INST]" for conv in conversations for p, _ in conv]
    answers = [a for conv in conversations for _, a in conv]
    prompt_ids = iter(_encode_many(tokenizer, prompts))
    answer_ids = iter(_encode_many(tokenizer, answers))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    stats = TokenizeStats(records=len(conversations))
    examples = []
    for conv in conversations:
        ids, labels = [bos], [IGNORE_INDEX]
        for _ in conv:
            p, a = next(prompt_ids), next(answer_ids) + [eos]
            ids += p + a
            labels += (p if train_on_prompt else [IGNORE_INDEX] * len(p)) + a
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
