"""Activation offload in the plan: the estimate with the recomputing layers' inputs on the host, the
`auto` decision from it, and the refusal of a run whose offloaded inputs exceed the host's memory."""

import pytest
from testkit.plan import MISTRAL_7B

from mistral_qlora.config import RunConfig
from mistral_qlora.errors import UserError
from mistral_qlora.plan.layers import HOST_RESERVE, auto_headroom, check_host_memory, plan_offload
from mistral_qlora.plan.memory import estimate_memory

GIB = 2**30


def _cfg(row: int, **train) -> RunConfig:
    return RunConfig.model_validate({"data": {"tokens_per_row": row, "max_seq_len": row},
                                     "train": {"micro_batch_size": 1, **train}})


def test_offloaded_estimate_keeps_two_boundaries_on_the_gpu_and_the_rest_on_the_host():
    cfg = _cfg(65536)
    boundary = 65536 * 4096 * 2
    kept = estimate_memory(MISTRAL_7B, cfg, 2, 32, fused_loss=True)
    moved = estimate_memory(MISTRAL_7B, cfg, 2, 32, fused_loss=True, offload=True)
    assert kept.activations - moved.activations == 30 * boundary
    assert moved.host_activations == 32 * boundary and kept.host_activations == 0
    some = estimate_memory(MISTRAL_7B, cfg, 2, 8, fused_loss=True, offload=True)
    assert some.host_activations == 8 * boundary  # only recomputing layers' inputs move


def test_auto_offloads_only_when_the_row_would_not_fit_otherwise():
    budget = 22 * GIB  # a 24 GB card's usable memory
    off, why = plan_offload(_cfg(8192, gradient_checkpointing="auto"), MISTRAL_7B, 2, "liger", budget)
    assert not off and "fits the GPU without it" in why
    cfg = _cfg(131072, gradient_checkpointing="auto")
    on, why = plan_offload(cfg, MISTRAL_7B, 2, "liger", budget)
    assert on and "131072 tokens" in why, why
    usable = budget - auto_headroom(cfg, "liger", budget)
    assert estimate_memory(MISTRAL_7B, cfg, 2, 32, fused_loss=True).per_gpu("single") > usable
    assert plan_offload(cfg, MISTRAL_7B, 2, "liger", None) == (
        False, "auto without a GPU: the activations are in host memory already")
    assert plan_offload(_cfg(131072, activation_offload=False), MISTRAL_7B, 2, "liger", budget)[0] is False
    assert plan_offload(_cfg(8192, activation_offload=True), MISTRAL_7B, 2, "liger", budget)[0] is True
    assert not plan_offload(_cfg(131072, gradient_checkpointing=False), MISTRAL_7B, 2, "liger", budget)[0]


def test_explicit_offload_without_recompute_is_refused_by_the_config():
    from mistral_qlora.config import validate_config

    with pytest.raises(UserError, match="activation_offload=true.*gradient_checkpointing=false"):
        validate_config({"train": {"activation_offload": True, "gradient_checkpointing": False}}, "run.yaml")


def test_host_memory_is_part_of_the_plan():
    assert "host memory: ~" in check_host_memory(10 * GIB, 2, 64 * GIB)
    with pytest.raises(UserError) as err:
        check_host_memory(30 * GIB, 2, 64 * GIB)
    need = 2 * (30 * GIB + HOST_RESERVE) / GIB
    assert f"needs ~{need:.1f} GiB of host memory" in str(err.value) and "\n" not in str(err.value)


def test_make_plan_refuses_offload_beyond_host_memory_and_logs_it():
    import torch

    from mistral_qlora.config import validate_config
    from mistral_qlora.model.base import load_model_config
    from mistral_qlora.plan import make_plan
    from mistral_qlora.runtime import Runtime
    from testkit import tiny_path

    cfg = validate_config({"train": {"activation_offload": True}}, "test")
    model_config = load_model_config(tiny_path(), cfg.model)
    rt = Runtime(device="cpu", dtype=torch.float32, world_size=1, rank=0, local_rank=0)
    plan = make_plan(cfg, model_config, rt, env={}, available_host_ram=64 * GIB)
    assert plan.layers.offload and plan.layers.recompute == model_config.num_hidden_layers
    (line,) = [line for line in plan.log_lines(cfg) if line.startswith("train.activation_offload=True")]
    assert "host memory: ~4.0 GiB of 64.0 GiB" in line
    with pytest.raises(UserError, match="train.activation_offload: the run needs ~4.0 GiB of host memory"):
        make_plan(cfg, model_config, rt, env={}, available_host_ram=2 * GIB)
    assert not make_plan(validate_config({}, "test"), model_config, rt, env={}).layers.offload
