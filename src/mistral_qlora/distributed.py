"""Spreading one run over processes: the strategies, their DeepSpeed configs, the memory estimate
behind `train.strategy=auto`, and the few rank helpers the run needs.

Strategies (`train.strategy`):
  single         one process, the plain Trainer path
  ddp            every process holds the whole 4-bit model; gradients are averaged (all-reduce)
  zero2          DeepSpeed ZeRO-2: optimizer state and gradients partitioned, the model replicated
  zero3          DeepSpeed ZeRO-3: the 4-bit base itself partitioned, gathered layer by layer
  zero3_offload  ZeRO-3 with the partitions and optimizer state kept in CPU memory
  auto           single for one process; ddp when the 4-bit model and activations fit one GPU,
                 zero3 when they do not (the estimate is `estimate_memory`, the rule `resolve_strategy`)

The DeepSpeed JSON files live in `ds_configs/` at the top of the repository; batch sizes,
accumulation, clipping and bf16 are "auto" there, so the run config stays the one source.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from mistral_qlora.errors import UserError

STRATEGIES = ("single", "ddp", "zero2", "zero3", "zero3_offload")
DEEPSPEED_FILES = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json"}
GIB = 2**30

# The decoder's linear layers (input features, output features) as functions of the config:
# what bitsandbytes quantizes and what LoRA's all-linear targets (lm_head stays in 16-bit).
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_deepspeed(strategy: str) -> bool:
    return strategy in DEEPSPEED_FILES


def is_zero3(strategy: str) -> bool:
    return strategy.startswith("zero3")


# ---------------------------------------------------------------------------------------------
# Where the launch files are


def project_dir(name: str) -> Path:
    """`ds_configs` or `launch`: $MISTRAL_QLORA_HOME/name, the source checkout's, or ./name."""
    candidates = []
    if os.environ.get("MISTRAL_QLORA_HOME"):
        candidates.append(Path(os.environ["MISTRAL_QLORA_HOME"]) / name)
    candidates += [Path(__file__).resolve().parents[2] / name, Path.cwd() / name]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise UserError(
        f"cannot find the {name}/ folder (looked in {', '.join(str(c) for c in candidates)}); "
        "run from the mistral-qlora checkout or set MISTRAL_QLORA_HOME to it"
    )


def ds_config_path(strategy: str) -> Path:
    path = project_dir("ds_configs") / DEEPSPEED_FILES[strategy]
    if not path.is_file():
        raise UserError(f"train.strategy={strategy}: {path} is missing")
    return path


def strategy_of_ds_config(config: dict) -> str:
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    if stage == 3:
        offload = (zero.get("offload_param") or {}).get("device", "none")
        return "zero3_offload" if offload not in (None, "none") else "zero3"
    if stage in (1, 2):
        return "zero2"
    raise UserError(f"DeepSpeed ZeRO stage {stage} is not supported here (use ZeRO-2 or ZeRO-3)")


# ---------------------------------------------------------------------------------------------
# Launchers: who started this process


def launched_processes(env=os.environ) -> int | None:
    """The world size when a launcher (torchrun, accelerate launch, deepspeed) started this
    process, else None. LOCAL_RANK is what all of them set and a plain shell does not."""
    if "LOCAL_RANK" not in env:
        return None
    return int(env.get("WORLD_SIZE", "1"))


def launcher_deepspeed(env=os.environ) -> tuple[str, Path | None] | None:
    """(strategy, DeepSpeed config file) when `accelerate launch` was given a DeepSpeed config,
    e.g. `accelerate launch --config_file launch/zero3.yaml`; None otherwise."""
    if str(env.get("ACCELERATE_USE_DEEPSPEED", "")).lower() not in ("true", "1"):
        return None
    file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if file and file.lower() != "none":
        path = Path(file)
        if not path.is_absolute() and not path.is_file():
            # the accelerate YAMLs name it relative to the repository root
            path = project_dir("ds_configs").parent / file
        if not path.is_file():
            raise UserError(f"accelerate's DeepSpeed config file {file!r} does not exist")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON: {exc}") from None
        return strategy_of_ds_config(config), path.resolve()
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    return ("zero3" if stage == "3" else "zero2"), None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """DeepSpeed needs a process group even for one process: give it a one-rank one."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


# ---------------------------------------------------------------------------------------------
# Memory estimate for `auto`


@dataclass
class MemoryEstimate:
    """Bytes one GPU needs, by part, for the whole (unpartitioned) run."""

    base: int  # the 4-bit linears plus the 16-bit embeddings, lm_head and norms
    largest_layer: int  # one decoder layer's weights (what ZeRO-3 gathers at a time)
    lora: int  # adapter weights (fp32)
    lora_grads_and_optimizer: int  # their gradients and AdamW moments (fp32)
    activations: int  # saved activations, one layer's recompute, logits and their gradient
    tokens_per_micro_batch: int

    def per_gpu(self, strategy: str, world_size: int = 1) -> int:
        n = max(1, world_size)
        if strategy in ("single", "ddp"):
            return self.base + self.lora + self.lora_grads_and_optimizer + self.activations
        if strategy == "zero2":
            return self.base + self.lora + self.lora_grads_and_optimizer // n + self.activations
        if strategy == "zero3":
            return ((self.base + self.lora + self.lora_grads_and_optimizer) // n + 2 * self.largest_layer
                    + self.activations)
        if strategy == "zero3_offload":
            return 2 * self.largest_layer + self.activations
        raise ValueError(strategy)


def lora_target_names(target_modules) -> set[str]:
    """The decoder linears `lora.target_modules` selects."""
    if target_modules == "all-linear":
        return set(_LINEARS)
    return {name for name in _LINEARS if any(t == name or t.endswith("." + name) for t in target_modules)}


def estimate_memory(model_config, cfg, dtype_bytes: int, checkpointed_layers: int | None = None,
                    fused_loss: bool = False, kept_weight_layers: int = 0) -> MemoryEstimate:
    """A deliberately simple estimate (within ~10% of the H100 measurements in DESIGN.md).

    Per token and layer, a checkpointed layer keeps its input (H values) and recomputes one layer
    at a time (~16H + 4I values, or on the fast path what `_fast_path_layer_bytes` counts, within
    1% of the H200 measurements); without checkpointing every layer keeps the latter. Logits cost
    V values in the model dtype plus an fp32 copy and its gradient, unless the loss is fused with
    the lm_head (Liger), which never materialises them. LoRA dropout keeps a dropped copy and a
    mask of every adapted linear's input (dtype + 1 bytes per value). `checkpointed_layers`
    defaults to what train.gradient_checkpointing says (auto: every layer). The fused layer's kept
    16-bit weights (modeling/speed.py) cost `kept_weight_layers` layers of adapted linears, plus
    one layer where any layer is checkpointed (kept from its recompute to its backward).
    """
    from mistral_qlora.flops import decoder_linear_shapes
    from mistral_qlora.modeling.speed import checkpointed_layers_for

    c = model_config
    H, I, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    shapes = decoder_linear_shapes(c)
    linear_per_layer = sum(i * o for i, o in shapes.values())
    if cfg.quantization.bits == 4:
        # 4 bits a weight, one absmax per 64 (uint8 with double quantization, else fp32)
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if cfg.quantization.double_quant else 4 / 64)
        if cfg.quantization.double_quant and cfg.lora.fused:
            per_weight += 4 / 64  # the fused LoRA layer keeps the block scales in float32 too
    else:
        per_weight = dtype_bytes
    layer_bytes = int(linear_per_layer * per_weight) + 2 * H * dtype_bytes
    embeddings = V * H * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    base = L * layer_bytes + (embeddings + H) * dtype_bytes

    targets = lora_target_names(cfg.lora.target_modules)
    lora_params = L * sum(cfg.lora.r * (i + o) for name, (i, o) in shapes.items() if name in targets)

    row = cfg.data.tokens_per_row if cfg.data.packing else cfg.data.max_seq_len
    T = cfg.train.micro_batch_size * row
    if counts_fast_path(cfg, fused_loss):
        one_layer = T * _fast_path_layer_bytes(c, targets, dtype_bytes, cfg.lora.dropout > 0)
    else:
        # (16H + 4I) values a token with LoRA dropout on every linear: the inputs of the seven
        # linears (6H + I values) each kept once more as a dropped copy plus a one-byte mask.
        one_layer = T * ((16 * H + 4 * I) * dtype_bytes - (6 * H + I) * (dtype_bytes + 1))
        if cfg.lora.dropout > 0:
            one_layer += T * (dtype_bytes + 1) * sum(i for name, (i, o) in shapes.items() if name in targets)
    if checkpointed_layers is None:
        checkpointed_layers = checkpointed_layers_for(cfg.train.gradient_checkpointing, L)
        checkpointed_layers = L if checkpointed_layers is None else checkpointed_layers
    k = checkpointed_layers
    activations = k * T * H * dtype_bytes + (L - k) * one_layer + (one_layer if k else 0)
    recomputing_keeps = k > 0 and cfg.lora.fused and cfg.quantization.bits == 4
    activations += (kept_weight_layers + recomputing_keeps) * kept_weight_bytes(model_config, cfg, dtype_bytes)
    if not fused_loss:
        activations += T * V * (dtype_bytes + 8)
    return MemoryEstimate(base, layer_bytes, 4 * lora_params, 12 * lora_params, activations, T)


def counts_fast_path(cfg, fused_loss: bool, strategy: str = "single") -> bool:
    """Whether `estimate_memory` counts the fast path op by op (`_fast_path_layer_bytes`, within 1%
    of measured peaks) rather than by the 16H + 4I rule of PEFT's layers (within ~10%). Under
    ZeRO-3 the fused layer hands its gathered weights to PEFT's forward, so the rule is what holds."""
    return (fused_loss and cfg.lora.fused and cfg.quantization.bits == 4
            and strategy not in ("zero3", "zero3_offload"))


def _fast_path_layer_bytes(model_config, targets: set[str], dtype_bytes: int, dropout: bool) -> int:
    """Bytes one decoder layer keeps for backward per token on the fast path (the fused LoRA
    layer, Liger's RMSNorm and SwiGLU, a flash-style attention), counted from what each op saves:
    each RMSNorm its input; attention its q, k, v and output; SwiGLU its gate and up outputs; each
    adapted linear its dropped input and the dropout mask (dtype + 1 bytes a value) or, without
    dropout, its input, which q/k/v share, gate/up share, and o_proj shares with attention's
    output. For Mistral-7B at 8192 tokens with dropout: 1.61 GiB a layer, 56.4 GiB in all with
    nothing recomputed, where the H200 measured 56.8 (docs/benchmarks.md)."""
    from mistral_qlora.flops import decoder_linear_shapes

    shapes = decoder_linear_shapes(model_config)
    H, I = model_config.hidden_size, model_config.intermediate_size
    q, kv = shapes["q_proj"][1], shapes["k_proj"][1]
    kept = dtype_bytes * (2 * H + 2 * q + 2 * kv + 2 * I)
    if dropout:
        return kept + (dtype_bytes + 1) * sum(shapes[name][0] for name in targets)
    read = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"down_proj"})
    return kept + dtype_bytes * sum(shapes[min(group)][0] for group in read if group & targets)


def kept_weight_bytes(model_config, cfg, dtype_bytes: int) -> int:
    """One decoder layer's adapted linears in 16 bits: what keeping their dequantized weights from
    forward to backward costs a layer (modeling/fused_lora.py)."""
    from mistral_qlora.flops import decoder_linear_shapes

    targets = lora_target_names(cfg.lora.target_modules)
    return dtype_bytes * sum(i * o for name, (i, o) in decoder_linear_shapes(model_config).items() if name in targets)


def gpu_budget(device_index: int = 0) -> int | None:
    """Usable bytes on one GPU (None without CUDA): its total less the CUDA context and allocator
    slack. Total rather than free memory, so that every rank, reading its own identical card, takes
    the same decision."""
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(device_index).total_memory
    return total - max(GIB, int(0.08 * total))


def resolve_strategy(requested: str, world_size: int, estimate: MemoryEstimate | None,
                     budget: int | None) -> tuple[str, str]:
    """(strategy, why) for `requested` on `world_size` processes with `budget` bytes per GPU."""
    n = world_size
    if requested == "single" and n > 1:
        raise UserError(f"train.strategy=single runs one process, but {n} were started; "
                        "use auto, ddp, zero2 or zero3")
    if requested != "auto":
        return requested, "set in the run config"
    if n == 1:
        return "single", "one process"
    if budget is None or estimate is None:
        return "ddp", f"{n} processes without GPUs: DDP (host memory is not estimated)"
    need = estimate.per_gpu("ddp", n)
    if need <= budget:
        return "ddp", (f"{n} processes; the 4-bit model and activations need ~{need / GIB:.1f} GiB per GPU, "
                       f"within the {budget / GIB:.1f} GiB usable: each process holds the whole model")
    z3 = estimate.per_gpu("zero3", n)
    why = (f"{n} processes; the 4-bit model and activations need ~{need / GIB:.1f} GiB per GPU, more than "
           f"the {budget / GIB:.1f} GiB usable: ZeRO-3 partitions the base, ~{z3 / GIB:.1f} GiB per GPU")
    if z3 > budget:
        why += " (still too much: lower data.tokens_per_row or train.micro_batch_size, or use zero3_offload)"
    return "zero3", why


def plan_strategy(cfg, world_size: int, env=os.environ) -> tuple[str, str, Path | None]:
    """(strategy, why, DeepSpeed config file or None) for this run on `world_size` processes.

    Under `accelerate launch` with a DeepSpeed config, that config wins over `auto` (and must agree
    with an explicit strategy). `mistral-qlora train --nproc N` resolves `auto` before it launches
    and hands the children the strategy and its reason (MISTRAL_QLORA_STRATEGY_WHY).
    """
    requested = cfg.train.strategy
    launched = launcher_deepspeed(env)
    ds_path = None
    if launched is not None:
        ds_strategy, ds_path = launched
        if requested not in ("auto", ds_strategy):
            raise UserError(f"train.strategy={requested}, but accelerate was launched with a DeepSpeed "
                            f"{ds_strategy} config ({ds_path}); set train.strategy=auto or {ds_strategy}")
        strategy, why = ds_strategy, f"from accelerate's DeepSpeed config {ds_path}"
    else:
        estimate = budget = None
        if requested == "auto" and world_size > 1:
            estimate, budget = _estimate(cfg)
        strategy, why = resolve_strategy(requested, world_size, estimate, budget)
    if requested == strategy and env.get("MISTRAL_QLORA_STRATEGY_WHY"):
        why = env["MISTRAL_QLORA_STRATEGY_WHY"]  # resolved by the parent that launched us
    if is_deepspeed(strategy) and ds_path is None:
        ds_path = ds_config_path(strategy)
    if requested == "auto" and not why.startswith("auto"):
        why = "auto: " + why
    return strategy, why, ds_path


def _estimate(cfg) -> tuple[MemoryEstimate, int | None]:
    from mistral_qlora.modeling.model import load_model_config, resolve_dtype, resolve_model_path

    config = load_model_config(resolve_model_path(cfg.model.name_or_path), cfg.model)
    dtype = resolve_dtype(cfg.model.dtype)
    return estimate_memory(config, cfg, dtype.itemsize), gpu_budget(int(os.environ.get("LOCAL_RANK", "0")))


# ---------------------------------------------------------------------------------------------
# Ranks


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (a collective: call it on all ranks)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
