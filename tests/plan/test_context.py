"""How long a row may be (plan/context.py): the model's context with and without RoPE scaling,
the refusal of a longer data.max_seq_len, and the planner's longest row on a budget."""

from types import SimpleNamespace

import pytest
from testkit.plan import MISTRAL_7B

from mistral_qlora.config import RunConfig
from mistral_qlora.errors import UserError
from mistral_qlora.plan.context import check_max_seq_len, longest_row, model_context, planned_need
from mistral_qlora.plan.layers import auto_headroom
from mistral_qlora.plan.memory import GIB

LONG = RunConfig.model_validate({"model": {"kernels": "liger"}, "data": {"tokens_per_row": 8192, "max_seq_len": 4096},
                                 "train": {"micro_batch_size": 1, "gradient_checkpointing": "auto"}})


def with_context(n, rope=None):
    return SimpleNamespace(max_position_embeddings=n, rope_parameters=rope)


def test_model_context_is_the_trained_positions_or_the_scaled_ones():
    assert model_context(with_context(32768)) == 32768
    assert model_context(with_context(32768, {"rope_type": "default", "rope_theta": 1e6})) == 32768
    assert model_context(with_context(32768, {"rope_type": "linear", "factor": 2.0})) == 65536
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    assert model_context(with_context(8192, yarn)) == 32768


def test_max_seq_len_beyond_the_context_is_refused_naming_the_key():
    cfg = RunConfig.model_validate({"data": {"max_seq_len": 40000, "tokens_per_row": 40000}})
    with pytest.raises(UserError, match=r"data\.max_seq_len=40000 .*context of 32,768 .*model\.rope_scaling"):
        check_max_seq_len(cfg, with_context(32768))
    check_max_seq_len(cfg, with_context(32768, {"rope_type": "yarn", "factor": 2.0}))  # 65,536 scaled: fits
    check_max_seq_len(RunConfig.model_validate({"data": {"max_seq_len": 32768, "tokens_per_row": 32768}}),
                      with_context(32768))


@pytest.mark.parametrize("budget_gib", [16, 24, 80])
def test_longest_row_is_the_last_length_whose_planned_estimate_fits(budget_gib):
    budget = budget_gib * GIB
    n = longest_row(LONG, MISTRAL_7B, 2, "liger", budget, granularity=1024)
    usable = budget - auto_headroom(LONG, "liger", budget)
    need, recompute, offload = planned_need(LONG, MISTRAL_7B, 2, "liger", budget, n)
    assert need <= usable < planned_need(LONG, MISTRAL_7B, 2, "liger", budget, n + 1024)[0]
    assert recompute == 32 and offload  # at the longest row auto recomputes every layer and offloads their inputs
    assert n > 8192


def test_longest_row_grows_with_the_budget_and_is_zero_when_nothing_fits():
    rows = [longest_row(LONG, MISTRAL_7B, 2, "liger", b * GIB, granularity=1024) for b in (16, 24, 40, 80)]
    assert rows == sorted(rows) and len(set(rows)) == 4
    assert longest_row(LONG, MISTRAL_7B, 2, "liger", 3 * GIB, granularity=1024) == 0  # the 4-bit base alone is ~4 GiB
