"""The sequences every recipe trains on, and each recipe's batches of them.

The sequences are those of a few packed rows: synthetic lognormal lengths by default
(synthetic.py), or a dataset file through the package's own data step. Rows are packed by
best-fit decreasing (data/packing.py) and shuffled as the Trainer's sampler would; the first
`warmup` rows warm up, the next `timed_rows` are timed. A packed recipe trains one row a step
(data/collator.py's PackedCollator); the padded recipe trains on exactly those rows' sequences in
random padded batches, so every recipe does the same useful work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mistral_qlora.config import DataSection
from mistral_qlora.data import build_data
from mistral_qlora.data.collator import PackedCollator, PaddedCollator
from mistral_qlora.data.packing import pack_best_fit_decreasing, packing_efficiency
from mistral_qlora.bench.synthetic import lognormal_lengths, token_examples
from mistral_qlora.errors import UserError
from mistral_qlora.model.attention import TAKES_CU_SEQLENS


@dataclass
class Sample:
    """The sequences every recipe trains on: warm-up rows, then timed rows."""

    examples: list[dict]
    warmup_rows: list[list[int]]
    timed_rows: list[list[int]]
    lengths_note: str
    efficiency: float

    def timed_lengths(self) -> list[int]:
        return [len(self.examples[i]["input_ids"]) for row in self.timed_rows for i in row]


def build_sample(opts, tokenizer, vocab_size: int) -> Sample:
    if opts.tokens_per_row < opts.max_len:
        raise UserError(f"--tokens-per-row ({opts.tokens_per_row}) must be >= --max-len ({opts.max_len})")
    if opts.data:
        cfg = DataSection(train=opts.data, eval_fraction=0.0, max_seq_len=opts.max_len,
                          tokens_per_row=opts.tokens_per_row)
        data = build_data(cfg, tokenizer, opts.seed)
        examples, rows = data.train, data.packed_rows
        lengths = data.train_stats.lengths
        note = f"{opts.data} ({len(examples)} sequences, max {opts.max_len} tokens)"
    else:
        lengths = lognormal_lengths(opts.sequences, opts.median, opts.sigma, opts.max_len, opts.min_len, opts.seed)
        examples = token_examples(lengths, vocab_size, opts.seed)
        rows = pack_best_fit_decreasing(lengths, opts.tokens_per_row, opts.seed)
        note = (f"lognormal, median {opts.median}, sigma {opts.sigma}, clipped to [{opts.min_len}, {opts.max_len}]"
                f" ({opts.sequences} drawn)")
    efficiency = packing_efficiency(lengths, rows, opts.tokens_per_row)
    order = list(range(len(rows)))
    random.Random(opts.seed).shuffle(order)  # as the Trainer's sampler would
    rows = [rows[i] for i in order]
    if len(rows) < opts.warmup + 1:
        raise UserError(f"only {len(rows)} rows of {opts.tokens_per_row} tokens in the data; "
                        f"need more than --warmup {opts.warmup} (lower --tokens-per-row or add --sequences)")
    timed = rows[opts.warmup:opts.warmup + opts.timed_rows]
    return Sample(examples, rows[:opts.warmup], timed, note, efficiency)


def recipe_batches(sample: Sample, recipe, opts, pad_token_id: int):
    """(warm-up batches, timed batches) of collated tensors for one recipe, over the same sequences."""
    ex = sample.examples
    if recipe.batching == "padded":
        collate = PaddedCollator(pad_token_id)
        rng = random.Random(opts.seed)

        def batches(rows):
            seqs = [i for row in rows for i in row]
            rng.shuffle(seqs)
            b = opts.padded_batch_size
            return [collate([ex[i] for i in seqs[k:k + b]]) for k in range(0, len(seqs), b)]
    else:
        collate = PackedCollator(with_cu_seqlens=recipe.attention in TAKES_CU_SEQLENS)

        def batches(rows):
            return [collate([[ex[i] for i in row]]) for row in rows]

    return batches(sample.warmup_rows), batches(sample.timed_rows)
