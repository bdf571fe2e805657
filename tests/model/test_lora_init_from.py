"""lora.init_from: the adapters start from a saved adapter's weights (model/lora.py), and an
adapter of another shape is refused in one line naming the mismatch."""

from __future__ import annotations

import pytest
import torch

from mistral_qlora.config import LoraSection
from mistral_qlora.errors import UserError
from mistral_qlora.model.lora import add_lora, check_init_adapter

from testkit import layer_plan, load_tiny_base


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A tiny adapter (r=4, alpha=8, q/v) with non-zero B matrices, saved as a run saves it."""
    torch.manual_seed(0)
    model = add_lora(load_tiny_base(bits=16), LoraSection(r=4, alpha=8, dropout=0.0,
                                                          target_modules=["q_proj", "v_proj"]), layer_plan())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("init") / "adapter"
    model.save_pretrained(str(folder))
    return folder, {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_adapters_start_from_the_init_from_adapters_weights(saved_adapter):
    folder, weights = saved_adapter
    torch.manual_seed(1)  # another seed: PEFT's own init would give other A matrices and B = 0
    model = add_lora(load_tiny_base(bits=16), LoraSection(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                                          init_from=str(folder)), layer_plan())
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("lora, words", [
    ({"r": 8, "alpha": 8}, "r=4"),
    ({"r": 4, "alpha": 16}, "alpha=8"),
    ({"r": 4, "alpha": 8, "rslora": True}, "rslora"),
])
def test_an_init_from_adapter_of_another_shape_is_refused_before_the_model_loads(saved_adapter, lora, words):
    folder, _ = saved_adapter
    with pytest.raises(UserError, match=words) as err:
        check_init_adapter(LoraSection(init_from=str(folder), **lora))
    assert "lora.init_from" in str(err.value) and "\n" not in str(err.value)


def test_an_init_from_adapter_of_other_target_modules_is_refused(saved_adapter):
    folder, _ = saved_adapter
    with pytest.raises(UserError, match=r"adapts q_proj, v_proj.*set lora.target_modules"):
        add_lora(load_tiny_base(bits=16), LoraSection(r=4, alpha=8, target_modules=["q_proj", "k_proj"],
                                                      init_from=str(folder)), layer_plan())


def test_init_from_a_folder_without_an_adapter_names_it(tmp_path):
    with pytest.raises(UserError, match="not an adapter folder"):
        check_init_adapter(LoraSection(init_from=str(tmp_path)))
