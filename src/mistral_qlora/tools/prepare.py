"""`mistral-qlora prepare`: validate the data and describe it.

Runs the same data step as training (same tokenizer, same split, same mix, same packing), so what
it reports is what the run will see. Preference pairs get their own report (`describe_pairs`). It writes nothing but what that step writes: the token cache
(data.cache_dir), which the run then reads instead of tokenizing again.
"""

from __future__ import annotations

import math

from mistral_qlora.config import RunConfig
from mistral_qlora.data import build_data
from mistral_qlora.data.dataset import source_lines
from mistral_qlora.data.preference import drop_reason
from mistral_qlora.model.base import load_model_config, resolve_model_path
from mistral_qlora.model.tokenizer import load_tokenizer
from mistral_qlora.plan.context import check_max_seq_len, longest_row
from mistral_qlora.runtime import GIB


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


def _length_line(what: str, values) -> str:
    v = sorted(int(x) for x in values)
    if not v:
        return f"{what}: none"
    return (f"{what}: min {v[0]}, median {_percentile(v, 0.5)}, p90 {_percentile(v, 0.9)}, max {v[-1]}, "
            f"mean {sum(v) / len(v):.1f}")


def describe_pairs(cfg: RunConfig, data, world_size: int = 1) -> str:
    """What `prepare` prints for preference data: pairs read, kept and dropped (and why), the
    prompt and answer lengths, the cuts, and how the pairs pack into rows."""
    ts, es = data.train_stats, data.eval_stats
    train, evals = data.pair_stats["train"], data.pair_stats["eval"]
    overlong = "truncate" if cfg.data.overlong == "auto" else cfg.data.overlong
    dropped = ts.dropped + es.dropped
    lengths = sorted(ts.lengths)
    prompt_limit = cfg.data.max_prompt_len if cfg.data.max_prompt_len is not None else "null"
    train_text = cfg.data.train if isinstance(cfg.data.train, str) else f"{len(cfg.data.train)} sources"
    eval_text = (cfg.data.eval if isinstance(cfg.data.eval, str) else f"{len(cfg.data.eval)} sources") \
        if cfg.data.eval else f"{cfg.data.eval_fraction:.0%} held out"
    lines = [
        f"preference data: {train_text}  (eval: {eval_text})",
        f"chat template: {data.template.describe()}",
        *(f"warning: {w}" for w in data.template.warnings),
        *source_lines(data.sources, cfg.data.mix),
        f"pairs read: {ts.records} train, {es.records} eval",
        f"pairs kept: {ts.kept} train, {es.kept} eval; dropped: {dropped}"
        + (f" ({drop_reason(overlong)})" if dropped else ""),
        f"truncated (data.max_prompt_len={prompt_limit}, data.max_seq_len={cfg.data.max_seq_len}, "
        f"data.tokens_per_row={cfg.data.tokens_per_row}, data.overlong={cfg.data.overlong}): "
        f"prompt cut from the left in {train.get('prompt_truncated', 0) + evals.get('prompt_truncated', 0)} pairs, "
        f"answers cut from the right in {train.get('answer_truncated', 0) + evals.get('answer_truncated', 0)} pairs",
        f"train tokens: {ts.tokens:,} (chosen and rejected sequences; {data.answer_tokens():,} answer tokens in the loss)",
    ]
    if train["pairs"]:
        lines += [_length_line("prompt length", train["prompt_len"]),
                  _length_line("chosen answer length", train["chosen_len"]),
                  _length_line("rejected answer length", train["rejected_len"]),
                  _length_line("pair length (both sequences)", lengths),
                  "pair length distribution (tokens: pairs):", *length_histogram(lengths)]
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    rows = len(data.packed_rows)
    how = "whole pairs packed" if cfg.data.packing else "one pair a row (data.packing=false)"
    lines += [f"packing: {rows} rows of {cfg.data.tokens_per_row} tokens per epoch, {how}, "
              f"efficiency {data.packing_efficiency:.1%} (real tokens / row slots)",
              f"steps per epoch: {math.ceil(rows / per_step)} ({per_step} rows per optimizer step)"]
    return "\n".join(lines)


def fit_line(cfg: RunConfig, model_config, lengths: list[int], budget: int | None, dtype_bytes: int,
             kernels: str) -> str:
    """How many records are longer than the longest row the plan fits in `budget` bytes of one GPU
    (plan/context.py: recompute and offload as `auto` would choose them), in one line; without a
    GPU it cannot tell, and says so."""
    if budget is None:
        return ("records longer than the GPU fits: cannot tell without a GPU here (it depends on the card's memory; "
                "run prepare where the run will train)")
    fits = longest_row(cfg, model_config, dtype_bytes, kernels, budget)
    over = sum(1 for n in lengths if n > fits)
    row = (f"; data.tokens_per_row={cfg.data.tokens_per_row} is longer too" if cfg.data.packing
           and cfg.data.tokens_per_row > fits else "")
    return (f"records longer than this GPU fits ({fits:,} tokens a row in {budget / GIB:.1f} GiB usable, as the "
            f"plan would recompute and offload): {over} of {len(lengths)}{row}")


def _fit_here(cfg: RunConfig, model_config, lengths: list[int]) -> str:
    """`fit_line` for this machine's GPU, the dtype and kernels the run would take."""
    from mistral_qlora.plan.backends import select_kernels
    from mistral_qlora.runtime import gpu_budget, resolve_dtype

    budget = gpu_budget()
    kernels = select_kernels(cfg.model.kernels) if budget is not None else "none"
    return fit_line(cfg, model_config, lengths, budget, resolve_dtype(cfg.model.dtype).itemsize, kernels)


def describe_data(cfg: RunConfig, world_size: int = 1) -> str:
    model_path = resolve_model_path(cfg.model.name_or_path)
    model_config = load_model_config(model_path, cfg.model)
    check_max_seq_len(cfg, model_config)
    tokenizer = load_tokenizer(model_path, cfg.model.revision)
    data = build_data(cfg.data, tokenizer, cfg.train.seed, n_samples=0)
    if data.preference:
        return describe_pairs(cfg, data, world_size)
    stream_rows = None
    if data.stream is not None:  # one pass over the stream: what the mix draws and how it packs
        data.train_stats, per_source, stream_rows = data.stream.scan()
        for s, (draws, kept, tokens, truncated), size in zip(data.sources, per_source, data.stream.source_sizes):
            # a source the pass found empty has `size` records, drawn `draws` times; another was read as far
            # as the pass drew it, no record twice. Kept, tokens and truncations count draws here.
            records = draws if size is None else size
            s.records, s.kept, s.tokens, s.truncated, s.dropped = records, kept, tokens, truncated, max(0, draws - kept)
            s.drawn, s.drawn_records, s.drawn_tokens, s.counted = draws, records, tokens, True
    ts, es = data.train_stats, data.eval_stats
    lengths = sorted(ts.lengths)
    answer_tokens = data.answer_tokens()
    loss_on = "prompt and answer" if cfg.data.train_on_prompt else "answers only"
    forms = {s.form for s in data.sources}
    if forms == {"raw"}:
        loss_on = "every token of the raw documents"
    elif "raw" in forms:
        loss_on = f"{loss_on} of chat records, every token of raw documents"
    train_text = cfg.data.train if isinstance(cfg.data.train, str) else f"{len(cfg.data.train)} sources"
    eval_text = (cfg.data.eval if isinstance(cfg.data.eval, str) else f"{len(cfg.data.eval)} sources") \
        if cfg.data.eval else f"{cfg.data.eval_fraction:.0%} held out"
    lines = [
        f"data: {train_text}  (eval: {eval_text})" + ("  [streaming]" if cfg.data.streaming else ""),
        f"chat template: {data.template.describe()}",
        *(f"warning: {w}" for w in data.template.warnings),
        *source_lines(data.sources, cfg.data.mix),
        f"records: {ts.records} train, {es.records} eval",
        f"kept: {ts.kept} train, {es.kept} eval; truncated: {ts.truncated + es.truncated}; "
        f"dropped: {ts.dropped + es.dropped} (data.max_seq_len={cfg.data.max_seq_len}, "
        f"data.overlong={cfg.data.overlong})",
        f"train tokens: {ts.tokens:,} ("
        + (f"{answer_tokens:,} in the loss, " if data.stream is None else "")
        + f"{loss_on})",
        f"length: min {lengths[0]}, median {_percentile(lengths, 0.5)}, p90 {_percentile(lengths, 0.9)}, "
        f"p99 {_percentile(lengths, 0.99)}, max {lengths[-1]}, mean {ts.tokens / len(lengths):.1f}",
        "length distribution (tokens: records):",
        *length_histogram(lengths),
        _fit_here(cfg, model_config, lengths),
    ]
    if stream_rows is not None:
        lines.append(f"streaming: {stream_rows:,} rows of {cfg.data.tokens_per_row} tokens per pass, "
                     f"efficiency {ts.tokens / max(1, stream_rows * cfg.data.tokens_per_row):.1%}; "
                     f"train.max_steps={cfg.train.max_steps}")
        return "\n".join(lines)
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
