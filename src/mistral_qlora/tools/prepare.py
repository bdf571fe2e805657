"""`mistral-qlora prepare`: validate the data and describe it, writing nothing.

Runs the same data step as training (same tokenizer, same split, same packing), so what it
reports is what the run will see.
"""

from __future__ import annotations

import math

from mistral_qlora.config import RunConfig
from mistral_qlora.data import prepare_data
from mistral_qlora.data.tokenize import IGNORE_INDEX
from mistral_qlora.model.base import resolve_model_path
from mistral_qlora.model.tokenizer import load_tokenizer


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def length_histogram(lengths: list[int], bins: int = 8, width: int = 40) -> list[str]:
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    step = max(1, math.ceil((hi - lo + 1) / bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - lo) // step)] += 1
    top = max(counts)
    lines = []
    for b, c in enumerate(counts):
        start = lo + b * step
        if start > hi:
            break
        bar = "#" * max(1 if c else 0, round(width * c / top))
        lines.append(f"  {start:>6}-{start + step - 1:<6} {c:>6}  {bar}")
    return lines


def describe_data(cfg: RunConfig, world_size: int = 1) -> str:
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.revision)
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed, n_samples=0)
    ts, es = data.train_stats, data.eval_stats
    lengths = sorted(ts.lengths)
    answer_tokens = sum(sum(1 for label in ex["labels"][1:] if label != IGNORE_INDEX) for ex in data.train)
    lines = [
        f"data: {cfg.data.train}" + (f"  (eval: {cfg.data.eval})" if cfg.data.eval else
                                     f"  (eval: {cfg.data.eval_fraction:.0%} held out)"),
        f"chat template: {data.template.describe()}",
        f"records: {ts.records} train, {es.records} eval",
        f"kept: {ts.kept} train, {es.kept} eval; truncated: {ts.truncated + es.truncated}; "
        f"dropped: {ts.dropped + es.dropped} (data.max_seq_len={cfg.data.max_seq_len}, "
        f"data.overlong={cfg.data.overlong})",
        f"train tokens: {ts.tokens:,} ({answer_tokens:,} in the loss, "
        f"{'prompt and answer' if cfg.data.train_on_prompt else 'answers only'})",
        f"length: min {lengths[0]}, median {_percentile(lengths, 0.5)}, p90 {_percentile(lengths, 0.9)}, "
        f"p99 {_percentile(lengths, 0.99)}, max {lengths[-1]}, mean {ts.tokens / len(lengths):.1f}",
        "length distribution (tokens: records):",
        *length_histogram(lengths),
    ]
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    if data.packed_rows is not None:
        rows = len(data.packed_rows)
        lines += [
            f"packing: {rows} rows of {cfg.data.tokens_per_row} tokens per epoch, "
            f"efficiency {data.packing_efficiency:.1%} (real tokens / row slots)",
            f"steps per epoch: {math.ceil(rows / per_step)} ({per_step} rows per optimizer step)",
        ]
    else:
        padded = sum(
            max(lengths_batch) * len(lengths_batch)
            for lengths_batch in (ts.lengths[i:i + cfg.train.micro_batch_size]
                                  for i in range(0, len(ts.lengths), cfg.train.micro_batch_size))
        )
        lines += [
            f"padded batches of {cfg.train.micro_batch_size}: {ts.tokens / padded:.1%} of slots are real tokens",
            f"steps per epoch: {math.ceil(ts.kept / per_step)} ({per_step} records per optimizer step)",
        ]
    return "\n".join(lines)
