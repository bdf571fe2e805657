"""One optimizer step as the Trainer takes it, and a recipe's timed passes.

A step: forward under autocast in the compute dtype, loss = sum over answer tokens / their count
(what the Trainer computes with `num_items_in_batch`), backward, gradient clipping at 1.0, AdamW.
After the warm-up steps (kernel compilation, allocator growth) each pass over the timed rows runs
between two device synchronisations; a recipe's tokens/s is the median of its passes.
"""

from __future__ import annotations

import statistics
import time

import torch

from mistral_qlora.bench.gpu_clocks import gpu_sampler
from mistral_qlora.data.tokenize import IGNORE_INDEX


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(model, batch: dict, optimizer, params, device, autocast_dtype, max_grad_norm: float = 1.0):
    """One optimizer step: loss = sum over answer tokens / their count, as the Trainer takes it."""
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


def real_and_slots(batch: dict) -> tuple[int, int]:
    """(real tokens, computed slots) of a batch: padding is computed but not real."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), batch["input_ids"].numel()
    return batch["input_ids"].numel(), batch["input_ids"].numel()


def training_setup(model, learning_rate: float, dtype):
    """(device, trainable parameters, AdamW, autocast dtype or None) for timing `train_step`s."""
    device = next(p.device for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, fused=device.type == "cuda")
    autocast_dtype = dtype if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else None
    model.train()
    return device, params, optimizer, autocast_dtype


def time_recipe(model, warmup: list[dict], timed: list[dict], repeats: int, learning_rate: float, dtype) -> dict:
    """Warm up, then `repeats` timed passes over the timed batches: the fields of a RecipeResult."""
    device, params, optimizer, autocast_dtype = training_setup(model, learning_rate, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for batch in warmup:
        train_step(model, batch, optimizer, params, device, autocast_dtype)
    sync(device)
    losses, passes = [], []
    with gpu_sampler(device) as clocks:  # the clock the passes ran at: a power cap lowers it
        for _ in range(repeats):  # later passes show whether warm-up was still inside the first
            started = time.perf_counter()
            for batch in timed:
                losses.append(train_step(model, batch, optimizer, params, device, autocast_dtype))
            sync(device)
            passes.append(time.perf_counter() - started)
    seconds = statistics.median(passes)
    real, slots = map(sum, zip(*(real_and_slots(b) for b in timed)))
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
