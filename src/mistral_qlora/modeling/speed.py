"""The levers that make a step fast: fused kernels and how many layers recompute their activations.

- `apply_kernels`: Liger's Triton kernels (RoPE, RMSNorm, SwiGLU, and linear + cross-entropy fused
  so the [tokens x 32000] logits are never materialised), applied to the model instance through
  Liger's own API, before LoRA wraps the linears.
- `plan_checkpointing`: how many decoder layers recompute in backward. Recompute costs a third of
  the step's FLOPs (6N instead of 4N per token); memory decides how many layers must pay it. `auto`
  checkpoints as few as fit the GPU, `train.memory: low` all of them.
- `set_checkpointed_layers`: turns recompute on for the first k layers only, through each decoder
  layer's own `gradient_checkpointing` switch (transformers' GradientCheckpointingLayer).
- `plan_kept_weights` / `set_kept_weights`: which layers' fused LoRA linears keep the 16-bit
  weights their forward dequantized for backward, instead of dequantizing them again: the
  checkpointed ones (from recompute to backward), and as many others as the memory left over
  holds (for the whole run: dequantized once, not once a step).
"""

from __future__ import annotations

import importlib.util
import math

from mistral_qlora.errors import UserError

GIB = 2**30
# Head-room kept free when `auto` spends memory on skipping recompute and keeping weights
# (allocator fragmentation, the optimizer's first step, evaluation batches), on top of what
# `gpu_budget` leaves out, in proportion to how far the memory estimate can be off. The fast
# path's estimate counts what each op keeps and comes out 0.3-0.4 GiB under the measured peaks
# (9.2, 56.8 and 69.8 GiB; docs/benchmarks.md): 4% of the budget, at least 1 GiB; 2.9 GiB on an
# 80 GB card, where an H200 capped to an H100's memory ran all 32 layers with their weights kept
# (~70 GiB, evaluation included) 8 GiB below the allocator's limit. The rule for PEFT's layers is
# within ~10%: 10% (at 15%, auto recomputed 2 layers that fit, 3% of the step).
FAST_PATH_HEADROOM = 0.04
FAST_PATH_HEADROOM_MIN = GIB
HEADROOM = 0.10


def auto_headroom(cfg, kernels: str, budget: int, strategy: str = "single") -> int:
    """Bytes of the GPU budget that `auto` leaves free beyond this run's memory estimate."""
    from mistral_qlora.distributed import counts_fast_path

    if counts_fast_path(cfg, kernels == "liger", strategy):
        return max(int(FAST_PATH_HEADROOM * budget), FAST_PATH_HEADROOM_MIN)
    return int(HEADROOM * budget)


def kernels_usable() -> str | None:
    """None when Liger can run here, else why not."""
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (Liger's kernels are Triton)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "needs the liger-kernel package (pip install mistral-qlora[kernels])"
    return None


def select_kernels(requested: str) -> str:
    why_not = kernels_usable()
    if requested == "auto":
        return "liger" if why_not is None else "none"
    if requested == "liger" and why_not is not None:
        raise UserError(f"model.kernels=liger: {why_not}; use model.kernels=auto")
    return requested


def apply_kernels(model, kernels: str) -> None:
    """Patch the (not yet LoRA-wrapped) model instance with the chosen kernels."""
    if kernels != "liger":
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)


def checkpointed_layers_for(setting, num_layers: int) -> int | None:
    """Layers to checkpoint for an explicit setting; None for `auto`."""
    if setting == "auto":
        return None
    if setting is True:
        return num_layers
    if setting is False:
        return 0
    return max(1, min(num_layers, math.ceil(setting * num_layers)))


def plan_checkpointing(cfg, model_config, dtype_bytes: int, kernels: str, budget: int | None,
                       strategy: str = "single", world_size: int = 1) -> tuple[int, str]:
    """(layers to checkpoint, why) for this run."""
    from mistral_qlora.distributed import estimate_memory

    L = model_config.num_hidden_layers
    explicit = checkpointed_layers_for(cfg.train.gradient_checkpointing, L)
    if explicit is not None:
        return explicit, "set in the run config"
    if cfg.train.memory == "low":
        return L, "auto with train.memory=low: every layer"
    if budget is None:
        return L, "auto without a GPU: every layer"
    headroom = auto_headroom(cfg, kernels, budget, strategy)
    usable = budget - headroom
    # The fewest recomputing layers whose estimate fits (all of them if none does). Each layer
    # recomputed keeps only its input, but the first one also brings the recompute's own buffers
    # (one layer's activations and weights), so the estimate is not linear in k.
    for k in range(L + 1):
        need = estimate_memory(model_config, cfg, dtype_bytes, checkpointed_layers=k,
                               fused_loss=kernels == "liger").per_gpu(strategy, world_size)
        if need <= usable:
            break
    return k, (f"auto: {k} of {L} layers recompute; ~{need / GIB:.1f} GiB estimated "
               f"of {budget / GIB:.1f} GiB usable ({headroom / GIB:.1f} GiB kept free)")


def plan_kept_weights(cfg, model_config, dtype_bytes: int, kernels: str, budget: int | None, checkpointed: int,
                      strategy: str = "single", world_size: int = 1) -> tuple[int, str]:
    """(layers, among those not checkpointed, whose fused LoRA linears keep their dequantized
    16-bit weights for the whole run, why). Dequantizing in every forward and again in backward
    cost about 4% of a Mistral-7B step (docs/benchmarks.md); keeping costs a layer's linears in 16
    bits (0.4 GiB for Mistral-7B), which such a layer holds at the step's peak (the end of forward)
    whether it keeps them between steps or not, so `auto` keeps as many as the memory left after
    `plan_checkpointing` holds, with the same head-room. Checkpointed layers always keep theirs
    from their recompute to their backward, one layer at a time."""
    from mistral_qlora.distributed import estimate_memory, kept_weight_bytes

    L = model_config.num_hidden_layers
    if not (cfg.lora.fused and cfg.quantization.bits == 4) or strategy in ("zero3", "zero3_offload"):
        return 0, "PEFT's LoRA layers dequantize in backward"
    if cfg.train.memory == "low" or budget is None or checkpointed >= L:
        why = "train.memory=low" if cfg.train.memory == "low" else "no GPU" if budget is None else "every layer recomputes"
        return 0, f"{why}: checkpointed layers only"
    need = estimate_memory(model_config, cfg, dtype_bytes, checkpointed_layers=checkpointed,
                           fused_loss=kernels == "liger")
    per_layer = kept_weight_bytes(model_config, cfg, dtype_bytes)
    spare = budget - auto_headroom(cfg, kernels, budget, strategy) - need.per_gpu(strategy, world_size)
    n = max(0, min(L - checkpointed, int(spare // per_layer)))
    return n, (f"{n} of {L - checkpointed} layers not recomputed keep their dequantized weights for the whole run "
               f"(+{n * per_layer / GIB:.1f} GiB)")


def set_kept_weights(model, checkpointed: int, kept: int) -> None:
    """Have the fused LoRA linears of the first `checkpointed` decoder layers (those that
    recompute) keep their dequantized weights from recompute to backward, and those of the last
    `kept` layers keep them for the whole run (dequantized once, not once per forward: such a
    layer holds its weights at the step's peak either way)."""
    from mistral_qlora.modeling.fused_lora import FusedLoraLinear4bit

    layers = _decoder_layers(model)
    for i, layer in enumerate(layers):
        recomputes = i < checkpointed
        cache = not recomputes and i >= len(layers) - kept
        for module in layer.modules():
            if isinstance(module, FusedLoraLinear4bit):
                module.keep_dequantized_weight = recomputes or cache
                module.cache_dequantized_weight = cache
                if not cache:
                    module.drop_dequantized_weight()


# The fast path's levers that can be switched off on a loaded model, for one-process A/Bs
# (`mistral-qlora bench --compare`), and what the model does without each.
LEVERS = {
    "kept-weights": "every fused layer dequantizes its weight in forward and again in backward",
    "cached-weights": "layers that keep their weights dequantize them in every forward (kept for backward only)",
    "shared-input-grad": "autograd adds up the input gradients of q/k/v and of gate/up",
    "product-first": "each base GEMM writes its output and the LoRA product kernel reads it back to add its share",
}


class LeverSwitch:
    """Switches levers of one model off, and back to what the plan set (`LEVERS`)."""

    def __init__(self, model):
        from mistral_qlora.modeling.fused_lora import FusedLoraLinear4bit

        self._planned = [(m, m.keep_dequantized_weight, m.cache_dequantized_weight, m.input_group, m.product_first)
                         for m in model.modules() if isinstance(m, FusedLoraLinear4bit)]

    def set_off(self, levers=()) -> None:
        off = set(levers)
        if off - set(LEVERS):
            raise ValueError(f"unknown levers {sorted(off - set(LEVERS))}; known: {list(LEVERS)}")
        for m, keep, cache, group, product_first in self._planned:
            m.keep_dequantized_weight = keep and "kept-weights" not in off
            m.cache_dequantized_weight = cache and not off & {"kept-weights", "cached-weights"}
            if not m.cache_dequantized_weight:
                m.drop_dequantized_weight()
            m.input_group = None if "shared-input-grad" in off else group
            m.product_first = product_first and "product-first" not in off


def _decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder().layers if hasattr(base, "get_decoder") else base.model.layers


def set_checkpointed_layers(model, k: int, reentrant: bool = False) -> None:
    """Recompute the first k decoder layers in backward, keep the others' activations."""
    if k <= 0:
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    for i, layer in enumerate(_decoder_layers(model)):
        layer.gradient_checkpointing = i < k
