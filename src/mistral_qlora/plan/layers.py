"""How each decoder layer runs: which LoRA layer, which layers recompute, which keep their weights.

- The LoRA layer (`lora_layer`): on a 4-bit base the fused layer (kernels/fused_lora.py) folds each
  adapter into its base matmul (rsLoRA too: only the scale differs); PEFT's own layers run under
  ZeRO-3 (DeepSpeed gathers the partitioned weights through module hooks the fused layer would
  bypass), on a 16-bit base, with DoRA (its per-step weight norms are not in the fused function),
  and with `lora.fused: false`.
- Recompute (`plan_recompute`): the first k decoder layers recompute their activations in
  backward. Recompute costs a third of a step's FLOPs (6N instead of 4N per token), so memory
  decides how many layers pay it: `auto` as few as fit the GPU, `train.memory: low` all of them.
- Kept weights (`plan_kept_weights`): a fused layer dequantizes its 4-bit weight in forward and,
  unless told to keep it, again in backward. Recomputing layers keep it from their recompute to
  their backward (one layer at a time). Of the others, as many as the memory left over holds keep
  it for the whole run: dequantized once, not once a step. Such a layer holds its 16-bit weights
  at the step's peak (the end of forward) whether it keeps them between steps or not.

- Activation offload (`plan_offload`): the recomputing layers' inputs held in host memory
  (model/offload.py). It costs a copy out and back per layer and a step, so `auto` takes it only
  when the run would not fit the GPU otherwise (every layer recomputing), and `check_host_memory`
  refuses a run whose offloaded inputs and process reserve exceed the host's available memory.

- Tiled MLP (`plan_mlp_tile`): the recomputing layers' MLPs computed over sequence tiles
  (model/tiling.py). It costs one more forward of the MLP per step, so `auto` takes it only when
  the row would not fit otherwise with every layer recomputing and offload as `plan_offload`
  chose. A tile is `hidden_size` tokens (ALST's choice): its gate/up intermediates are then the
  size of one MLP weight matrix, whatever the row's length, and each of its matmuls has thousands
  of rows, enough to keep the GPU's matrix units busy. Not under ZeRO-3, whose parameter hooks
  gather a layer's weights around the layer's forward, not the backward's passes over tiles.

`auto` keeps a head-room free beyond the estimate in proportion to how far the estimate can be
off: the fast path's op-by-op count (plan/memory.py) lands a few tenths of a GiB from measured
peaks, so a small share of the budget with a 1 GiB floor; the rule for PEFT's layers is coarser, so
a larger share (docs/benchmarks.md compares both with measured peaks). The head-room also covers
allocator fragmentation, the optimizer's first step and evaluation batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mistral_qlora.config import RunConfig
from mistral_qlora.errors import UserError
from mistral_qlora.plan.memory import (GIB, ZERO3, counts_fast_path, estimate_memory, fused_lora, kept_weight_bytes,
                                       layer_shapes, recompute_layers_for)

# What one training process holds in host memory besides offloaded activations: the interpreter,
# torch's and CUDA's libraries and context, the pinned staging of loading, data pages.
HOST_RESERVE = 4 * GIB
FAST_PATH_HEADROOM = 0.04
FAST_PATH_HEADROOM_MIN = GIB
HEADROOM = 0.10


@dataclass(frozen=True)
class LayerPlan:
    """What model/lora.py applies to the decoder layers."""

    lora_layer: str  # "fused" (kernels/fused_lora.py) or "peft"
    recompute: int  # the first `recompute` decoder layers recompute in backward
    kept_for_run: int = 0  # the last `kept_for_run` layers keep their dequantized weights for the whole run
    reentrant: bool = False  # reentrant recompute (ZeRO-3 + PEFT refuses the non-reentrant kind)
    offload: bool = False  # the recomputing layers' inputs held in host memory (model/offload.py)
    mlp_tile: int = 0  # tokens per tile of the recomputing layers' MLPs (model/tiling.py); 0: untiled
    # The fused layer's levers; each on by default. `mistral-qlora bench --compare` times a plan
    # with one switched off against the plan itself.
    keep_weights: bool = True  # off: no layer keeps a dequantized weight, backward dequantizes again
    keep_across_steps: bool = True  # off: the kept_for_run layers keep theirs from forward to backward only
    shared_input_grad: bool = True  # q/k/v and gate/up sum their input gradient in one buffer
    product_first: bool = True  # the adapter's product written first, the base GEMM adding onto it
    compute: str = "bf16"  # the base weight's matmuls: bf16, or fp8 (e4m3, kernels/fp8.py)

    @property
    def fused(self) -> bool:
        return self.lora_layer == "fused"


def lora_layer(cfg: RunConfig, strategy: str) -> tuple[str, str]:
    """("fused" or "peft", why) for this run."""
    if fused_lora(cfg, strategy):
        return "fused", "the fused 4-bit LoRA layer (kernels/fused_lora.py)"
    if not cfg.lora.fused:
        return "peft", "lora.fused=false: PEFT's LoRA layers"
    if cfg.lora.dora and cfg.quantization.bits == 4 and strategy not in ZERO3:
        return "peft", ("lora.dora=true: PEFT's DoRA layers (DoRA rescales each output by the column norms of "
                        "W + scaling * B @ A, which changes every step; the fused layer computes plain LoRA only)")
    if cfg.quantization.bits != 4:
        return "peft", "a 16-bit base: PEFT's LoRA layers (the fused layer is for 4-bit linears)"
    return "peft", ("ZeRO-3: PEFT's LoRA layers (DeepSpeed gathers the partitioned 4-bit weights through "
                    "module hooks the fused layer would bypass)")


def compute_for(cfg: RunConfig, layer: str, strategy: str, fp8_problem: str | None, dtype: torch.dtype
                ) -> tuple[str, str]:
    """(`quantization.compute` for this run, why); fp8 where it cannot run is refused, never
    dropped: it runs in the fused layer only, on a GPU with FP8 tensor cores. What the config
    alone rules out (PEFT's layers, an explicit ZeRO-3, a 16-bit dtype) load_config has refused
    (config.config_problems); what is left here depends on the machine or the launcher: the GPU,
    and `train.strategy: auto` resolved to ZeRO-3. Otherwise the base's dequantized weight
    multiplies in the run's dtype (`model.dtype`: bf16 on a GPU that has it, float32 on a CPU),
    which is what the reason says."""
    if cfg.quantization.compute == "bf16":
        return "bf16", f"the base's matmuls in {str(dtype).removeprefix('torch.')}, the run's dtype (no FP8)"
    where = "quantization.compute=fp8"
    if fp8_problem is not None:
        raise UserError(f"{where} {fp8_problem}; set quantization.compute=bf16")
    if layer != "fused":
        _, why = lora_layer(cfg, strategy)
        raise UserError(f"{where} runs in the fused 4-bit LoRA layer only, and this run has {why}; "
                        "set quantization.compute=bf16")
    return "fp8", "the base's matmuls in FP8 e4m3 (per-token and per-channel scales, fp32 accumulation)"


def auto_headroom(cfg: RunConfig, kernels: str, budget: int, strategy: str = "single") -> int:
    """Bytes of the GPU budget that `auto` leaves free beyond this run's memory estimate."""
    if counts_fast_path(cfg, kernels == "liger", strategy):
        return max(int(FAST_PATH_HEADROOM * budget), FAST_PATH_HEADROOM_MIN)
    return int(HEADROOM * budget)


def plan_offload(cfg: RunConfig, model_config, dtype_bytes: int, kernels: str, budget: int | None,
                 strategy: str = "single", world_size: int = 1) -> tuple[bool, str]:
    """(whether the recomputing layers' inputs wait in host memory, why) for this run."""
    setting = cfg.train.activation_offload
    if setting is not True and setting is not False and recompute_layers_for(
            cfg.train.gradient_checkpointing, model_config.num_hidden_layers) == 0:
        return False, "auto: no layer recomputes (train.gradient_checkpointing=false)"
    if setting is True or setting is False:
        return setting, "set in the run config"
    if budget is None:
        return False, "auto without a GPU: the activations are in host memory already"
    usable = budget - auto_headroom(cfg, kernels, budget, strategy)
    fused = kernels == "liger"
    without = estimate_memory(model_config, cfg, dtype_bytes, recompute_layers=model_config.num_hidden_layers,
                              fused_loss=fused).per_gpu(strategy, world_size)
    if without <= usable:
        return False, (f"auto: off, every row fits the GPU without it (~{without / GIB:.1f} GiB of "
                       f"{usable / GIB:.1f} GiB usable with every layer recomputing)")
    with_it = estimate_memory(model_config, cfg, dtype_bytes, recompute_layers=model_config.num_hidden_layers,
                              fused_loss=fused, offload=True)
    return True, (f"auto: on, a row of {with_it.tokens_per_micro_batch} tokens needs ~{without / GIB:.1f} GiB "
                  f"with every layer recomputing, more than {usable / GIB:.1f} GiB usable; ~"
                  f"{with_it.per_gpu(strategy, world_size) / GIB:.1f} GiB with their inputs on the host "
                  f"({with_it.host_activations / GIB:.1f} GiB there)")


def mlp_tile_tokens(model_config) -> int:
    """Tokens per tile of a tiled MLP (module docstring): the hidden size."""
    return int(model_config.hidden_size)


def plan_mlp_tile(cfg: RunConfig, model_config, dtype_bytes: int, kernels: str, budget: int | None,
                  strategy: str = "single", world_size: int = 1, offload: bool = False) -> tuple[int, str]:
    """(tokens per tile of the recomputing layers' MLPs, 0 for untiled; why) for this run."""
    setting = cfg.train.tiled_mlp
    L = model_config.num_hidden_layers
    tile = mlp_tile_tokens(model_config)
    if setting is False:
        return 0, "set in the run config"
    if recompute_layers_for(cfg.train.gradient_checkpointing, L) == 0:
        return 0, "no layer recomputes (train.gradient_checkpointing=false)"
    if strategy in ZERO3:
        return 0, f"auto: off under {strategy} (DeepSpeed gathers a layer's weights around its forward only)"
    if setting is True:
        return tile, f"set in the run config: tiles of {tile} tokens"
    if budget is None:
        return 0, "auto without a GPU: off"
    if cfg.lora.dora:
        return 0, "auto: off with lora.dora (the estimate does not count DoRA's float32 activations tiled)"
    usable = budget - auto_headroom(cfg, kernels, budget, strategy)
    fused = kernels == "liger"
    where = " with their inputs on the host" if offload else ""
    without = estimate_memory(model_config, cfg, dtype_bytes, recompute_layers=L, fused_loss=fused,
                              offload=offload).per_gpu(strategy, world_size)
    if without <= usable:
        return 0, (f"auto: off, every row fits the GPU without it (~{without / GIB:.1f} GiB of {usable / GIB:.1f} "
                   f"GiB usable with every layer recomputing{where})")
    tiled = estimate_memory(model_config, cfg, dtype_bytes, recompute_layers=L, fused_loss=fused, offload=offload,
                            mlp_tile=tile)
    return tile, (f"auto: on, a row of {tiled.tokens_per_micro_batch} tokens needs ~{without / GIB:.1f} GiB with "
                  f"every layer recomputing{where}, more than {usable / GIB:.1f} GiB usable; ~"
                  f"{tiled.per_gpu(strategy, world_size) / GIB:.1f} GiB with the MLPs in tiles of {tile} tokens")


def check_host_memory(host_activations: int, processes: int, available: int) -> str:
    """A refusal (UserError) when `processes` processes offloading `host_activations` bytes each,
    each with its HOST_RESERVE, need more host memory than `available`; else the log line."""
    need = processes * (host_activations + HOST_RESERVE)
    what = (f"{processes} x ({host_activations / GIB:.1f} GiB offloaded activations + "
            f"{HOST_RESERVE / GIB:.0f} GiB per process)")
    if need > available:
        raise UserError(f"train.activation_offload: the run needs ~{need / GIB:.1f} GiB of host memory ({what}) "
                        f"and {available / GIB:.1f} GiB is available; shorten data.tokens_per_row or "
                        "data.max_seq_len, run fewer processes on this host, or free host memory")
    return f"host memory: ~{need / GIB:.1f} GiB of {available / GIB:.1f} GiB available ({what})"


def plan_recompute(cfg: RunConfig, model_config, dtype_bytes: int, kernels: str, budget: int | None,
                   strategy: str = "single", world_size: int = 1, offload: bool = False,
                   mlp_tile: int = 0) -> tuple[int, str]:
    """(layers that recompute in backward, why) for this run."""
    L = model_config.num_hidden_layers
    explicit = recompute_layers_for(cfg.train.gradient_checkpointing, L)
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
        need = estimate_memory(model_config, cfg, dtype_bytes, recompute_layers=k, fused_loss=kernels == "liger",
                               offload=offload, mlp_tile=mlp_tile).per_gpu(strategy, world_size)
        if need <= usable:
            break
    return k, (f"auto: {k} of {L} layers recompute; ~{need / GIB:.1f} GiB estimated "
               f"of {budget / GIB:.1f} GiB usable ({headroom / GIB:.1f} GiB kept free)")


def plan_kept_weights(cfg: RunConfig, model_config, dtype_bytes: int, kernels: str, budget: int | None,
                      recompute: int, strategy: str = "single", world_size: int = 1,
                      offload: bool = False, mlp_tile: int = 0) -> tuple[int, str]:
    """(layers, among those that do not recompute, that keep their dequantized weights for the
    whole run, why): as many as the memory left after `plan_recompute` holds, with the same
    head-room."""
    L = model_config.num_hidden_layers
    if not fused_lora(cfg, strategy):
        return 0, "PEFT's LoRA layers dequantize in backward"
    if cfg.train.memory == "low" or budget is None or recompute >= L:
        why = "train.memory=low" if cfg.train.memory == "low" else "no GPU" if budget is None else "every layer recomputes"
        return 0, f"{why}: recomputing layers only, from their recompute to their backward"
    need = estimate_memory(model_config, cfg, dtype_bytes, recompute_layers=recompute, fused_loss=kernels == "liger",
                           offload=offload, mlp_tile=mlp_tile)
    per_layer = kept_weight_bytes(layer_shapes(model_config, cfg.lora.target_modules), cfg, dtype_bytes)
    spare = budget - auto_headroom(cfg, kernels, budget, strategy) - need.per_gpu(strategy, world_size)
    n = max(0, min(L - recompute, int(spare // per_layer)))
    return n, (f"{n} of {L - recompute} layers that do not recompute keep them for the whole run "
               f"(+{n * per_layer / GIB:.1f} GiB)")
