"""One training step under torch.profiler: where the GPU's time goes, by kind of kernel."""

from __future__ import annotations

import time

import torch

from mistral_qlora.bench.gpu_clocks import gpu_sampler
from mistral_qlora.bench.timing import sync, train_step

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
    """GPU time by kind of kernel (ms and share of the step's wall time, the GPU's idle time
    included as its own kind), the kernels that took the most time, and the SM clock the step ran
    at. The step starts on an idle GPU, so where the timed passes ran into the power cap it runs at
    a higher clock than they did (the report shows both clocks)."""
    from torch.profiler import ProfilerActivity, profile

    device = next(p.device for p in model.parameters())
    if device.type != "cuda":
        return {}, [], None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    train_step(model, batch, optimizer, params, device, dtype)  # warm the optimizer state
    sync(device)
    with gpu_sampler(device) as clocks, profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        train_step(model, batch, optimizer, params, device, dtype)
        sync(device)
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
    # lands here too, so it is an upper bound on what a step without the profiler waits.
    totals[IDLE_KIND] = max(0.0, wall_ms - sum(totals.values()))
    all_ms = sum(totals.values()) or 1.0
    by_kind = {k: {"ms": round(v, 1), "share": round(v / all_ms, 3)} for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    return by_kind, sorted(kernels, key=lambda k: -k["ms"])[:PROFILE_TOP_KERNELS], clocks.summary
