"""`mistral-qlora bench --compare LEVERS`: one recipe as planned against itself with each lever
switched off, in one process on one model.

Across separate runs (even on the same card) the same code varies by more than most levers are
worth. Here the variants take turns, pass by pass, on the same model and rows, so a drifting clock
or a warmer card hits them alike; each variant's tokens/s is the median of its passes, and its SM
clock and power the median over its passes (a variant that saves power may run at a higher clock
under the card's power cap). A variant is the plan's `LayerPlan` with one lever off, applied to
the loaded model by the function that applied the plan (model/lora.py: configure_fused_layers).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import asdict

import torch

from mistral_qlora.bench.gpu_clocks import gpu_sampler
from mistral_qlora.bench.gpu_clocks import summarize as summarize_clocks
from mistral_qlora.bench.levers import LEVERS
from mistral_qlora.bench.options import BenchOptions
from mistral_qlora.bench.recipes import Recipe, build_recipe_model, expand_recipes, plan_lines
from mistral_qlora.bench.report import environment, now, write_report
from mistral_qlora.bench.run import PAD_TOKEN_ID, free_memory, setup
from mistral_qlora.bench.timing import real_and_slots, sync, train_step, training_setup
from mistral_qlora.bench.workload import recipe_batches
from mistral_qlora.errors import UserError
from mistral_qlora.flops import mfu
from mistral_qlora.model.attention import set_attention
from mistral_qlora.model.lora import configure_fused_layers
from mistral_qlora.runtime import Runtime

AS_PLANNED = "as planned"


def compare_recipe(opts: BenchOptions, dtype) -> Recipe:
    """The recipe to compare: the last of --recipes, else the fast one."""
    recipe = Recipe.parse(expand_recipes(opts.recipes, dtype)[-1])
    if recipe.kbit_setup != "ours" or recipe.lora != "fused":
        raise UserError(f"--compare needs a recipe of ours with the fused LoRA layer, not {recipe.name!r}")
    recipe.check_usable(dtype)
    return recipe


def run_compare(opts: BenchOptions, levers: list[str]) -> dict:
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown or not levers:
        raise UserError(f"--compare {','.join(unknown or levers)}: name levers to switch off, from {', '.join(LEVERS)}")
    rt = Runtime.detect(opts.dtype)
    recipe = compare_recipe(opts, rt.dtype)
    s = setup(opts, rt)
    model, plan = build_recipe_model(recipe, opts, s.path, s.model_config, s.rt, PAD_TOKEN_ID)
    for line in plan_lines(recipe, plan):
        print(line, flush=True)
    variants = [(AS_PLANNED, [], plan.layers)]
    variants += [(f"without {lever}", [lever], dataclasses.replace(plan.layers, **LEVERS[lever][1])) for lever in levers]
    set_attention(model, recipe.attention)
    warm, timed = recipe_batches(s.sample, recipe, opts, PAD_TOKEN_ID)
    device, params, optimizer, autocast_dtype = training_setup(model, opts.learning_rate, s.rt.dtype)
    real = sum(real_and_slots(b)[0] for b in timed)
    cuda = device.type == "cuda"

    names = [name for name, _, _ in variants]
    peaks, passes, losses, clock_samples = {}, {n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names}
    for name, _, layers in variants:  # warm each variant up (its first kernels, its memory) and take its peak
        configure_fused_layers(model, layers)
        free_memory()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for batch in warm:
            train_step(model, batch, optimizer, params, device, autocast_dtype)
        sync(device)
        peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    for cycle in range(opts.repeats):
        for name, _, layers in variants:
            configure_fused_layers(model, layers)
            train_step(model, timed[-1], optimizer, params, device, autocast_dtype)  # the switch's first step
            sync(device)
            with gpu_sampler(device) as sampler:
                started = time.perf_counter()
                for batch in timed:
                    losses[name].append(train_step(model, batch, optimizer, params, device, autocast_dtype))
                sync(device)
                passes[name].append(real / (time.perf_counter() - started))
            clock_samples[name] += sampler.samples
            print(f"bench --compare: pass {cycle + 1}/{opts.repeats}: {name}: {passes[name][-1]:,.0f} real tokens/s",
                  flush=True)
    model = None
    free_memory()

    planned = statistics.median(passes[AS_PLANNED])
    results = []
    for name, off, _ in variants:
        tps = statistics.median(passes[name])
        results.append({"variant": name, "off": off, "tokens_per_second": tps,
                        "passes": [round(p, 1) for p in passes[name]], "vs_planned": tps / planned,
                        "mfu": mfu(tps, s.flops_per_token, s.peak_flops), "peak_memory_gib": peaks[name],
                        "mean_loss": float(torch.stack(losses[name]).float().mean()),
                        "gpu_clocks": summarize_clocks(clock_samples[name])})
    report = {
        "date": now(),
        "model": opts.model,
        "environment": environment(s.rt.dtype),
        "recipe": recipe.name,
        "lengths": s.sample.lengths_note,
        "tokens_per_row": opts.tokens_per_row,
        "timed_rows": len(timed),
        "repeats": opts.repeats,
        "options": asdict(opts),
        "variants": results,
    }
    write_report(opts.out, report)
    return report
