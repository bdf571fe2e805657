"""How one run is spread over processes (`train.strategy`), and the DeepSpeed config that goes with it.

  single         one process, the plain Trainer path
  ddp            every process holds the whole 4-bit model; gradients are averaged (all-reduce)
  zero2          DeepSpeed ZeRO-2: optimizer state and gradients partitioned, the model replicated
  zero3          DeepSpeed ZeRO-3: the 4-bit base itself partitioned, gathered layer by layer
  zero3_offload  ZeRO-3 with the partitions and optimizer state kept in CPU memory
  auto           single for one process; ddp when the 4-bit model and activations fit one GPU,
                 zero3 when they do not (plan/memory.py's estimate)

Under `accelerate launch` with a DeepSpeed config, that config decides, and an explicit strategy
must agree with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mistral_qlora import resources
from mistral_qlora.config import RunConfig
from mistral_qlora.errors import UserError
from mistral_qlora.plan.memory import GIB, ZERO3, MemoryEstimate, estimate_memory

STRATEGIES = ("single", "ddp", "zero2", "zero3", "zero3_offload")
# Set by `mistral-qlora train --nproc N` for the processes it launches: the reason it resolved
# `auto` the way it did, so that rank 0 logs it (the children see an explicit strategy).
STRATEGY_WHY_ENV = "MISTRAL_QLORA_STRATEGY_WHY"


def is_deepspeed(strategy: str) -> bool:
    return strategy in resources.DEEPSPEED_FILES


def is_zero3(strategy: str) -> bool:
    return strategy in ZERO3


def strategy_of_ds_config(config: dict) -> str:
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    if stage == 3:
        offload = (zero.get("offload_param") or {}).get("device", "none")
        return "zero3_offload" if offload not in (None, "none") else "zero3"
    if stage in (1, 2):
        return "zero2"
    raise UserError(f"DeepSpeed ZeRO stage {stage} is not supported here (use ZeRO-2 or ZeRO-3)")


def launcher_deepspeed(env=None) -> tuple[str, Path | None] | None:
    """(strategy, DeepSpeed config file) when `accelerate launch` was given a DeepSpeed config,
    e.g. `accelerate launch --config_file launch/zero3.yaml`; None otherwise."""
    env = os.environ if env is None else env  # read now: `datasets` rebinds os.environ
    if str(env.get("ACCELERATE_USE_DEEPSPEED", "")).lower() not in ("true", "1"):
        return None
    file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if file and file.lower() != "none":
        path = resources.find_config_file(file)
        if not path.is_file():
            raise UserError(f"accelerate's DeepSpeed config file {file!r} does not exist")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON: {exc}") from None
        return strategy_of_ds_config(config), path.resolve()
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    return ("zero3" if stage == "3" else "zero2"), None


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


def plan_strategy(cfg: RunConfig, world_size: int, model_config, dtype_bytes: int, budget: int | None,
                  env=None) -> tuple[str, str, Path | None]:
    """(strategy, why, DeepSpeed config file or None) for this run on `world_size` processes."""
    env = os.environ if env is None else env  # read now: `datasets` rebinds os.environ
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
        estimate = None
        if requested == "auto" and world_size > 1:
            estimate = estimate_memory(model_config, cfg, dtype_bytes)
        strategy, why = resolve_strategy(requested, world_size, estimate, budget)
    if requested == strategy and env.get(STRATEGY_WHY_ENV):
        why = env[STRATEGY_WHY_ENV]  # resolved by the parent that launched us
    if is_deepspeed(strategy) and ds_path is None:
        ds_path = resources.ds_config_path(strategy)
    if requested == "auto" and not why.startswith("auto"):
        why = "auto: " + why
    return strategy, why, ds_path
