"""How long a row may be: the model's context, and the longest row the plan fits on a GPU budget.

- `model_context`: the positions the checkpoint was trained on (`max_position_embeddings`), or,
  with `model.rope_scaling`, the scaled context: the factor times the positions the scaling
  stretches (`original_max_position_embeddings` where the scaling names it, else the checkpoint's).
  `data.max_seq_len` beyond it is refused (`check_max_seq_len`): RoPE would rotate positions the
  model never saw.
- `longest_row`: the longest row whose memory estimate (plan/memory.py) fits a GPU budget with
  recompute, activation offload and the tiled MLP as `auto` chooses them at that length
  (plan/layers.py). The
  estimate grows with the row, so the longest fitting row is found by bisection over lengths.
  `bench --max-context` seeds its search with it and `prepare` counts the records beyond it.
"""

from __future__ import annotations

from mistral_qlora.config import RunConfig
from mistral_qlora.errors import UserError
from mistral_qlora.plan.layers import auto_headroom, plan_mlp_tile, plan_offload, plan_recompute
from mistral_qlora.plan.memory import estimate_memory


def rope_factor_and_original(model_config) -> tuple[float, int] | None:
    """(factor, positions it stretches) of the RoPE scaling in the model config, None without one."""
    params = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default" or "factor" not in params:
        return None
    original = params.get("original_max_position_embeddings") or model_config.max_position_embeddings
    return float(params["factor"]), int(original)


def model_context(model_config) -> int:
    """The longest sequence the model's positions cover, RoPE scaling included."""
    trained = int(model_config.max_position_embeddings)
    scaling = rope_factor_and_original(model_config)
    return trained if scaling is None else max(trained, int(scaling[0] * scaling[1]))


def check_max_seq_len(cfg: RunConfig, model_config) -> None:
    """Refuse a `data.max_seq_len` longer than the model's (scaled) context."""
    limit = model_context(model_config)
    if cfg.data.max_seq_len > limit:
        how = ("raise model.rope_scaling's factor" if rope_factor_and_original(model_config)
               else "set model.rope_scaling (e.g. {type: yarn, factor: 4}) to stretch it")
        raise UserError(f"data.max_seq_len={cfg.data.max_seq_len} is longer than the model's context of {limit:,} "
                        f"tokens ({cfg.model.name_or_path}); lower data.max_seq_len or {how}")


def planned_need(cfg: RunConfig, model_config, dtype_bytes: int, kernels: str, budget: int, tokens: int
                 ) -> tuple[int, int, bool]:
    """(estimated bytes, recomputing layers, offload) of one row of `tokens` tokens, with the
    choices `auto` (or the config, where it is explicit) makes at that length in `budget`: offload,
    then the tiled MLP, then how many layers recompute (`planned_row` says the tile too)."""
    need, recompute, offload, _ = planned_row(cfg, model_config, dtype_bytes, kernels, budget, tokens)
    return need, recompute, offload


def planned_row(cfg: RunConfig, model_config, dtype_bytes: int, kernels: str, budget: int, tokens: int
                ) -> tuple[int, int, bool, int]:
    """`planned_need` and the MLP's tile (0: untiled) at that length."""
    row = cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokens_per_row": tokens, "max_seq_len": tokens}),
                                 "train": cfg.train.model_copy(update={"micro_batch_size": 1})})
    offload, _ = plan_offload(row, model_config, dtype_bytes, kernels, budget)
    tile, _ = plan_mlp_tile(row, model_config, dtype_bytes, kernels, budget, offload=offload)
    recompute, _ = plan_recompute(row, model_config, dtype_bytes, kernels, budget, offload=offload, mlp_tile=tile)
    offload, tile = offload and recompute > 0, tile if recompute > 0 else 0
    need = estimate_memory(model_config, row, dtype_bytes, recompute_layers=recompute, fused_loss=kernels == "liger",
                           offload=offload, mlp_tile=tile).per_gpu("single")
    return need, recompute, offload, tile


def longest_row(cfg: RunConfig, model_config, dtype_bytes: int, kernels: str, budget: int, granularity: int = 256,
                limit: int = 1 << 22) -> int:
    """The longest row (a multiple of `granularity`, at most `limit`; 0 if none) whose estimate
    fits `budget` less the head-room `auto` keeps, on one GPU."""
    usable = budget - auto_headroom(cfg, kernels, budget)

    def fits(n: int) -> bool:
        return planned_need(cfg, model_config, dtype_bytes, kernels, budget, n)[0] <= usable

    low, high = 0, limit // granularity + 1  # in units of granularity: `low` fits (or is 0), `high` does not
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid * granularity):
            low = mid
        else:
            high = mid
    return low * granularity
