"""The plan's layer decisions (plan/layers.py): how many layers recompute and keep their weights, the
head-room `auto` leaves, and what the base's matmuls compute in, as the run logs them."""

import pytest
import torch
from testkit.plan import MISTRAL_7B, config_7b

from mistral_qlora.config import RunConfig
from mistral_qlora.plan.backends import select_kernels
from mistral_qlora.plan.layers import plan_recompute
from mistral_qlora.plan.memory import recompute_layers_for

GIB = 2**30


def test_explicit_settings():
    assert recompute_layers_for(True, 32) == 32 and recompute_layers_for(False, 32) == 0
    assert recompute_layers_for(0.25, 32) == 8 and recompute_layers_for("auto", 32) is None
    assert plan_recompute(config_7b(gradient_checkpointing=0.5), MISTRAL_7B, 2, "none", 80 * GIB)[0] == 16


def test_auto_spends_free_memory_and_low_memory_checkpoints_everything():
    big, why = plan_recompute(config_7b(gradient_checkpointing="auto"), MISTRAL_7B, 2, "liger", 73 * GIB)
    assert 0 <= big < 8, why  # an 80 GB card keeps (almost) every layer's activations
    small, _ = plan_recompute(config_7b(gradient_checkpointing="auto"), MISTRAL_7B, 2, "liger", 22 * GIB)
    assert big < small < 32  # a 24 GB card recomputes most layers
    assert plan_recompute(config_7b(gradient_checkpointing="auto"), MISTRAL_7B, 2, "liger", 8 * GIB)[0] == 32
    low, why = plan_recompute(config_7b(gradient_checkpointing="auto", memory="low"), MISTRAL_7B, 2, "liger", 73 * GIB)
    assert low == 32 and "memory=low" in why
    assert plan_recompute(config_7b(gradient_checkpointing="auto"), MISTRAL_7B, 2, "none", None)[0] == 32  # no GPU


def test_headroom_follows_the_estimate():
    """`auto` leaves 4% of the budget (at least 1 GiB) free where the estimate counts the fast path
    op by op (0.3-0.4 GiB under measured peaks), 10% where it is the rule for PEFT's layers (within
    ~10%), ZeRO-3 included."""
    from mistral_qlora.plan import layers as speed

    cfg = config_7b(gradient_checkpointing="auto")
    peft = RunConfig.model_validate({**cfg.model_dump(), "lora": {"fused": False}})
    h100 = 81559 * 2**20 - int(0.08 * 81559 * 2**20)
    assert speed.auto_headroom(cfg, "liger", h100) == int(0.04 * h100)  # 2.9 GiB
    assert speed.auto_headroom(cfg, "liger", 11 * GIB) == GIB  # a 12 GB card: the floor
    for other in (speed.auto_headroom(cfg, "none", h100), speed.auto_headroom(peft, "liger", h100),
                  speed.auto_headroom(cfg, "liger", h100, "zero3"), speed.auto_headroom(cfg, "liger", h100, "zero3_offload")):
        assert other == int(0.10 * h100)
    assert "(1.6 GiB kept free)" in plan_recompute(cfg, MISTRAL_7B, 2, "liger", 40 * GIB)[1]
    assert "(4.0 GiB kept free)" in plan_recompute(cfg, MISTRAL_7B, 2, "none", 40 * GIB)[1]


def test_bad_fraction_and_kernels_on_cpu():
    from mistral_qlora.errors import UserError

    with pytest.raises(Exception, match="fraction of the layers"):
        config_7b(gradient_checkpointing=1.5)
    if not torch.cuda.is_available():
        assert select_kernels("auto") == "none"
        with pytest.raises(UserError, match="model.kernels=liger: needs a CUDA GPU"):
            select_kernels("liger")




def test_kept_weights_spend_what_checkpointing_leaves():
    """`auto` keeps the dequantized weights of as many layers not recomputed as the memory left
    holds (0.4 GiB a Mistral-7B layer), none with train.memory=low, PEFT's layers or no GPU; the
    estimate counts them, and one layer's worth wherever layers recompute."""
    from mistral_qlora.plan import layers as speed
    from mistral_qlora.plan.layers import plan_kept_weights
    from mistral_qlora.plan.memory import (
        estimate_memory,
        kept_weight_bytes,
        layer_shapes,
    )

    cfg = config_7b(gradient_checkpointing="auto")
    per_layer = kept_weight_bytes(layer_shapes(MISTRAL_7B, cfg.lora.target_modules), cfg, 2)
    assert per_layer == 2 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    plans = {}
    h100 = 81559 * 2**20 - int(0.08 * 81559 * 2**20)  # gpu_budget of an H100 80GB (nvidia-smi's total)
    for budget in (48 * GIB, 64 * GIB, h100, 129 * GIB):  # made-up budgets, an H100 80GB's, an H200's
        k, _ = plan_recompute(cfg, MISTRAL_7B, 2, "liger", budget)
        n, why = plan_kept_weights(cfg, MISTRAL_7B, 2, "liger", budget, k)
        plans[budget] = (k, n)
        need = estimate_memory(MISTRAL_7B, cfg, 2, k, fused_loss=True, kept_weight_layers=n)
        usable = budget - speed.auto_headroom(cfg, "liger", budget)
        assert need.per_gpu("single") <= usable and f"{n} of {32 - k}" in why
        if k > 0:  # one layer fewer recomputed would not have fit
            fewer = estimate_memory(MISTRAL_7B, cfg, 2, k - 1, fused_loss=True)
            assert fewer.per_gpu("single") > usable
        if n < 32 - k:  # one layer more would not have fit
            more = estimate_memory(MISTRAL_7B, cfg, 2, k, fused_loss=True, kept_weight_layers=n + 1)
            assert more.per_gpu("single") > usable
    assert plans[48 * GIB][0] > 0, plans  # recomputes some layers
    assert plans[64 * GIB][0] == 0 and 0 < plans[64 * GIB][1] < 32, plans  # some layers' weights
    assert plans[h100] == plans[129 * GIB] == (0, 32), plans  # an 80 GB card: every layer's
    assert plan_kept_weights(cfg, MISTRAL_7B, 2, "liger", 8 * GIB, 32)[0] == 0
    n, why = plan_kept_weights(config_7b(gradient_checkpointing="auto", memory="low"), MISTRAL_7B, 2, "liger", 129 * GIB, 32)
    assert n == 0 and "memory=low" in why
    assert plan_kept_weights(cfg, MISTRAL_7B, 2, "liger", None, 32)[0] == 0
    peft = RunConfig.model_validate({**cfg.model_dump(), "lora": {"fused": False}})
    assert plan_kept_weights(peft, MISTRAL_7B, 2, "liger", 129 * GIB, 0) == (0, "PEFT's LoRA layers dequantize in backward")
    # recomputing layers keep theirs one at a time: one layer's worth in the estimate
    from mistral_qlora.plan.memory import fast_path_layer_bytes

    inputs, recompute = 32 * 8192 * 4096 * 2, 8192 * fast_path_layer_bytes(layer_shapes(MISTRAL_7B, "all-linear"), 2, True)
    assert estimate_memory(MISTRAL_7B, cfg, 2, 32, fused_loss=True).activations == inputs + recompute + per_layer


@pytest.mark.parametrize("dtype,name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")])
def test_the_plan_says_the_dtype_the_base_matmuls_compute_in(dtype, name):
    from mistral_qlora.config import validate_config
    from mistral_qlora.model.base import load_model_config
    from mistral_qlora.plan import make_plan
    from mistral_qlora.runtime import Runtime

    from testkit import tiny_path

    cfg = validate_config({}, "test")
    rt = Runtime(device="cpu", dtype=dtype, world_size=1, rank=0, local_rank=0)
    plan = make_plan(cfg, load_model_config(tiny_path(), cfg.model), rt, env={})
    (line,) = [line for line in plan.log_lines(cfg) if line.startswith("quantization.compute=")]
    assert f"the base's matmuls in {name}," in line
