"""train.strategy (plan/strategy.py): auto by processes and memory, validated, and an accelerate DeepSpeed
launch deciding."""

from __future__ import annotations

import pytest
from testkit import ROOT
from testkit.plan import MISTRAL_7B, config_7b

from mistral_qlora import resources
from mistral_qlora.config import load_config
from mistral_qlora.errors import UserError
from mistral_qlora.plan.memory import GIB, estimate_memory
from mistral_qlora.plan.strategy import plan_strategy, resolve_strategy


def test_auto_picks_by_processes_and_memory():
    e = estimate_memory(MISTRAL_7B, config_7b(), 2)
    assert resolve_strategy("auto", 1, e, 70 * GIB)[0] == "single"
    strategy, why = resolve_strategy("auto", 2, e, 70 * GIB)
    assert strategy == "ddp" and "GiB" in why
    strategy, why = resolve_strategy("auto", 4, e, 8 * GIB)
    assert strategy == "zero3" and "ZeRO-3" in why
    assert resolve_strategy("auto", 2, None, None)[0] == "ddp"  # CPU processes
    assert resolve_strategy("zero2", 2, e, 70 * GIB) == ("zero2", "set in the run config")
    with pytest.raises(UserError, match="single runs one process"):
        resolve_strategy("single", 2, e, 70 * GIB)


def test_strategy_is_validated():
    with pytest.raises(UserError, match="train.strategy"):
        load_config(None, ["train.strategy=zero4"])
    assert load_config(None, ["train.strategy=zero3"]).train.strategy == "zero3"


def test_plan_follows_accelerate_deepspeed_config():
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds_configs/zero3.json",
           "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    cfg = load_config(None, [])
    strategy, why, path = plan_strategy(cfg, 2, MISTRAL_7B, 2, None, env)
    assert strategy == "zero3" and path == ROOT / "ds_configs" / "zero3.json"  # as named, from the current folder
    with pytest.raises(UserError, match="set train.strategy=auto or zero3"):
        plan_strategy(load_config(None, ["train.strategy=ddp"]), 2, MISTRAL_7B, 2, None, env)
    # our own launcher hands its reason down
    env2 = {"MISTRAL_QLORA_STRATEGY_WHY": "auto: because", "LOCAL_RANK": "0"}
    assert plan_strategy(load_config(None, ["train.strategy=ddp"]), 2, None, 2, None, env2)[:2] == \
        ("ddp", "auto: because")
    # a strategy of its own gets the DeepSpeed file shipped in the package
    assert plan_strategy(load_config(None, ["train.strategy=zero2"]), 2, None, 2, None, {})[2] == \
        resources.ds_config_path("zero2")
