"""The plan's layer decisions (plan/layers.py) as the run logs them."""

import pytest
import torch

from mistral_qlora.config import validate_config
from mistral_qlora.model.base import load_model_config
from mistral_qlora.plan import make_plan
from mistral_qlora.runtime import Runtime

from testkit import tiny_path


@pytest.mark.parametrize("dtype,name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")])
def test_the_plan_says_the_dtype_the_base_matmuls_compute_in(dtype, name):
    cfg = validate_config({}, "test")
    rt = Runtime(device="cpu", dtype=dtype, world_size=1, rank=0, local_rank=0)
    plan = make_plan(cfg, load_model_config(tiny_path(), cfg.model), rt, env={})
    (line,) = [line for line in plan.log_lines(cfg) if line.startswith("quantization.compute=")]
    assert f"the base's matmuls in {name}," in line
