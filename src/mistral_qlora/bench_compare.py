"""`mistral-qlora bench --compare LEVERS`: one recipe as planned against itself with each lever
switched off, in one process on one model.

Across separate runs (even on the same card type) the same code varies by about 1.5%, more than
most levers are worth. Here the variants take turns, pass by pass, on the same model and rows, so
a drifting clock or a warmer card hits them alike; each variant's tokens/s is the median of its
passes, and its SM clock and power the median over its passes (a variant that saves power may
run at a higher clock under the card's power cap). The levers are the fast path's run-time switches (`modeling/speed.py: LEVERS`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from datetime import datetime, timezone

import torch

from mistral_qlora.bench import (BenchOptions, Recipe, _environment, _free_memory, _real_and_slots, _sync,
                                 bench_flops_per_token, build_sample, default_recipes, load_recipe_model,
                                 recipe_batches, resolve_bench_model, set_attention, train_step, training_setup,
                                 write_report)
from mistral_qlora.errors import UserError
from mistral_qlora.flops import mfu, peak_flops
from mistral_qlora.gpu_clocks import describe as describe_clocks
from mistral_qlora.gpu_clocks import gpu_sampler
from mistral_qlora.gpu_clocks import summarize as summarize_clocks

AS_PLANNED = "as planned"


def compare_recipe(opts: BenchOptions, dtype) -> Recipe:
    """The recipe to compare: the last of --recipes, else the fast one."""
    from mistral_qlora.modeling.attention import usable_backends
    from mistral_qlora.modeling.speed import select_kernels

    recipe = Recipe.parse((opts.recipes or default_recipes(dtype))[-1])
    if recipe.preparation != "ours" or recipe.lora != "fused":
        raise UserError(f"--compare needs a recipe of ours with the fused LoRA layer, not {recipe.name!r}")
    why = usable_backends(dtype)[recipe.attention]
    if why is not None:
        raise UserError(f"--recipes {recipe.name}: {why}")
    if recipe.kernels == "liger":
        select_kernels("liger")
    return recipe


def run_compare(opts: BenchOptions, levers: list[str]) -> dict:
    from transformers import AutoConfig

    from mistral_qlora.modeling.attention import TAKES_CU_SEQLENS
    from mistral_qlora.modeling.model import resolve_dtype
    from mistral_qlora.modeling.speed import LEVERS, LeverSwitch

    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown or not levers:
        raise UserError(f"--compare {','.join(unknown or levers)}: name levers to switch off, from {', '.join(LEVERS)}")
    dtype = resolve_dtype(opts.dtype)
    recipe = compare_recipe(opts, dtype)
    path = resolve_bench_model(opts)
    sample = build_sample(opts, path, AutoConfig.from_pretrained(path).vocab_size)
    model = load_recipe_model(path, opts, recipe, dtype)
    switch = LeverSwitch(model)
    variants = [(AS_PLANNED, [])] + [(f"without {lever}", [lever]) for lever in levers]
    set_attention(model, recipe.attention)
    warm, timed = recipe_batches(sample, recipe, opts, 0, cu=recipe.attention in TAKES_CU_SEQLENS)
    device, params, optimizer, autocast_dtype = training_setup(model, opts, dtype)
    real = sum(_real_and_slots(b)[0] for b in timed)
    cuda = device.type == "cuda"

    peaks, passes, losses = {}, {name: [] for name, _ in variants}, {name: [] for name, _ in variants}
    clock_samples = {name: [] for name, _ in variants}
    for name, off in variants:  # warm each variant up (its first kernels, its memory) and take its peak
        switch.set_off(off)
        _free_memory()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for batch in warm:
            train_step(model, batch, optimizer, params, device, autocast_dtype)
        _sync(device)
        peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    for cycle in range(opts.repeats):
        for name, off in variants:
            switch.set_off(off)
            train_step(model, timed[-1], optimizer, params, device, autocast_dtype)  # the switch's first step
            _sync(device)
            with gpu_sampler(device) as sampler:
                started = time.perf_counter()
                for batch in timed:
                    losses[name].append(train_step(model, batch, optimizer, params, device, autocast_dtype))
                _sync(device)
                passes[name].append(real / (time.perf_counter() - started))
            clock_samples[name] += sampler.samples
            print(f"bench --compare: pass {cycle + 1}/{opts.repeats}: {name}: {passes[name][-1]:,.0f} real tokens/s",
                  flush=True)
    switch.set_off()
    model = None
    _free_memory()

    per_token = bench_flops_per_token(path, opts, sample)
    peak = peak_flops(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    planned = statistics.median(passes[AS_PLANNED])
    results = []
    for name, off in variants:
        tps = statistics.median(passes[name])
        results.append({"variant": name, "off": off, "tokens_per_second": tps,
                        "passes": [round(p, 1) for p in passes[name]], "vs_planned": tps / planned,
                        "mfu": mfu(tps, per_token, peak), "peak_memory_gib": peaks[name],
                        "mean_loss": float(torch.stack(losses[name]).float().mean()),
                        "gpu_clocks": summarize_clocks(clock_samples[name])})
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": opts.model,
        "environment": _environment(dtype),
        "recipe": recipe.name,
        "lengths": sample.lengths_note,
        "tokens_per_row": opts.tokens_per_row,
        "timed_rows": len(timed),
        "repeats": opts.repeats,
        "options": asdict(opts),
        "variants": results,
    }
    write_report(opts.out, report)
    return report


def format_compare(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"bench --compare: {report['recipe']} on {report['model']}, {env['device']}, {env['dtype']}, "
        f"torch {env['torch']}, {report['date']}",
        f"{report['timed_rows']} rows of {report['tokens_per_row']} tokens a pass; the variants took turns "
        f"{report['repeats']} times (median pass)",
        "",
        f"| {'variant':<28} | {'real tok/s':>10} | {'vs planned':>10} | {'MFU':>6} | {'peak GiB':>8} | passes",
        f"|{'-' * 30}|{'-' * 11}:|{'-' * 11}:|{'-' * 7}:|{'-' * 9}:|--------",
    ]
    for v in report["variants"]:
        mfu_text = f"{v['mfu']:.1%}" if v["mfu"] is not None else "n/a"
        peak_text = f"{v['peak_memory_gib']:.1f}" if v["peak_memory_gib"] is not None else "n/a"
        lines.append(f"| {v['variant']:<28} | {v['tokens_per_second']:>10,.0f} | {v['vs_planned'] - 1:>+10.1%} | "
                     f"{mfu_text:>6} | {peak_text:>8} | " + " / ".join(f"{p:,.0f}" for p in v["passes"]))
    clocked = [v for v in report["variants"] if v.get("gpu_clocks")]
    if clocked:
        lines += ["", "the GPU's SM clock and power over each variant's passes (median; what held the clock back):"]
        lines += [f"  {v['variant']:<28} {describe_clocks(v['gpu_clocks'])}" for v in clocked]
    return "\n".join(lines)
