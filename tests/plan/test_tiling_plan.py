"""The tiled MLP in the plan: what the estimate counts for a tiled recomputing layer and for Liger's
fused loss, `auto` turning tiling on only for rows that need it, the refusals, and the longest row."""

import pytest
from testkit.plan import MISTRAL_7B

from mistral_qlora.config import RunConfig, validate_config
from mistral_qlora.errors import UserError
from mistral_qlora.plan.context import longest_row, planned_row
from mistral_qlora.plan.layers import plan_mlp_tile
from mistral_qlora.plan.memory import GIB, estimate_memory, fast_path_layer_bytes, fused_loss_bytes, layer_shapes

H, I, V = 4096, 14336, 32000


def _cfg(row: int, dropout: float = 0.0, **train) -> RunConfig:
    return RunConfig.model_validate({"model": {"kernels": "liger"}, "lora": {"dropout": dropout},
                                     "data": {"tokens_per_row": row, "max_seq_len": row},
                                     "train": {"micro_batch_size": 1, **train}})


def test_tiled_recompute_counts_the_mlp_for_one_tile_and_its_input_and_gradient_for_the_row():
    T, tile = 262144, 4096
    untiled = estimate_memory(MISTRAL_7B, _cfg(T), 2, 32, fused_loss=True, offload=True)
    tiled = estimate_memory(MISTRAL_7B, _cfg(T), 2, 32, fused_loss=True, offload=True, mlp_tile=tile)
    mlp = 2 * (3 * I + H)  # a token's gate and up outputs, down's input, the gate/up input (bf16, no dropout)
    assert untiled.activations - tiled.activations == T * mlp - 2 * T * H * 2 - 2 * tile * mlp
    with_dropout = estimate_memory(MISTRAL_7B, _cfg(T, 0.05), 2, 32, fused_loss=True, offload=True, mlp_tile=tile)
    assert with_dropout.activations > tiled.activations  # q/k/v and o_proj keep their dropped inputs
    # layers that keep their activations are not tiled: the saving is one recomputing layer's, however many
    saving = [estimate_memory(MISTRAL_7B, _cfg(65536), 2, k, fused_loss=True).activations
              - estimate_memory(MISTRAL_7B, _cfg(65536), 2, k, fused_loss=True, mlp_tile=tile).activations
              for k in (16, 32)]
    assert saving[0] == saving[1] > 0


def test_liger_loss_chunks_count_as_their_own_peak():
    # chunks of next_pow2(ceil(T / ceil(V / H))) tokens: T / 8 rounded up to a power of two
    assert fused_loss_bytes(100_000, H, V, 2) == 3 * 100_000 * H * 2 + 16384 * V * 2
    T = 131072
    cfg = _cfg(T, gradient_checkpointing=False)  # no recompute: the loss comes on top of every layer's activations
    every_layer = 32 * T * fast_path_layer_bytes(layer_shapes(MISTRAL_7B, cfg.lora.target_modules), 2, False)
    assert estimate_memory(MISTRAL_7B, cfg, 2, 0, fused_loss=True).activations == every_layer + fused_loss_bytes(T, H, V, 2)


def test_auto_tiles_the_mlp_only_when_the_row_would_not_fit_otherwise():
    budget = 80 * GIB
    short, why = plan_mlp_tile(_cfg(32768), MISTRAL_7B, 2, "liger", budget, offload=True)
    assert short == 0 and why.startswith("auto: off, every row fits")
    long, why = plan_mlp_tile(_cfg(600_000), MISTRAL_7B, 2, "liger", budget, offload=True)
    assert long == H and why.startswith("auto: on, a row of 600000 tokens needs") and "tiles of 4096" in why
    assert plan_mlp_tile(_cfg(600_000), MISTRAL_7B, 2, "liger", None)[0] == 0  # no GPU
    assert plan_mlp_tile(_cfg(600_000, tiled_mlp=False), MISTRAL_7B, 2, "liger", budget)[0] == 0
    assert plan_mlp_tile(_cfg(8192, tiled_mlp=True), MISTRAL_7B, 2, "liger", budget)[0] == H
    assert plan_mlp_tile(_cfg(600_000), MISTRAL_7B, 2, "liger", budget, strategy="zero3")[0] == 0


def test_longest_row_tiles_at_its_length_and_is_longer_for_it():
    budget = 24 * GIB
    untiled = longest_row(_cfg(8192, 0.05, tiled_mlp=False), MISTRAL_7B, 2, "liger", budget, granularity=4096)
    tiled = longest_row(_cfg(8192, 0.05), MISTRAL_7B, 2, "liger", budget, granularity=4096)
    assert tiled > 1.5 * untiled
    assert planned_row(_cfg(8192, 0.05), MISTRAL_7B, 2, "liger", budget, tiled)[1:] == (32, True, H)
    assert planned_row(_cfg(8192, 0.05), MISTRAL_7B, 2, "liger", budget, untiled // 2)[3] == 0


@pytest.mark.parametrize("train,match", [
    ({"tiled_mlp": True, "gradient_checkpointing": False}, r"train\.tiled_mlp=true .*recomputes none"),
    ({"tiled_mlp": True, "strategy": "zero3"}, r"train\.tiled_mlp=true cannot run with train\.strategy=zero3"),
])
def test_explicit_tiling_without_recompute_or_under_zero3_is_refused(train, match):
    with pytest.raises(UserError, match=match):
        validate_config({"train": train}, "run.yaml")
