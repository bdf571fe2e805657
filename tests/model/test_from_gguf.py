"""A GGUF file as the base (model/from_gguf.py): SmolLM2-135M-Instruct's Q4_1 file becomes a
transformers folder once, and the real model answers as it should."""

from __future__ import annotations

import json

import pytest
import torch

from mistral_qlora.errors import UserError
from mistral_qlora.model.base import resolve_model_path
from testkit.smollm2 import smollm2_gguf, smollm2_path


@pytest.mark.slow  # a real 135M model converted and run
def test_a_gguf_file_is_converted_once_into_a_checkpoint_that_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path()
    assert resolve_model_path(str(smollm2_gguf())) == folder  # the second time: the cached folder
    config = json.loads(open(f"{folder}/config.json").read())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][ids["input_ids"].shape[1]:])


def test_a_file_that_is_not_gguf_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRAL_QLORA_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(UserError, match=r"broken.gguf'.*cannot read this GGUF file"):
        resolve_model_path(str(bad))
    assert not any((tmp_path / "cache").glob("gguf-*"))  # nothing half-written
