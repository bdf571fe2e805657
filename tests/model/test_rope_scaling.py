"""`model.rope_scaling` on the tiny model: it reaches the loaded config (the checkpoint's rope_theta
kept), changes the logits, is refused in one line when transformers refuses it, and the adapter's
record carries it into the merged model's config.json."""

from __future__ import annotations

import json

import pytest
import torch

from mistral_qlora.config import ModelSection
from mistral_qlora.errors import UserError
from mistral_qlora.model.base import load_model_config, resolve_model_path

LINEAR = {"type": "linear", "factor": 4.0}


@pytest.fixture(scope="module")
def tiny():
    return resolve_model_path("tiny-random-mistral")


def test_rope_scaling_reaches_the_config_and_the_logits(tiny):
    from transformers import AutoModelForCausalLM

    plain = load_model_config(tiny, ModelSection())
    scaled = load_model_config(tiny, ModelSection(rope_scaling=LINEAR))
    assert scaled.rope_parameters["rope_type"] == "linear" and scaled.rope_parameters["factor"] == 4.0
    assert scaled.rope_parameters["rope_theta"] == plain.rope_parameters["rope_theta"]
    assert plain.rope_parameters.get("rope_type", "default") == "default"
    ids = torch.randint(3, 32000, (1, 48), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, config in (("plain", plain), ("scaled", scaled)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny, config=config, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits[0]
    assert torch.equal(logits["plain"][0], logits["scaled"][0])  # position 0 rotates by nothing either way
    assert not torch.allclose(logits["plain"][40:], logits["scaled"][40:])


def test_rope_scaling_refused_in_one_line(tiny):
    with pytest.raises(ValueError, match="needs type"):
        ModelSection(rope_scaling={"type": "ntk", "factor": 2})
    with pytest.raises(ValueError, match="needs factor"):
        ModelSection(rope_scaling={"type": "linear"})
    with pytest.raises(UserError, match=r"model.rope_scaling=.*transformers refuses it") as err:
        load_model_config(tiny, ModelSection(rope_scaling={"type": "yarn", "factor": 4, "beta_fast": "fast"}))
    assert "\n" not in str(err.value)


def test_merge_carries_the_adapters_rope_scaling(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from mistral_qlora.config import LoraSection
    from mistral_qlora.model.adapter import adapter_rope_scaling, record_base_model
    from mistral_qlora.model.lora import add_lora
    from mistral_qlora.tools.merge import merge_adapter
    from testkit import layer_plan

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), LoraSection(r=4),
                     layer_plan())
    model.save_pretrained(tmp_path / "adapter")
    record_base_model(tmp_path / "adapter", "tiny-random-mistral", {"type": "dynamic", "factor": 2.0})
    assert adapter_rope_scaling(tmp_path / "adapter") == {"type": "dynamic", "factor": 2.0}
    out = merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "merged"), dtype="fp32")
    rope = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "dynamic" and rope["factor"] == 2.0
    assert adapter_rope_scaling(tmp_path) is None  # an adapter trained without scaling has no record
