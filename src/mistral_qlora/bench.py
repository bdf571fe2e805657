"""`mistral-qlora bench`: what packing and the attention backends buy, measured in one run.

One process, one checkpoint, the same sequences for every recipe:
- the seed's recipe: padded batches, SDPA, and the usual tutorial preparation (peft's
  `prepare_model_for_kbit_training`: every non-4-bit weight cast to float32, reentrant
  activation checkpointing);
- ours: rows packed by best-fit decreasing (`data.tokens_per_row`), with each usable attention
  backend (sdpa, flex, varlen, flash_attention_2), non-reentrant checkpointing, weights left in
  the compute dtype.
The sequences are those of a few packed rows (lognormal lengths by default, or a dataset file);
the padded recipe trains on exactly those sequences in random batches, so every recipe does the
same useful work. After a few warm-up steps (compilation, allocator), the timed optimizer steps
run between two device synchronisations. Reported: real (non-pad) tokens/s, the share of computed
slots that were padding, peak memory, the ratio to the seed's recipe, and on NVIDIA GPUs the SM
clock and power the timed passes ran at (gpu_clocks.py: a recipe that hits the card's power cap
runs at a lower clock than one that does not).

Data, model and collators are the package's own (data/packing.py, data/collator.py,
modeling/model.py), so the bench times what `train` runs.
"""

from __future__ import annotations

import gc
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from mistral_qlora.data.collator import PackedCollator, PaddedCollator
from mistral_qlora.data.packing import (
    DEFAULT_MAX_LEN,
    DEFAULT_MEDIAN,
    DEFAULT_MIN_LEN,
    DEFAULT_SIGMA,
    lognormal_lengths,
    pack_best_fit_decreasing,
    packing_efficiency,
)
from mistral_qlora.data.tokenize import IGNORE_INDEX
from mistral_qlora.errors import UserError
from mistral_qlora.flops import flops_per_token, mfu, peak_flops
from mistral_qlora.gpu_clocks import describe as describe_clocks
from mistral_qlora.gpu_clocks import gpu_sampler

from mistral_qlora.modeling.random7b import RANDOM_7B, ensure_random_7b

SEED_RECIPE = "padded+sdpa (seed)"
PLAIN_RECIPE = "packed+flex (plain)"  # plain transformers: packing + FlexAttention, tutorial preparation
PACKED_BACKENDS = ("sdpa", "flex", "varlen", "flash_attention_2")
BACKENDS = PACKED_BACKENDS + ("eager",)


@dataclass(frozen=True)
class Recipe:
    """What one recipe name means. Names: `padded+sdpa (seed)`, `packed+flex (plain)`, and
    `packed+BACKEND[+liger][+ckpt=all|none|auto|FRACTION][+lora=fused|peft]` (ours; ckpt defaults
    to all layers, lora to the fused 4-bit LoRA layer)."""

    name: str
    batching: str  # padded | packed
    attention: str
    preparation: str  # seed (peft's prepare_model_for_kbit_training) | ours
    kernels: str = "none"
    ckpt: str = "all"
    lora: str = "peft"  # peft (PEFT's LoRA layers) | fused (modeling/fused_lora.py)

    @classmethod
    def parse(cls, name: str) -> "Recipe":
        if name == SEED_RECIPE:
            return cls(name, "padded", "sdpa", "seed")
        if name == PLAIN_RECIPE:
            return cls(name, "packed", "flex", "seed")
        parts = name.split("+")
        if parts[0] != "packed" or len(parts) < 2 or parts[1] not in BACKENDS:
            raise UserError(f"--recipes: unknown recipe {name!r} (seed, plain, or packed+BACKEND[+liger][+ckpt=X] "
                            f"with BACKEND one of {', '.join(BACKENDS)})")
        kernels, ckpt, lora = "none", "all", "fused"
        for extra in parts[2:]:
            if extra == "liger":
                kernels = "liger"
            elif extra.startswith("ckpt=") and (extra[5:] in ("all", "none", "auto") or _fraction(extra[5:])):
                ckpt = extra[5:]
            elif extra in ("lora=fused", "lora=peft"):
                lora = extra[5:]
            else:
                raise UserError(f"--recipes {name}: unknown part {extra!r} "
                                "(liger, ckpt=all|none|auto|FRACTION, lora=fused|peft)")
        return cls(name, "packed", parts[1], "ours", kernels, ckpt, lora)


def _fraction(text: str) -> bool:
    try:
        return 0 < float(text) < 1
    except ValueError:
        return False


@dataclass
class BenchOptions:
    model: str = "tiny-random-mistral"
    model_dir: str | None = None  # where random:mistral-7b is written (default: the cache folder)
    data: str | None = None  # a dataset file instead of synthetic lengths
    sequences: int = 4000  # synthetic sequences to draw (only the first rows' worth are trained)
    median: int = DEFAULT_MEDIAN
    sigma: float = DEFAULT_SIGMA
    max_len: int = DEFAULT_MAX_LEN
    min_len: int = DEFAULT_MIN_LEN
    tokens_per_row: int = 8192
    padded_batch_size: int = 8
    warmup: int = 3  # warm-up rows (the padded recipe warms up on their sequences)
    timed_rows: int = 8  # timed rows (the padded recipe is timed on their sequences)
    repeats: int = 3  # timed passes over the timed rows per recipe; tokens/s is their median
    recipes: list[str] | None = None  # default: seed, plain, packed+ every usable backend, then the fast ones
    sliding_window: str | int | None = "auto"
    gradient_checkpointing: bool = True
    lora_r: int = 16
    learning_rate: float = 1e-5
    dtype: str = "auto"
    seed: int = 0
    out: str | None = None
    profile: bool = False  # profile one timed step of the last recipe: where the time goes


@dataclass
class RecipeResult:
    recipe: str
    batching: str
    attention: str
    preparation: str
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
    vs_seed: float | None = None
    vs_plain: float | None = None
    kernels: str = "none"
    ckpt: str = "all"
    lora: str = "peft"
    profile: dict | None = None
    profile_kernels: list[dict] | None = None
    gpu_clocks: dict | None = None  # SM clock and power over the timed passes (gpu_clocks.summarize)
    profile_gpu_clocks: dict | None = None  # the same over the profiled step
    error: str | None = None


@dataclass
class Sample:
    """The sequences every recipe trains on: warm-up rows, then timed rows."""

    examples: list[dict]
    warmup_rows: list[list[int]]
    timed_rows: list[list[int]]
    lengths_note: str
    efficiency: float


# ---------------------------------------------------------------------------------------------
# Model


def resolve_bench_model(opts: BenchOptions) -> str:
    from mistral_qlora.modeling.model import resolve_model_path

    if opts.model == RANDOM_7B:
        return str(ensure_random_7b(opts.model_dir))
    if opts.model.startswith("random:"):
        raise UserError(f"--model {opts.model}: the random architecture known here is {RANDOM_7B}")
    return resolve_model_path(opts.model)


def load_recipe_model(path: str, opts: BenchOptions, recipe: Recipe, dtype):
    """The 4-bit base with LoRA, prepared as the seed's tutorial does ('seed') or as train does ('ours'),
    with the recipe's kernels and activation checkpointing."""
    from transformers import AutoConfig

    from mistral_qlora.config import LoraSection, ModelSection, QuantizationSection
    from mistral_qlora.modeling.model import add_lora, load_base_model
    from mistral_qlora.modeling.speed import apply_kernels

    device_map = {"": 0} if torch.cuda.is_available() else None
    model_cfg = ModelSection(name_or_path=path, sliding_window=opts.sliding_window)
    lora = LoraSection(r=opts.lora_r, alpha=2 * opts.lora_r)
    base = load_base_model(path, model_cfg, QuantizationSection(), recipe.attention, dtype, device_map=device_map)
    if recipe.preparation == "seed":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=opts.gradient_checkpointing)
        return add_lora(base, lora, gradient_checkpointing=False)
    apply_kernels(base, recipe.kernels)
    layers = AutoConfig.from_pretrained(path).num_hidden_layers
    k = checkpoint_layers(recipe, opts, path, layers, dtype)
    model = add_lora(base, lora, checkpoint_layers=k, fused=recipe.lora == "fused")
    if recipe.lora == "fused":
        from mistral_qlora.modeling.speed import set_kept_weights

        set_kept_weights(model, k, kept_weight_layers(recipe, opts, path, k, dtype))
    return model


def checkpoint_layers(recipe: Recipe, opts: BenchOptions, path: str, layers: int, dtype) -> int:
    from mistral_qlora.modeling.speed import checkpointed_layers_for

    if not opts.gradient_checkpointing or recipe.ckpt == "none":
        return 0
    if recipe.ckpt == "all":
        return layers
    if recipe.ckpt != "auto":
        return checkpointed_layers_for(float(recipe.ckpt), layers)
    from mistral_qlora.modeling.speed import plan_checkpointing

    cfg, model_config, budget = _as_run(opts, path)
    k, why = plan_checkpointing(cfg, model_config, dtype.itemsize, recipe.kernels, budget)
    print(f"bench: {recipe.name}: {why}", flush=True)
    return k


def kept_weight_layers(recipe: Recipe, opts: BenchOptions, path: str, checkpointed: int, dtype) -> int:
    """How many layers not recomputed keep their dequantized weights (for the whole run), as `train`
    plans it (modeling/speed.py)."""
    from mistral_qlora.modeling.speed import plan_kept_weights

    cfg, model_config, budget = _as_run(opts, path)
    n, why = plan_kept_weights(cfg, model_config, dtype.itemsize, recipe.kernels, budget, checkpointed)
    print(f"bench: {recipe.name}: {why}", flush=True)
    return n


def _as_run(opts: BenchOptions, path: str):
    """(run config, model config, GPU budget) of a `train` run with the bench's shapes, for the plans."""
    from mistral_qlora.config import RunConfig
    from mistral_qlora.distributed import gpu_budget
    from mistral_qlora.modeling.model import load_model_config

    cfg = RunConfig.model_validate({
        "model": {"name_or_path": path, "sliding_window": opts.sliding_window},
        "lora": {"r": opts.lora_r}, "data": {"tokens_per_row": opts.tokens_per_row, "max_seq_len": opts.max_len},
        "train": {"micro_batch_size": 1, "gradient_checkpointing": "auto"}})
    budget = gpu_budget(0) if torch.cuda.is_available() else None
    return cfg, load_model_config(path, cfg.model), budget


def set_attention(model, attention: str) -> None:
    from mistral_qlora.modeling.attention import implementation

    model.get_base_model().set_attn_implementation(implementation(attention))


# ---------------------------------------------------------------------------------------------
# Data


def _synthetic_examples(lengths: list[int], vocab_size: int, seed: int) -> list[dict]:
    """Random token ids; the first third of each sequence is the 'prompt' (label -100)."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = [1] + torch.randint(3, vocab_size, (n - 1,), generator=gen).tolist()
        n_prompt = max(1, n // 3)
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return examples


def build_sample(opts: BenchOptions, path: str, vocab_size: int) -> Sample:
    if opts.tokens_per_row < opts.max_len:
        raise UserError(f"--tokens-per-row ({opts.tokens_per_row}) must be >= --max-len ({opts.max_len})")
    if opts.data:
        from mistral_qlora.config import DataSection
        from mistral_qlora.data import prepare_data
        from mistral_qlora.modeling.tokenizer import load_tokenizer

        cfg = DataSection(train=opts.data, eval_fraction=0.0, max_seq_len=opts.max_len,
                          tokens_per_row=opts.tokens_per_row)
        data = prepare_data(cfg, load_tokenizer(path), opts.seed)
        examples, rows = data.train, data.packed_rows
        lengths = data.train_stats.lengths
        note = f"{opts.data} ({len(examples)} sequences, max {opts.max_len} tokens)"
    else:
        lengths = lognormal_lengths(opts.sequences, opts.median, opts.sigma, opts.max_len, opts.min_len, opts.seed)
        examples = _synthetic_examples(lengths, vocab_size, opts.seed)
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


def recipe_batches(sample: Sample, recipe: Recipe, opts: BenchOptions, pad_token_id: int, cu: bool):
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
        collate = PackedCollator(with_cu_seqlens=cu)

        def batches(rows):
            return [collate([[ex[i] for i in row]]) for row in rows]

    return batches(sample.warmup_rows), batches(sample.timed_rows)


def bench_flops_per_token(path: str, opts: BenchOptions, sample: Sample) -> float:
    """Model FLOPs per token of the timed sequences (mistral_qlora.flops), for the MFU column."""
    from mistral_qlora.config import ModelSection
    from mistral_qlora.distributed import lora_target_names
    from mistral_qlora.modeling.model import load_model_config

    config = load_model_config(path, ModelSection(name_or_path=path, sliding_window=opts.sliding_window))
    lengths = [len(sample.examples[i]["input_ids"]) for row in sample.timed_rows for i in row]
    return flops_per_token(config, opts.lora_r, lora_target_names("all-linear"), lengths)


# ---------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(model, batch: dict, optimizer, params, device, autocast_dtype, max_grad_norm: float = 1.0):
    """One optimizer step as the Trainer takes it: loss = sum over answer tokens / their count."""
    batch = _to(batch, device)
    n_items = (batch["labels"][..., 1:] != IGNORE_INDEX).sum()
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(**batch, num_items_in_batch=n_items).loss
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _real_and_slots(batch: dict) -> tuple[int, int]:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), batch["input_ids"].numel()
    return batch["input_ids"].numel(), batch["input_ids"].numel()


def training_setup(model, opts: BenchOptions, dtype):
    """(device, trainable parameters, AdamW, autocast dtype or None) for timing `train_step`s."""
    device = next(p.device for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.learning_rate, fused=device.type == "cuda")
    autocast_dtype = dtype if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else None
    model.train()
    return device, params, optimizer, autocast_dtype


def time_recipe(model, warmup: list[dict], timed: list[dict], opts: BenchOptions, dtype) -> dict:
    device, params, optimizer, autocast_dtype = training_setup(model, opts, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for batch in warmup:
        train_step(model, batch, optimizer, params, device, autocast_dtype)
    _sync(device)
    losses, passes = [], []
    with gpu_sampler(device) as clocks:  # the clock the passes ran at: a power cap lowers it
        for _ in range(opts.repeats):  # later passes show whether warm-up was still inside the first
            started = time.perf_counter()
            for batch in timed:
                losses.append(train_step(model, batch, optimizer, params, device, autocast_dtype))
            _sync(device)
            passes.append(time.perf_counter() - started)
    seconds = statistics.median(passes)
    real, slots = map(sum, zip(*(_real_and_slots(b) for b in timed)))
    del optimizer
    return {
        "steps": len(timed),
        "real_tokens": real,
        "slots": slots,
        "seconds": round(seconds, 4),
        "tokens_per_second": real / seconds,
        "repeat_tokens_per_second": [round(real / s, 1) for s in passes],
        "padding_fraction": 1 - real / slots,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "mean_loss": float(torch.stack(losses).float().mean()),
        "gpu_clocks": clocks.summary,
    }


# Kernel names -> what the time is spent on (first match wins).
PROFILE_CATEGORIES = (
    ("4-bit dequantize", ("dequant", "kdequantize")),
    ("attention", ("flash", "fmha", "attention", "flex", "varlen")),
    ("matmul (bf16 GEMM)", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "sm90", "cublas")),
    ("fused Liger kernels", ("liger", "_rms_norm", "swiglu", "rope", "cross_entropy")),
    ("optimizer", ("adam",)),
)
IDLE_KIND = "GPU idle (host launch gaps, syncs)"
PROFILE_TOP_KERNELS = 15


def profile_step(model, batch: dict, dtype) -> tuple[dict, list[dict], dict | None]:
    """One training step under torch.profiler: GPU time by kind of kernel (ms and share of the
    step's wall time, the GPU's idle time included as its own kind), the kernels that took the
    most time, and the SM clock the step ran at. The step starts on an idle GPU, so where the timed
    passes ran into the power cap it runs at a higher clock than they did (both clocks are shown)."""
    from torch.profiler import ProfilerActivity, profile

    device = next(p.device for p in model.parameters())
    if device.type != "cuda":
        return {}, [], None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    train_step(model, batch, optimizer, params, device, dtype)  # warm the optimizer state
    _sync(device)
    with gpu_sampler(device) as clocks, profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        train_step(model, batch, optimizer, params, device, dtype)
        _sync(device)
        wall_ms = (time.perf_counter() - started) * 1000
    totals: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if not us or evt.key.startswith(("ProfilerStep", "aten::", "autograd::")):
            continue
        name = evt.key.lower()
        kind = next((k for k, keys in PROFILE_CATEGORIES if any(w in name for w in keys)), "other (elementwise, copies)")
        totals[kind] = totals.get(kind, 0.0) + us / 1000
        kernels.append({"kernel": evt.key[:120], "kind": kind, "ms": round(us / 1000, 2), "calls": evt.count})
    # Time the GPU sat waiting on the host (launch gaps, syncs); the profiler's own overhead
    # lands here too, so it is an upper bound. (Whether a long run's steps wait on the host is
    # another question: the fast recipe's do not, measured by adding host time; docs/benchmarks.md.)
    totals[IDLE_KIND] = max(0.0, wall_ms - sum(totals.values()))
    all_ms = sum(totals.values()) or 1.0
    by_kind = {k: {"ms": round(v, 1), "share": round(v / all_ms, 3)} for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    return by_kind, sorted(kernels, key=lambda k: -k["ms"])[:PROFILE_TOP_KERNELS], clocks.summary


# ---------------------------------------------------------------------------------------------
# The run


def default_recipes(dtype) -> list[str]:
    """The seed's recipe, plain transformers with packing + flex, packed with every usable backend,
    then the fastest backend with Liger's kernels: every layer checkpointed (the low-memory
    setting) and as few as memory allows (ckpt=auto)."""
    from mistral_qlora.modeling.attention import usable_backends
    from mistral_qlora.modeling.speed import kernels_usable

    usable = usable_backends(dtype)
    backends = [b for b in PACKED_BACKENDS if usable[b] is None]
    recipes = [SEED_RECIPE] + ([PLAIN_RECIPE] if usable["flex"] is None else []) + [f"packed+{b}" for b in backends]
    if kernels_usable() is None:
        best = backends[-1]  # PACKED_BACKENDS is ordered slowest to fastest
        recipes += [f"packed+{best}+liger", f"packed+{best}+liger+ckpt=auto"]
    return recipes


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _environment(dtype) -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {name: version(name) for name in ("torch", "transformers", "peft", "bitsandbytes", "flash-attn")}
    env["python"] = platform.python_version()
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    env["dtype"] = str(dtype).removeprefix("torch.")
    return env


def run_bench(opts: BenchOptions) -> dict:
    from transformers import AutoConfig

    from mistral_qlora.modeling.attention import TAKES_CU_SEQLENS, usable_backends
    from mistral_qlora.modeling.model import resolve_dtype
    from mistral_qlora.modeling.speed import select_kernels

    dtype = resolve_dtype(opts.dtype)
    recipes = [Recipe.parse(r) for r in (opts.recipes or default_recipes(dtype))]
    usable = usable_backends(dtype)
    for r in recipes:
        if usable[r.attention] is not None:
            raise UserError(f"--recipes {r.name}: {usable[r.attention]}")
        if r.kernels == "liger":
            select_kernels("liger")  # says why not, where Liger cannot run
    # Liger patches some of transformers' Mistral classes for the whole process: recipes without
    # it run first.
    recipes.sort(key=lambda r: r.kernels == "liger")

    path = resolve_bench_model(opts)
    vocab_size = AutoConfig.from_pretrained(path).vocab_size
    sample = build_sample(opts, path, vocab_size)
    pad_token_id = 0  # <unk>: masked out anyway

    results: list[RecipeResult] = []
    model, loaded = None, None
    for recipe in recipes:
        res = RecipeResult(recipe.name, recipe.batching, recipe.attention,
                           "prepare_model_for_kbit_training" if recipe.preparation == "seed" else "ours")
        res.kernels, res.ckpt, res.lora = recipe.kernels, recipe.ckpt, recipe.lora
        print(f"bench: {recipe.name} ...", flush=True)
        try:
            key = (recipe.preparation, recipe.kernels, recipe.ckpt, recipe.lora)
            if loaded != key:
                model, loaded = None, None
                _free_memory()
                model = load_recipe_model(path, opts, recipe, dtype)
                loaded = key
            set_attention(model, recipe.attention)
            warm, timed = recipe_batches(sample, recipe, opts, pad_token_id, cu=recipe.attention in TAKES_CU_SEQLENS)
            for k, v in time_recipe(model, warm, timed, opts, dtype).items():
                setattr(res, k, v)
            passes = ", ".join(f"{t:,.0f}" for t in res.repeat_tokens_per_second or [])
            print(f"bench: {recipe.name}: {res.tokens_per_second:,.0f} real tokens/s (passes: {passes}), "
                  f"peak {res.peak_memory_gib or 0:.1f} GiB", flush=True)
            if opts.profile and recipe is recipes[-1]:
                res.profile, res.profile_kernels, res.profile_gpu_clocks = profile_step(model, timed[0], dtype)
        except Exception as exc:  # one backend failing must not lose the others' numbers
            res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            print(f"bench: {recipe.name} failed: {res.error}", flush=True)
            model, loaded = None, None
            _free_memory()
        results.append(res)
    model = None
    _free_memory()

    base = next((r.tokens_per_second for r in results if r.recipe == SEED_RECIPE and r.tokens_per_second), None)
    plain = next((r.tokens_per_second for r in results if r.recipe == PLAIN_RECIPE and r.tokens_per_second), None)
    for r in results:
        if base and r.tokens_per_second:
            r.vs_seed = r.tokens_per_second / base
        if plain and r.tokens_per_second:
            r.vs_plain = r.tokens_per_second / plain
    timed_seqs = sum(len(row) for row in sample.timed_rows)
    per_token = bench_flops_per_token(path, opts, sample)
    peak = peak_flops(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    for r in results:
        r.mfu = mfu(r.tokens_per_second, per_token, peak)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": opts.model,
        "model_path": path,
        "environment": _environment(dtype),
        "lengths": sample.lengths_note,
        "tokens_per_row": opts.tokens_per_row,
        "packing_efficiency": sample.efficiency,
        "padded_batch_size": opts.padded_batch_size,
        "warmup_rows": len(sample.warmup_rows),
        "timed_rows": len(sample.timed_rows),
        "timed_sequences": timed_seqs,
        "gradient_checkpointing": opts.gradient_checkpointing,
        "lora_r": opts.lora_r,
        "flops_per_token": per_token,
        "peak_flops": peak,
        "options": asdict(opts),
        "results": [asdict(r) for r in results],
    }
    write_report(opts.out, report)
    return report


def write_report(out: str | None, report: dict) -> None:
    """The JSON report at `out`, its folder made, where one was asked for."""
    if out:
        from mistral_qlora.artifacts import write_json

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(out), report)


def format_report(report: dict) -> str:
    env = report["environment"]
    repeats = report["options"].get("repeats", 1)
    lines = [
        f"bench: {report['model']} on {env['device']}, {env['dtype']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, {report['date']}",
        f"lengths: {report['lengths']}",
        f"timed: {report['timed_rows']} rows of {report['tokens_per_row']} tokens = {report['timed_sequences']} "
        f"sequences (packing efficiency {report['packing_efficiency']:.1%}); padded batches of "
        f"{report['padded_batch_size']} on the same sequences"
        f"{'' if repeats == 1 else f', timed {repeats} times (median)'}"
        f"; LoRA r={report['lora_r']}, "
        f"activation checkpointing {'on' if report['gradient_checkpointing'] else 'off'}",
        "",
        f"| {'recipe':<32} | {'real tok/s':>10} | {'MFU':>6} | {'padding':>7} | {'peak GiB':>8} | {'vs seed':>7} | "
        f"{'vs plain':>8} | {'steps':>5} |",
        f"|{'-' * 34}|{'-' * 11}:|{'-' * 7}:|{'-' * 8}:|{'-' * 9}:|{'-' * 8}:|{'-' * 9}:|{'-' * 6}:|",
    ]

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    for r in report["results"]:
        if r["error"]:
            lines.append(f"| {r['recipe']:<32} | failed: {r['error']}")
            continue
        ratio = {k: fmt(r.get(k), '.2f') + 'x' if r.get(k) else 'n/a' for k in ("vs_seed", "vs_plain")}
        lines.append(
            f"| {r['recipe']:<32} | {fmt(r['tokens_per_second'], ',.0f'):>10} | {fmt(r.get('mfu'), '.1%'):>6} | "
            f"{fmt(r['padding_fraction'], '.1%'):>7} | {fmt(r['peak_memory_gib'], '.1f'):>8} | "
            f"{ratio['vs_seed']:>7} | {ratio['vs_plain']:>8} | {r['steps']:>5} |"
        )
    clocked = [r for r in report["results"] if r.get("gpu_clocks")]
    if clocked:
        lines += ["", "the GPU's SM clock and power over the timed passes (median; what held the clock back):"]
        lines += [f"  {r['recipe']:<32} {describe_clocks(r['gpu_clocks'])}" for r in clocked]
    for r in report["results"]:
        if r.get("profile"):
            lines += ["", f"where one step of {r['recipe']} spends its GPU time"
                      + (f" (at {describe_clocks(r['profile_gpu_clocks'])}):" if r.get("profile_gpu_clocks") else ":")]
            lines += [f"  {kind:<34} {v['ms']:>9.1f} ms  {v['share']:>6.1%}" for kind, v in r["profile"].items()]
            if r.get("profile_kernels"):
                lines += ["  the kernels that took longest:"]
                lines += [f"  {k['ms']:>9.1f} ms {k['calls']:>5}x  {k['kernel'][:90]}" for k in r["profile_kernels"]]
    return "\n".join(lines)

