"""The data step of a run: files -> validated conversations -> tokens -> train/eval sets.

Everything here runs before anything is written, so a bad record stops the run with nothing
half-done. `prepare_data` is what `train` and `prepare` both call.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mistral_qlora.config import DataSection
from mistral_qlora.data.collator import PackedCollator, PackedRows, PaddedCollator
from mistral_qlora.data.formats import Conversation, records_to_conversations
from mistral_qlora.data.load import read_records
from mistral_qlora.data.packing import pack_best_fit_decreasing, packing_efficiency
from mistral_qlora.data.templates import ChatTemplate, resolve_template
from mistral_qlora.data.tokenize import TokenizeStats, tokenize_conversations
from mistral_qlora.errors import UserError


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    train_stats: TokenizeStats
    eval_stats: TokenizeStats
    sample_prompts: list[Conversation]  # held-out first turns (system + prompt), for samples.md
    packed_rows: list[list[int]] | None  # rows of train example indices, when packing
    tokens_per_row: int
    template: ChatTemplate  # what tokenized the data, and renders the prompts of samples

    @property
    def packing_efficiency(self) -> float | None:
        if self.packed_rows is None:
            return None
        return packing_efficiency(self.train_stats.lengths, self.packed_rows, self.tokens_per_row)

    def train_dataset(self):
        return PackedRows(self.train, self.packed_rows) if self.packed_rows is not None else self.train

    def eval_dataset(self, micro_batch_size: int = 1, seed: int = 0):
        """The eval set as the Trainer iterates it, one item per forward: with packing, rows of
        micro_batch_size * tokens_per_row tokens (what one training micro-step holds); else records."""
        if not self.eval:
            return None
        if self.packed_rows is None:
            return self.eval
        rows = pack_best_fit_decreasing(self.eval_stats.lengths, self.tokens_per_row * micro_batch_size, seed)
        return PackedRows(self.eval, rows)

    def collator(self, pad_token_id: int, with_cu_seqlens: bool = False):
        if self.packed_rows is not None:
            return PackedCollator(with_cu_seqlens=with_cu_seqlens)
        return PaddedCollator(pad_token_id)


def _load_conversations(path: str, form: str) -> list[Conversation]:
    return records_to_conversations(read_records(path), form, path)


def prepare_data(cfg: DataSection, tokenizer, seed: int, n_samples: int = 0) -> PreparedData:
    template = resolve_template(cfg.template, tokenizer)
    train_convs = _load_conversations(cfg.train, cfg.format)
    if cfg.eval:
        eval_convs = _load_conversations(cfg.eval, cfg.format)
    elif cfg.eval_fraction > 0 and len(train_convs) > 1:
        order = list(range(len(train_convs)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * cfg.eval_fraction))
        eval_convs = [train_convs[i] for i in sorted(order[:n_eval])]
        train_convs = [train_convs[i] for i in sorted(order[n_eval:])]
    else:
        eval_convs = []

    def tok(convs):
        return tokenize_conversations(convs, tokenizer, cfg.max_seq_len, cfg.overlong, cfg.train_on_prompt,
                                      template)

    train, train_stats = tok(train_convs)
    eval_, eval_stats = tok(eval_convs)
    if not train:
        raise UserError(
            f"{cfg.train}: every one of {train_stats.records} training records is longer than "
            f"data.max_seq_len={cfg.max_seq_len} tokens and was dropped; raise data.max_seq_len "
            "or set data.overlong=truncate"
        )
    rows = None
    if cfg.packing:
        if cfg.tokens_per_row < cfg.max_seq_len:
            raise UserError(
                f"data.tokens_per_row ({cfg.tokens_per_row}) must be >= data.max_seq_len ({cfg.max_seq_len}) "
                "so every sequence fits in a row"
            )
        rows = pack_best_fit_decreasing(train_stats.lengths, cfg.tokens_per_row, seed)
    prompts = [Conversation(conv[:1], getattr(conv, "system", "")) for conv in eval_convs[:n_samples]]
    return PreparedData(train, eval_, train_stats, eval_stats, prompts, rows, cfg.tokens_per_row, template)
