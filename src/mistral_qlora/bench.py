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
slots that were padding, peak memory, and the ratio to the seed's recipe.

Data, model and collators are the package's own (data/packing.py, data/collator.py,
modeling/model.py), so the bench times what `train` runs.
"""

from __future__ import annotations

import gc
import platform
import random
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

from mistral_qlora.modeling.random7b import RANDOM_7B, ensure_random_7b

SEED_RECIPE = "padded+sdpa (seed)"
PACKED_BACKENDS = ("sdpa", "flex", "varlen", "flash_attention_2")
ALL_RECIPES = (SEED_RECIPE,) + tuple(f"packed+{b}" for b in PACKED_BACKENDS) + ("packed+eager",)


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
    recipes: list[str] | None = None  # default: the seed's and packed+ every usable backend
    sliding_window: str | int | None = "auto"
    gradient_checkpointing: bool = True
    lora_r: int = 16
    learning_rate: float = 1e-5
    dtype: str = "auto"
    seed: int = 0
    out: str | None = None


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
    vs_seed: float | None = None
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


def load_recipe_model(path: str, opts: BenchOptions, preparation: str, attention: str, dtype):
    """The 4-bit base with LoRA, prepared as the seed's tutorial does ('seed') or as train does ('ours')."""
    from mistral_qlora.config import LoraSection, ModelSection, QuantizationSection
    from mistral_qlora.modeling.model import add_lora, load_base_model

    device_map = {"": 0} if torch.cuda.is_available() else None
    model_cfg = ModelSection(name_or_path=path, sliding_window=opts.sliding_window)
    lora = LoraSection(r=opts.lora_r, alpha=2 * opts.lora_r)
    base = load_base_model(path, model_cfg, QuantizationSection(), attention, dtype, device_map=device_map)
    if preparation == "seed":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=opts.gradient_checkpointing)
        return add_lora(base, lora, gradient_checkpointing=False)
    return add_lora(base, lora, gradient_checkpointing=opts.gradient_checkpointing)


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


def recipe_batches(sample: Sample, recipe: str, opts: BenchOptions, pad_token_id: int, cu: bool):
    """(warm-up batches, timed batches) of collated tensors for one recipe, over the same sequences."""
    ex = sample.examples
    if recipe == SEED_RECIPE:
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


def time_recipe(model, warmup: list[dict], timed: list[dict], opts: BenchOptions, dtype) -> dict:
    device = next(p.device for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.learning_rate)
    autocast_dtype = dtype if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else None
    model.train()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for batch in warmup:
        train_step(model, batch, optimizer, params, device, autocast_dtype)
    _sync(device)
    losses = []
    started = time.perf_counter()
    for batch in timed:
        losses.append(train_step(model, batch, optimizer, params, device, autocast_dtype))
    _sync(device)
    seconds = time.perf_counter() - started
    real, slots = map(sum, zip(*(_real_and_slots(b) for b in timed)))
    del optimizer
    return {
        "steps": len(timed),
        "real_tokens": real,
        "slots": slots,
        "seconds": round(seconds, 4),
        "tokens_per_second": real / seconds,
        "padding_fraction": 1 - real / slots,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "mean_loss": float(torch.stack(losses).float().mean()),
    }


# ---------------------------------------------------------------------------------------------
# The run


def default_recipes(dtype) -> list[str]:
    from mistral_qlora.modeling.attention import usable_backends

    usable = usable_backends(dtype)
    return [SEED_RECIPE] + [f"packed+{b}" for b in PACKED_BACKENDS if usable[b] is None]


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

    dtype = resolve_dtype(opts.dtype)
    recipes = opts.recipes or default_recipes(dtype)
    unknown = [r for r in recipes if r not in ALL_RECIPES]
    if unknown:
        raise UserError(f"--recipes: unknown {', '.join(unknown)} (choose from {', '.join(ALL_RECIPES)})")
    usable = usable_backends(dtype)
    for r in recipes:
        backend = r.removeprefix("packed+")
        if r != SEED_RECIPE and usable[backend] is not None:
            raise UserError(f"--recipes {r}: {usable[backend]}")

    path = resolve_bench_model(opts)
    vocab_size = AutoConfig.from_pretrained(path).vocab_size
    sample = build_sample(opts, path, vocab_size)
    pad_token_id = 0  # <unk>: masked out anyway

    results: list[RecipeResult] = []
    model, prepared = None, None
    for recipe in recipes:
        seed = recipe == SEED_RECIPE
        attention = "sdpa" if seed else recipe.removeprefix("packed+")
        preparation = "seed" if seed else "ours"
        res = RecipeResult(recipe, "padded" if seed else "packed", attention,
                           "prepare_model_for_kbit_training" if seed else "ours")
        print(f"bench: {recipe} ...", flush=True)
        try:
            if prepared != preparation:
                model, prepared = None, None
                _free_memory()
                model = load_recipe_model(path, opts, preparation, attention, dtype)
                prepared = preparation
            set_attention(model, attention)
            warm, timed = recipe_batches(sample, recipe, opts, pad_token_id, cu=attention in TAKES_CU_SEQLENS)
            for k, v in time_recipe(model, warm, timed, opts, dtype).items():
                setattr(res, k, v)
        except Exception as exc:  # one backend failing must not lose the others' numbers
            res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            print(f"bench: {recipe} failed: {res.error}", flush=True)
            _free_memory()
        results.append(res)
    model = None
    _free_memory()

    base = next((r.tokens_per_second for r in results if r.recipe == SEED_RECIPE and r.tokens_per_second), None)
    for r in results:
        if base and r.tokens_per_second:
            r.vs_seed = r.tokens_per_second / base
    timed_seqs = sum(len(row) for row in sample.timed_rows)
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
        "options": asdict(opts),
        "results": [asdict(r) for r in results],
    }
    if opts.out:
        from mistral_qlora.artifacts import write_json

        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(opts.out), report)
    return report


def format_report(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"bench: {report['model']} on {env['device']}, {env['dtype']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, {report['date']}",
        f"lengths: {report['lengths']}",
        f"timed: {report['timed_rows']} rows of {report['tokens_per_row']} tokens = {report['timed_sequences']} "
        f"sequences (packing efficiency {report['packing_efficiency']:.1%}); padded batches of "
        f"{report['padded_batch_size']} on the same sequences; LoRA r={report['lora_r']}, "
        f"activation checkpointing {'on' if report['gradient_checkpointing'] else 'off'}",
        "",
        f"| {'recipe':<22} | {'real tok/s':>10} | {'padding':>7} | {'peak GiB':>8} | {'vs seed':>7} | {'steps':>5} |",
        f"|{'-' * 24}|{'-' * 11}:|{'-' * 8}:|{'-' * 9}:|{'-' * 8}:|{'-' * 6}:|",
    ]

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    for r in report["results"]:
        if r["error"]:
            lines.append(f"| {r['recipe']:<22} | failed: {r['error']}")
            continue
        lines.append(
            f"| {r['recipe']:<22} | {fmt(r['tokens_per_second'], ',.0f'):>10} | "
            f"{fmt(r['padding_fraction'], '.1%'):>7} | {fmt(r['peak_memory_gib'], '.1f'):>8} | "
            f"{fmt(r['vs_seed'], '.2f') + 'x' if r['vs_seed'] else 'n/a':>7} | {r['steps']:>5} |"
        )
    return "\n".join(lines)

