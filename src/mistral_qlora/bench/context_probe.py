"""One probe of `bench --max-context`, in a process of its own: does one row of N tokens train?

`python -m mistral_qlora.bench.context_probe SPEC_JSON` builds the recipe's model as `bench` does
(recipes.py: `make_plan` + `build_model`), with the GPU capped at the budget by
`torch.cuda.set_per_process_memory_fraction` and the plan told that budget, so recompute and
activation offload are what `auto` chooses at this length on a card of that size. It trains one
full step (forward, backward, clipping, AdamW: timing.py's `train_step`) on one record of N
random tokens (a packed row of one sequence), and, when that fits and timing is asked for, a
second step timed after it (the first warms up kernels and the allocator). The last line on
stdout is `PROBE_RESULT {json}`: whether it fit (an out-of-memory error, or the plan refusing the
host memory offload needs, means it did not), the peaks of GPU memory allocated and reserved,
the process's peak host RSS, tokens/s, and the plan's choices with its estimate at this length.

Every probe is a fresh process so that an out-of-memory error never leaves the allocator of the
next one fragmented or poisoned.

`MISTRAL_QLORA_FAKE_TOKENS_PER_GIB` (tests only): a budget of B GiB "fits" at most B times that
many tokens, the probe raising an out-of-memory error past it where its step would start, so the
search and this plumbing run end to end on a CPU with a tiny model.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch

from mistral_qlora.runtime import GIB, Runtime

FAKE_TOKENS_PER_GIB = "MISTRAL_QLORA_FAKE_TOKENS_PER_GIB"
RESULT_PREFIX = "PROBE_RESULT "
PAD_TOKEN_ID = 0


@dataclass
class BudgetRuntime(Runtime):
    """A runtime whose GPU budget is the probe's, not the card's."""

    budget: int | None = None

    def gpu_budget(self) -> int | None:
        return self.budget


def plan_budget(cap: int) -> int:
    """What the plan may use of an allocator cap of `cap` bytes: the cap less the slack
    runtime.gpu_budget keeps on a whole card (8%, at least 1 GiB)."""
    return cap - max(GIB, int(0.08 * cap))


def cap_gpu(budget_gib: float | None) -> tuple[int, float]:
    """Cap this process's allocator at `budget_gib` (None: the whole card); (cap bytes, card GiB)."""
    total = torch.cuda.get_device_properties(0).total_memory
    cap = total if budget_gib is None else min(total, int(budget_gib * GIB))
    torch.cuda.set_per_process_memory_fraction(cap / total, 0)
    return cap, total / GIB


def host_peak_gib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss * (1 if sys.platform == "darwin" else 1024) / GIB


def run_probe(spec: dict) -> dict:
    """The probe `spec` asks for (keys: model_path, recipe, tokens, budget_gib, lora_r,
    sliding_window, dtype, seed, timed); the result's fields as max_context.Probe names them."""
    from mistral_qlora.bench.options import BenchOptions
    from mistral_qlora.bench.recipes import Recipe, recipe_config
    from mistral_qlora.bench.synthetic import token_examples
    from mistral_qlora.bench.timing import sync, train_step, training_setup
    from mistral_qlora.config import ModelSection
    from mistral_qlora.data.collator import PackedCollator
    from mistral_qlora.errors import UserError
    from mistral_qlora.model.attention import TAKES_CU_SEQLENS
    from mistral_qlora.model.base import load_model_config
    from mistral_qlora.model.build import build_model
    from mistral_qlora.plan import make_plan
    from mistral_qlora.plan.memory import estimate_memory

    n, budget_gib, path = spec["tokens"], spec["budget_gib"], spec["model_path"]
    rt = Runtime.detect(spec["dtype"])
    result = {"tokens": n, "fits": False}
    budget = None
    if rt.device == "cuda":
        cap, card = cap_gpu(budget_gib)
        budget = plan_budget(cap)
        result["card_gib"] = round(card, 2)
    rt = BudgetRuntime(**asdict(rt), budget=budget)
    opts = BenchOptions(model=path, tokens_per_row=n, max_len=n, lora_r=spec["lora_r"],
                        sliding_window=spec["sliding_window"], dtype=spec["dtype"], seed=spec["seed"])
    recipe = Recipe.parse(spec["recipe"])
    model_config = load_model_config(path, ModelSection(name_or_path=path, sliding_window=opts.sliding_window))
    cfg = recipe_config(recipe, opts, path)
    try:
        plan = make_plan(cfg, model_config, rt)
    except UserError as exc:  # the host memory offloading needs is not there: this length does not train
        return {**result, "error": f"plan: {exc}", "host_gib": round(host_peak_gib(), 2)}
    layers = plan.layers
    estimate = estimate_memory(model_config, cfg, rt.dtype.itemsize, recompute_layers=layers.recompute,
                               fused_loss=plan.kernels == "liger", kept_weight_layers=layers.kept_for_run,
                               offload=layers.offload, mlp_tile=layers.mlp_tile)
    result.update(recompute=layers.recompute, offload=layers.offload, kept_for_run=layers.kept_for_run,
                  mlp_tile=layers.mlp_tile,
                  estimate_gib=round(estimate.per_gpu(plan.strategy) / GIB, 3),
                  estimate_host_gib=round(estimate.host_activations / GIB, 3))
    fake = os.environ.get(FAKE_TOKENS_PER_GIB)
    try:
        model = build_model(cfg, plan, rt, path, model_config, PAD_TOKEN_ID)[0]
        row = PackedCollator(with_cu_seqlens=plan.attention in TAKES_CU_SEQLENS)(
            [token_examples([n], model_config.vocab_size, spec["seed"])])
        device, params, optimizer, autocast_dtype = training_setup(model, opts.learning_rate, rt.dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if fake is not None and budget_gib is not None and n > float(fake) * budget_gib:
            raise torch.OutOfMemoryError(f"{FAKE_TOKENS_PER_GIB}: {n} tokens > {fake} x {budget_gib:g} GiB")
        started = time.perf_counter()
        train_step(model, row, optimizer, params, device, autocast_dtype)
        sync(device)
        seconds = time.perf_counter() - started
        result["first_step_s"] = round(seconds, 3)
        if spec.get("timed", True):
            started = time.perf_counter()
            train_step(model, row, optimizer, params, device, autocast_dtype)
            sync(device)
            seconds = time.perf_counter() - started
            result["timed_step_s"] = round(seconds, 3)
        result.update(fits=True, tokens_per_s=round(n / seconds, 1))
    except torch.OutOfMemoryError as exc:
        result["error"] = f"out of memory: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    if rt.device == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        result["reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
    result["host_gib"] = round(host_peak_gib(), 2)
    return result


def main(argv: list[str]) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(RESULT_PREFIX + json.dumps(run_probe(json.loads(argv[0]))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
