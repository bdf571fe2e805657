"""The run's plan: every decision taken from the config, the checkpoint's shapes and this machine,
before a weight is loaded.

`make_plan` (here) is what `train` and `bench` both call; each decision comes with the reason it
is what it is. The model is then built from the plan (model/build.py) and nothing downstream
decides again.

- strategy.py: how the run is spread over processes (`train.strategy`) and its DeepSpeed config
- backends.py: the attention backend and kernels this machine can run and the run takes; FP8
- layers.py: the LoRA layer (fused or PEFT's), which layers recompute, which keep their weights
- memory.py: the memory estimate the other decisions rest on (shapes only, no torch)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mistral_qlora.config import RunConfig
from mistral_qlora.errors import UserError
from mistral_qlora.plan.backends import fp8_problem, select_attention, select_kernels
from mistral_qlora.plan.layers import (LayerPlan, check_host_memory, compute_for, lora_layer, plan_kept_weights,
                                      plan_mlp_tile, plan_offload, plan_recompute)
from mistral_qlora.plan.memory import estimate_memory, fused_loss_for
from mistral_qlora.plan.strategy import is_zero3, plan_strategy
from mistral_qlora.runtime import Runtime, host_ram, processes_per_host


@dataclass(frozen=True)
class Plan:
    strategy: str
    ds_config: Path | None  # the DeepSpeed config file for a DeepSpeed strategy
    attention: str  # model.attention resolved: flash_attention_2, varlen, flex, sdpa or eager
    kernels: str  # model.kernels resolved: liger or none
    layers: LayerPlan
    why: dict  # decision -> the reason, for the log
    fused_loss: bool = False  # Liger's fused lm_head + cross-entropy applied (memory.fused_loss_for)

    @property
    def zero3(self) -> bool:
        return is_zero3(self.strategy)

    def log_lines(self, cfg: RunConfig) -> list[str]:
        lines = [f"train.strategy={self.strategy} ({self.why['strategy']})",
                 f"train.gradient_checkpointing={cfg.train.gradient_checkpointing} ({self.why['recompute']}); "
                 f"model.kernels={self.kernels}",
                 f"train.activation_offload={self.layers.offload} ({self.why['offload']})",
                 f"train.tiled_mlp: tiles of {self.layers.mlp_tile or 'none'} tokens ({self.why['mlp_tile']})",
                 f"lora: {self.why['lora_layer']}"]
        if self.layers.fused:
            lines.append(f"lora: dequantized weights kept for backward: {self.why['kept_for_run']}")
            lines.append(f"quantization.compute={self.layers.compute} ({self.why['compute']})")
        if self.kernels == "liger" and not self.fused_loss:
            lines.append(f"model.kernels=liger: RoPE, RMSNorm and SwiGLU only ({self.why['loss']})")
        if lora_variants(cfg):
            lines.append(f"lora: variants {', '.join(lora_variants(cfg))}")
        return lines


def lora_variants(cfg: RunConfig) -> list[str]:
    """The LoRA variants and training tricks in force, as summary.json and the plan log name them."""
    lora, t = cfg.lora, cfg.train
    named = [("rslora", lora.rslora), ("dora", lora.dora),
             (f"loraplus(ratio={lora.plus_lr_ratio:g})" if lora.plus_lr_ratio else "", lora.plus_lr_ratio),
             (f"neftune(alpha={t.neftune_alpha:g})" if t.neftune_alpha else "", t.neftune_alpha),
             (f"modules_to_save={','.join(lora.modules_to_save)}", lora.modules_to_save)]
    return [name for name, on in named if on]


def check_variants(cfg: RunConfig, strategy: str) -> None:
    """LoRA variants the strategy cannot run, refused before a weight loads. Under ZeRO-3 the base
    is loaded block by block straight into 4-bit partitions (model/zero3.py): DoRA's magnitudes
    start from the norms of the whole weights and `modules_to_save` copies whole modules, neither
    of which a rank holding a slice can do. An explicit `train.strategy: zero3` is refused in
    load_config (config.config_problems); this refuses `auto` that resolved to ZeRO-3."""
    if not is_zero3(strategy):
        return
    asked = [k for k, on in (("lora.dora", cfg.lora.dora), ("lora.modules_to_save", cfg.lora.modules_to_save)) if on]
    if asked:
        raise UserError(f"{' and '.join(asked)} cannot run with train.strategy={strategy} (each rank holds a "
                        "slice of the base weights); use train.strategy=ddp or single, or turn them off")


def make_plan(cfg: RunConfig, model_config, rt: Runtime, env=None, available_host_ram: int | None = None) -> Plan:
    """The plan for this run on `rt.world_size` processes, with `rt`'s device and dtype;
    `available_host_ram`: the host memory an offloading run may use (default: what is available
    now)."""
    env = os.environ if env is None else env  # read now: `datasets` rebinds os.environ
    attention = select_attention(cfg.model.attention, rt.dtype)
    kernels = select_kernels(cfg.model.kernels)
    budget = rt.gpu_budget()
    dtype_bytes = rt.dtype.itemsize
    strategy, strategy_why, ds_config = plan_strategy(cfg, rt.world_size, model_config, dtype_bytes, budget, env)
    check_variants(cfg, strategy)
    layer, layer_why = lora_layer(cfg, strategy)
    compute, compute_why = compute_for(cfg, layer, strategy,
                                       fp8_problem(rt.dtype) if cfg.quantization.compute == "fp8" else None, rt.dtype)
    offload, offload_why = plan_offload(cfg, model_config, dtype_bytes, kernels, budget, strategy, rt.world_size)
    mlp_tile, mlp_tile_why = plan_mlp_tile(cfg, model_config, dtype_bytes, kernels, budget, strategy,
                                           rt.world_size, offload)
    recompute, recompute_why = plan_recompute(cfg, model_config, dtype_bytes, kernels, budget, strategy,
                                              rt.world_size, offload, mlp_tile)
    if offload and recompute == 0:
        offload, offload_why = False, "no layer recomputes, so no layer input waits for backward"
    if mlp_tile and recompute == 0:
        mlp_tile, mlp_tile_why = 0, "no layer recomputes, so no MLP is tiled"
    if offload:
        host = estimate_memory(model_config, cfg, dtype_bytes, recompute_layers=recompute,
                               fused_loss=kernels == "liger", offload=True).host_activations
        available = host_ram() if available_host_ram is None else available_host_ram
        offload_why += "; " + check_host_memory(host, processes_per_host(rt.world_size, env), available)
    kept, kept_why = plan_kept_weights(cfg, model_config, dtype_bytes, kernels, budget, recompute, strategy,
                                       rt.world_size, offload, mlp_tile)
    layers = LayerPlan(lora_layer=layer, recompute=recompute, kept_for_run=kept, reentrant=is_zero3(strategy),
                       compute=compute, offload=offload, mlp_tile=mlp_tile)
    fused_loss = fused_loss_for(cfg, kernels)
    why = {"strategy": strategy_why, "lora_layer": layer_why, "recompute": recompute_why, "kept_for_run": kept_why,
           "compute": compute_why, "offload": offload_why, "mlp_tile": mlp_tile_why,
           "loss": ("Liger's lm_head fused with the cross-entropy" if fused_loss else
                    f"train.method={cfg.train.method} scores each record from its own logits "
                    "(run/preference.py), so Liger's fused lm_head + cross-entropy is not applied"
                    if kernels == "liger" else "the lm_head's logits, then the loss")}
    return Plan(strategy, ds_config, attention, kernels, layers, why, fused_loss)
