"""The bench: every recipe in one process on one checkpoint over the same sequences, then the report.

Recipes that differ only in their attention backend share one loaded model. Liger patches some of
transformers' Mistral classes for the whole process, so recipes without it run first. One recipe
failing (out of memory, a backend error) is recorded and the others still run.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass

import torch

from mistral_qlora.bench.options import BenchOptions
from mistral_qlora.bench.profile import profile_step
from mistral_qlora.bench.recipes import (PLAIN_RECIPE, TUTORIAL_RECIPE, Recipe, build_recipe_model, expand_recipes,
                                         plan_lines)
from mistral_qlora.bench.report import environment, now, write_report
from mistral_qlora.bench.timing import time_recipe
from mistral_qlora.bench.workload import build_sample, recipe_batches
from mistral_qlora.config import ModelSection
from mistral_qlora.flops import flops_per_token, lora_target_names, mfu, peak_flops
from mistral_qlora.model.attention import set_attention
from mistral_qlora.model.base import load_model_config, resolve_model_path
from mistral_qlora.model.tokenizer import load_tokenizer
from mistral_qlora.runtime import Runtime

PAD_TOKEN_ID = 0  # <unk>: padding is masked out anyway


@dataclass
class RecipeResult:
    recipe: str
    batching: str
    attention: str
    kbit_setup: str  # prepare_model_for_kbit_training (the tutorial's) | ours
    steps: int = 0
    real_tokens: int = 0
    slots: int = 0
    seconds: float = 0.0
    tokens_per_second: float | None = None
    padding_fraction: float | None = None
    peak_memory_gib: float | None = None
    mean_loss: float | None = None
    repeat_tokens_per_second: list[float] | None = None
    mfu: float | None = None
    vs_tutorial: float | None = None
    vs_plain: float | None = None
    kernels: str = "none"
    ckpt: str = "all"
    lora: str = "peft"  # the LoRA layer the recipe ran on (a DoRA recipe: PEFT's, whatever it asked for)
    variant: str = "lora"  # lora | rslora | dora
    compute: str = "bf16"  # quantization.compute
    profile: dict | None = None
    profile_kernels: list[dict] | None = None
    gpu_clocks: dict | None = None  # SM clock and power over the timed passes (gpu_clocks.summarize)
    profile_gpu_clocks: dict | None = None  # the same over the profiled step
    error: str | None = None


@dataclass
class Setup:
    """What every recipe of one bench run shares: the checkpoint, the runtime, the sequences."""

    path: str
    model_config: object
    rt: Runtime
    sample: object  # workload.Sample
    flops_per_token: float
    peak_flops: float | None


def setup(opts: BenchOptions, rt: Runtime) -> Setup:
    path = resolve_model_path(opts.model, random_dir=opts.model_dir)
    model_config = load_model_config(path, ModelSection(name_or_path=path, sliding_window=opts.sliding_window))
    sample = build_sample(opts, load_tokenizer(path) if opts.data else None, model_config.vocab_size)
    per_token = flops_per_token(model_config, opts.lora_r, lora_target_names("all-linear"), sample.timed_lengths())
    peak = peak_flops(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return Setup(path, model_config, rt, sample, per_token, peak)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_bench(opts: BenchOptions) -> dict:
    rt = Runtime.detect(opts.dtype)
    recipes = [Recipe.parse(r) for r in expand_recipes(opts.recipes, rt.dtype)]
    for r in recipes:
        r.check_usable(rt.dtype)
    recipes.sort(key=lambda r: r.kernels == "liger")  # Liger patches classes process-wide: those last
    s = setup(opts, rt)

    results: list[RecipeResult] = []
    model, loaded, plan = None, None, None
    for recipe in recipes:
        res = RecipeResult(recipe.name, recipe.batching, recipe.attention,
                           "prepare_model_for_kbit_training" if recipe.kbit_setup == "tutorial" else "ours",
                           kernels=recipe.kernels, ckpt=recipe.ckpt, lora=recipe.lora, variant=recipe.variant,
                           compute=recipe.compute)
        print(f"bench: {recipe.name} ...", flush=True)
        try:
            key = (recipe.kbit_setup, recipe.kernels, recipe.ckpt, recipe.lora, recipe.variant, recipe.compute)
            if loaded != key:
                model, loaded = None, None
                free_memory()
                model, plan = build_recipe_model(recipe, opts, s.path, s.model_config, s.rt, PAD_TOKEN_ID)
                for line in plan_lines(recipe, plan):
                    print(line, flush=True)
                loaded = key
            if plan is not None:
                res.lora = plan.layers.lora_layer
            set_attention(model, recipe.attention)
            warm, timed = recipe_batches(s.sample, recipe, opts, PAD_TOKEN_ID)
            for k, v in time_recipe(model, warm, timed, opts.repeats, opts.learning_rate, s.rt.dtype).items():
                setattr(res, k, v)
            passes = ", ".join(f"{t:,.0f}" for t in res.repeat_tokens_per_second or [])
            print(f"bench: {recipe.name}: {res.tokens_per_second:,.0f} real tokens/s (passes: {passes}), "
                  f"peak {res.peak_memory_gib or 0:.1f} GiB", flush=True)
            if opts.profile and recipe is recipes[-1]:
                res.profile, res.profile_kernels, res.profile_gpu_clocks = profile_step(model, timed[0], s.rt.dtype)
        except Exception as exc:  # one backend failing must not lose the others' numbers
            res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            print(f"bench: {recipe.name} failed: {res.error}", flush=True)
            model, loaded = None, None
            free_memory()
        results.append(res)
    model = None
    free_memory()

    base = next((r.tokens_per_second for r in results if r.recipe == TUTORIAL_RECIPE and r.tokens_per_second), None)
    plain = next((r.tokens_per_second for r in results if r.recipe == PLAIN_RECIPE and r.tokens_per_second), None)
    for r in results:
        if base and r.tokens_per_second:
            r.vs_tutorial = r.tokens_per_second / base
        if plain and r.tokens_per_second:
            r.vs_plain = r.tokens_per_second / plain
        r.mfu = mfu(r.tokens_per_second, s.flops_per_token, s.peak_flops)
    report = {
        "date": now(),
        "model": opts.model,
        "model_path": s.path,
        "environment": environment(s.rt.dtype),
        "lengths": s.sample.lengths_note,
        "tokens_per_row": opts.tokens_per_row,
        "packing_efficiency": s.sample.efficiency,
        "padded_batch_size": opts.padded_batch_size,
        "warmup_rows": len(s.sample.warmup_rows),
        "timed_rows": len(s.sample.timed_rows),
        "timed_sequences": sum(len(row) for row in s.sample.timed_rows),
        "gradient_checkpointing": opts.gradient_checkpointing,
        "lora_r": opts.lora_r,
        "flops_per_token": s.flops_per_token,
        "peak_flops": s.peak_flops,
        "options": asdict(opts),
        "results": [asdict(r) for r in results],
    }
    write_report(opts.out, report)
    return report
