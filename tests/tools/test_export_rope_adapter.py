"""`model.rope_scaling` from training to the GGUF: an adapter recorded with a scaling (as `train`
records it beside the adapter, base_overrides.json) exports a file whose rope keys are that
scaling over the tiny base's own context."""

from __future__ import annotations

import pytest
import torch

from testkit import layer_plan, tiny_path


@pytest.fixture(scope="module")
def bare_adapter(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from mistral_qlora.config import LoraSection
    from mistral_qlora.model.lora import add_lora

    folder = tmp_path_factory.mktemp("rope-export") / "lora"
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_path(), dtype=torch.float32), LoraSection(r=4),
                     layer_plan())
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("scaling,expected", [
    ({"type": "linear", "factor": 2.0}, {"type": "linear", "factor": 2.0}),
    ({"type": "yarn", "factor": 2.0}, {"type": "yarn", "factor": 2.0, "original_context_length": 32768}),
])
def test_the_adapters_rope_scaling_reaches_the_gguf(bare_adapter, scaling, expected, tmp_path):
    import shutil

    from gguf import GGUFReader

    from mistral_qlora.model.adapter import record_base_model
    from mistral_qlora.tools.export import export_model

    adapter = tmp_path / "adapter"
    shutil.copytree(bare_adapter, adapter)
    record_base_model(adapter, "tiny-random-mistral", scaling)
    path, _ = export_model(str(adapter), str(tmp_path / "tiny.gguf"), qtype="f16")
    fields = GGUFReader(path).fields
    got = {k.removeprefix("llama.rope.scaling."): f.contents() for k, f in fields.items()
           if k.startswith("llama.rope.scaling.")}
    assert got == expected
    assert fields["llama.context_length"].contents() == 32768  # the base's trained context, as the converter
