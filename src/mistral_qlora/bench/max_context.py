"""`bench --max-context`: the longest single row that trains one full step in each GPU budget.

A probe trains one step (forward, backward, optimizer) on one row of n tokens and says whether it
fit, with its peak memory and tokens/s. Whether a length fits is monotone in n, so the search
doubles from a start (the planner's estimate) until a probe fails, then bisects between the last
length that fit and the first that did not until they are `granularity` tokens apart. Each probe
runs in a child process of its own (the caller's `probe`), so an out-of-memory error cannot leave
the allocator of the next probe fragmented.

`run_max_context` runs it per budget: the planner's longest row for the budget
(plan/context.py's `longest_row`, recompute and offload as `auto` chooses them there) seeds the
search, each probe is bench/context_probe.py in a fresh process with the GPU capped at the budget,
and the report gives per budget the length, peak GPU memory (allocated and reserved), host
memory, tokens/s, the planner's estimate against the measured peak and what the plan chose; then,
where asked, tokens/s at a fixed length in one budget and one step without the sliding window at
the largest budget's length.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

from mistral_qlora.errors import UserError


@dataclass(frozen=True)
class Probe:
    tokens: int
    fits: bool
    peak_gib: float = 0.0  # torch.cuda.max_memory_allocated
    tokens_per_s: float = 0.0  # of the timed step
    reserved_gib: float | None = None  # torch.cuda.max_memory_reserved
    host_gib: float | None = None  # the probe process's peak RSS
    estimate_gib: float | None = None  # the planner's estimate at this length, with the plan's choices
    estimate_host_gib: float | None = None  # of it, the offloaded inputs held in host memory
    recompute: int | None = None  # layers the plan recomputes
    offload: bool | None = None  # whether the plan offloads their inputs
    kept_for_run: int | None = None
    first_step_s: float | None = None
    timed_step_s: float | None = None
    card_gib: float | None = None
    error: str | None = None  # why it did not fit: out of memory, the plan's refusal, a failure
    wall_s: float | None = None  # the child process, loading included

    @property
    def estimate_ratio(self) -> float | None:
        """The planner's estimate over the measured peak (1.0: exact)."""
        return self.estimate_gib / self.peak_gib if self.estimate_gib and self.peak_gib else None


class _Enough(Exception):
    """The search ran its `max_probes`."""


def longest_fitting(probe: Callable[[int], Probe], start: int, granularity: int, limit: int, growth: float = 2.0,
                    max_probes: int | None = None) -> tuple[Probe | None, list[Probe]]:
    """(the longest probe that fit, or None if even `granularity` tokens did not; every probe run,
    in order). Lengths are multiples of `granularity`, between it and `limit`. From `start` the
    length grows (or shrinks) by `growth` a probe until the outcome changes, then bisects; a
    start close to the answer (the planner's estimate) wants a small `growth`. After `max_probes`
    probes the search stops with the longest that fit so far (the runs say how close it got)."""
    def rounded(n: float) -> int:
        return max(granularity, min(limit, int(n) // granularity * granularity))

    runs: list[Probe] = []

    def run(n: int) -> Probe:
        if max_probes is not None and len(runs) >= max_probes:
            raise _Enough
        result = probe(n)
        runs.append(result)
        return result

    best = None
    try:
        best = _search(run, rounded, start, granularity, limit, growth)
    except _Enough:
        fitted = [r for r in runs if r.fits]
        best = max(fitted, key=lambda r: r.tokens) if fitted else None
    return best, runs


def _search(run, rounded, start: int, granularity: int, limit: int, growth: float) -> Probe | None:
    best, n = None, rounded(start)
    first = run(n)
    if first.fits:  # grow until a probe fails or the limit fits
        best = first
        while n < limit:
            n = max(rounded(growth * n), min(limit, n + granularity))
            result = run(n)
            if not result.fits:
                break
            best = result
        else:
            return best
        low, high = best.tokens, n
    else:  # shrink until a probe fits
        high = n
        while n > granularity:
            n = min(rounded(n / growth), n - granularity)
            result = run(n)
            if result.fits:
                best = result
                break
            high = n
        if best is None:
            return None
        low = best.tokens
    while high - low > granularity:  # bisect: `low` fits, `high` does not
        mid = rounded((low + high) // 2)
        if mid in (low, high):
            break
        result = run(mid)
        if result.fits:
            best, low = result, mid
        else:
            high = mid
    return best


def markdown_table(found: dict[float, Probe | None], fails_at: dict[float, int | None] | None = None) -> str:
    """budget (GiB) -> the longest row, as the report's Markdown table; `fails_at`: per budget,
    the shortest length probed that did not fit (how close the search got)."""
    lines = ["| budget | longest row (tokens) | peak GPU memory | tokens/s | reserved | host memory | "
             "estimate (/ peak) | plan | first failing length |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for budget, probe in found.items():
        failed = (fails_at or {}).get(budget)
        failed = f"{failed:,}" if failed else "none probed"
        if probe is None:
            lines.append(f"| {budget:g} GiB | none fits | | | | | | | {failed} |")
            continue
        ratio = probe.estimate_ratio
        estimate = "" if probe.estimate_gib is None else f"{probe.estimate_gib:.1f} GiB" + (
            f" ({ratio:.2f})" if ratio else "")
        plan = "" if probe.recompute is None else (f"{probe.recompute} layers recompute"
                                                   + (", inputs offloaded" if probe.offload else ""))
        lines.append(f"| {budget:g} GiB | {probe.tokens:,} | {probe.peak_gib:.1f} GiB | {probe.tokens_per_s:,.0f} | "
                     f"{_gib(probe.reserved_gib)} | {_gib(probe.host_gib)} | {estimate} | {plan} | {failed} |")
    return "\n".join(lines)


def _gib(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} GiB"


@dataclass
class MaxContextOptions:
    """What `bench --max-context` searches; the model, recipe, rank and window are BenchOptions'."""

    budgets: list[float] | None = None  # GiB each; None: the card's whole memory
    granularity: int = 256  # the finest step between lengths
    resolution: float = 1 / 16  # a budget's step: the largest power of two <= its seed x this (>= granularity)
    growth: float = 1.25  # the search's factor from the planner's seed (longest_fitting)
    max_probes: int = 6  # per budget
    max_tokens: int = 1 << 21  # the longest row probed
    also_at: int | None = None  # a fixed length timed in `also_at_budget` (32768 against the 8,192-token figure)
    also_at_budget: float = 24
    full_attention_check: bool = False  # time one step without the window at the largest budget's length
    probe_timeout: int = 1200  # seconds a probe process may take


def step_for(seed: int, opts: MaxContextOptions) -> int:
    """A budget's granularity: a power of two about `resolution` of its seed, at least `granularity`."""
    step = 1 << max(0, int(seed * opts.resolution).bit_length() - 1)
    return max(opts.granularity, step)


def run_probe_process(spec: dict, timeout: int) -> Probe:
    """One probe in a child process (bench/context_probe.py); a child that dies without a result
    (killed, a crash) is a probe that did not fit, with the tail of its stderr as the reason."""
    from mistral_qlora.bench.context_probe import RESULT_PREFIX

    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "mistral_qlora.bench.context_probe", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Probe(spec["tokens"], False, error=f"no result within {timeout} s",
                     wall_s=round(time.perf_counter() - started, 1))
    wall = round(time.perf_counter() - started, 1)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
        return Probe(spec["tokens"], False, error=f"probe failed: {tail[0][:300]}", wall_s=wall)
    fields = json.loads(lines[-1][len(RESULT_PREFIX):])
    known = {f.name for f in dataclasses.fields(Probe)}
    return Probe(**{k: v for k, v in fields.items() if k in known and v is not None}, wall_s=wall)


def describe_probe(budget: float, p: Probe) -> str:
    what = (f"fits, peak {p.peak_gib:.1f} GiB, {p.tokens_per_s:,.0f} tokens/s" if p.fits
            else f"does not fit ({p.error})")
    plan = "" if p.recompute is None else (f"; plan: {p.recompute} layers recompute, offload "
                                           f"{'on' if p.offload else 'off'}, estimate {p.estimate_gib:.1f} GiB")
    return f"max-context: {budget:g} GiB: {p.tokens:,} tokens: {what}{plan} [{p.wall_s or 0:.0f} s]"


def run_max_context(opts, mc: MaxContextOptions, log=print) -> dict:
    """The search per budget, the fixed-length and full-attention probes, and the report (JSON at
    `opts.out`). `opts`: BenchOptions (model, recipes: the last one is searched, default `fast`;
    lora_r, sliding_window, dtype, seed)."""
    import torch

    from mistral_qlora.bench.context_probe import FAKE_TOKENS_PER_GIB, plan_budget
    from mistral_qlora.bench.recipes import Recipe, expand_recipes, recipe_config
    from mistral_qlora.bench.report import environment, now, write_report
    from mistral_qlora.config import ModelSection
    from mistral_qlora.model.base import load_model_config, resolve_model_path
    from mistral_qlora.plan.backends import select_kernels
    from mistral_qlora.plan.context import longest_row
    from mistral_qlora.runtime import GIB, Runtime

    rt = Runtime.detect(opts.dtype)
    fake = os.environ.get(FAKE_TOKENS_PER_GIB)
    if rt.device != "cuda" and fake is None:
        raise UserError("bench --max-context measures GPU memory under a per-process cap and needs a CUDA GPU; "
                        "none is visible here")
    if rt.device != "cuda" and not mc.budgets:
        raise UserError("bench --max-context without a GPU needs --budgets")
    bad = [b for b in (mc.budgets or []) if b <= 0]
    if bad or mc.granularity < 1 or mc.max_probes < 1 or mc.growth <= 1 or mc.max_tokens < mc.granularity:
        raise UserError("bench --max-context: --budgets positive GiB, --granularity >= 1, --max-probes >= 1, "
                        "--growth > 1, --max-tokens >= --granularity")
    recipe_name = expand_recipes(opts.recipes or ["fast"], rt.dtype)[-1]
    recipe = Recipe.parse(recipe_name)
    recipe.check_usable(rt.dtype)
    if recipe.kbit_setup != "ours":
        raise UserError(f"bench --max-context: --recipes {recipe_name}: a recipe of ours (packed+BACKEND...), "
                        "whose plan chooses recompute and offload")
    path = resolve_model_path(opts.model, random_dir=opts.model_dir)  # builds random:mistral-7b once, here
    model_config = load_model_config(path, ModelSection(name_or_path=path, sliding_window=opts.sliding_window))
    cfg = recipe_config(recipe, opts, path)
    kernels = select_kernels(cfg.model.kernels)
    total = torch.cuda.get_device_properties(0).total_memory if rt.device == "cuda" else None
    budgets = mc.budgets or [total / GIB]

    def spec(tokens: int, budget: float, timed: bool = True, window=opts.sliding_window) -> dict:
        return {"model_path": path, "recipe": recipe_name, "tokens": tokens, "budget_gib": budget,
                "lora_r": opts.lora_r, "sliding_window": window, "dtype": opts.dtype, "seed": opts.seed,
                "timed": timed}

    def probe_in(budget: float, window=opts.sliding_window):
        def probe(n: int) -> Probe:
            result = run_probe_process(spec(n, budget, window=window), mc.probe_timeout)
            log(describe_probe(budget, result))
            return result
        return probe

    results = []
    for budget in budgets:
        cap = min(total, int(budget * GIB)) if total else int(budget * GIB)
        seed = longest_row(cfg, model_config, rt.dtype.itemsize, kernels, plan_budget(cap), mc.granularity,
                           mc.max_tokens) or mc.granularity
        step = step_for(seed, mc)
        log(f"max-context: {budget:g} GiB (cap {cap / GIB:.1f} GiB): the planner's longest row {seed:,} tokens; "
            f"searching in steps of {step:,}")
        best, runs = longest_fitting(probe_in(budget), seed, step, mc.max_tokens, mc.growth, mc.max_probes)
        above = [r.tokens for r in runs if not r.fits and (best is None or r.tokens > best.tokens)]
        results.append({"budget_gib": budget, "cap_gib": round(cap / GIB, 2), "planner_longest_row": seed,
                        "granularity": step, "longest": dataclasses.asdict(best) if best else None,
                        "first_failing": min(above) if above else None,
                        "probes": [dataclasses.asdict(r) for r in runs]})
    also = full = None
    if mc.also_at:
        also = probe_in(mc.also_at_budget)(mc.also_at)
    if mc.full_attention_check:
        largest = max(results, key=lambda r: r["budget_gib"])
        if largest["longest"]:
            full = probe_in(largest["budget_gib"], window=None)(largest["longest"]["tokens"])
    report = {
        "date": now(),
        "model": opts.model,
        "model_path": path,
        "environment": environment(rt.dtype),
        "recipe": recipe_name,
        "lora_r": opts.lora_r,
        "sliding_window": opts.sliding_window,
        "options": dataclasses.asdict(mc),
        "budgets": results,
        "also_at": None if also is None else {"budget_gib": mc.also_at_budget, **dataclasses.asdict(also)},
        "full_attention": None if full is None else {"budget_gib": max(budgets), **dataclasses.asdict(full)},
    }
    write_report(opts.out, report)
    return report


def format_max_context(report: dict) -> str:
    """The report as printed: what ran, the table, the fixed-length and full-attention steps."""
    env = report["environment"]
    found = {r["budget_gib"]: Probe(**r["longest"]) if r["longest"] else None for r in report["budgets"]}
    fails = {r["budget_gib"]: r["first_failing"] for r in report["budgets"]}
    lines = [f"max-context: {report['model']} on {env['device']}, {env['dtype']}, {report['recipe']}, "
             f"LoRA r={report['lora_r']} on every linear, sliding window {report['sliding_window']}, one record "
             f"a row, {report['date']}", "", markdown_table(found, fails)]
    for key, what in (("also_at", "fixed length"), ("full_attention", "full attention (no window)")):
        p = report.get(key)
        if p:
            result = (f"{p['tokens_per_s']:,.0f} tokens/s, peak {p['peak_gib']:.1f} GiB" if p["fits"]
                      else f"does not fit ({p['error']})")
            lines.append(f"{what}: {p['tokens']:,} tokens in {p['budget_gib']:g} GiB: {result}")
    return "\n".join(lines)
