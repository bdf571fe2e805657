"""Rope scaling in the GGUF: the keys and tensor llama.cpp's converter writes for linear, yarn and
llama3 scaling, and llama.cpp (node-llama-cpp) continuing a tiny Llama with each scaling as
transformers does. The tiny models reuse the tiny Mistral's SentencePiece vocabulary."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from testkit import tiny_path
from testkit.llama_cpp import llama_runtime, run_llama_cpp

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    # original context 64 of 256: the ramp between the default beta_fast (32) and beta_slow (1)
    # covers the first 3 of head_dim 16's 8 frequencies
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    # wavelengths 2*pi*10000^(i/8): the first kept, the next two smoothed, the rest divided by 8
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def _tiny_llama(scaling: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, initializer_range=0.08, tie_word_embeddings=False,
                         rope_parameters={**scaling, "rope_theta": 10000.0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def _write(model, path: Path):
    from mistral_qlora.tools import gguf_file
    from mistral_qlora.tools.gguf_vocab import read_sentencepiece

    hyper = gguf_file.Hyper.from_config(model.config)
    vocab = read_sentencepiece(Path(tiny_path()) / "tokenizer.model", hyper.vocab)
    state = model.state_dict()
    plan = gguf_file.tensor_plan({k: tuple(v.shape) for k, v in state.items()}, hyper)
    gguf_file.write_gguf(path, path.stem, hyper, vocab, state, plan, "f16", "")
    return path


def _converter_rope_freqs(theta: float, dim: int, rope: dict) -> list[float]:
    """llama.cpp's converter's llama3 factors (LlamaModel.generate_extra_tensors), restated: float32
    frequencies, wavelengths and the smooth factor in Python floats."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


# yarn with the betas set: written as the converter writes them (llama.cpp's `llama` architecture
# may keep its defaults, so the llama.cpp check uses the defaults)
YARN_BETAS = {**SCALINGS["yarn"], "beta_fast": 16.0, "beta_slow": 2.0}


@pytest.mark.parametrize("name", [*SCALINGS, "yarn-betas"])
def test_rope_scaling_metadata_is_the_converters(name, tmp_path):
    import gguf

    path = _write(_tiny_llama(SCALINGS.get(name, YARN_BETAS)), tmp_path / f"{name}.gguf")
    reader = gguf.GGUFReader(path)
    got = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.rope.scaling.")}
    tensors = {t.name: t for t in reader.tensors}
    rope = SCALINGS.get(name, YARN_BETAS)
    if name == "yarn-betas":
        assert got == {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                       "llama.rope.scaling.original_context_length": 64,
                       "llama.rope.scaling.yarn_beta_fast": 16.0, "llama.rope.scaling.yarn_beta_slow": 2.0}
    elif name == "linear":
        assert got == {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    elif name == "yarn":
        assert got == {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                       "llama.rope.scaling.original_context_length": 64}
    else:
        assert got == {}  # llama3: the factors alone
        factors = tensors["rope_freqs.weight"]
        assert factors.tensor_type == gguf.GGMLQuantizationType.F32
        expected = _converter_rope_freqs(10000.0, 16, rope)
        np.testing.assert_allclose(factors.data, expected, rtol=1e-6)
        assert expected[0] == 1.0 and expected[-1] == 8.0 and 1.0 < expected[1] < 8.0  # all three bands
    assert name == "llama3" or "rope_freqs.weight" not in tensors


def test_an_unsupported_rope_scaling_is_one_clear_error():
    from types import SimpleNamespace

    from mistral_qlora.errors import UserError
    from mistral_qlora.tools.gguf_file import Hyper

    config = _tiny_llama({"rope_type": "linear", "factor": 2.0}).config
    odd = SimpleNamespace(**{**config.to_dict(), "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})
    with pytest.raises(UserError, match="rope scaling 'longrope' is not supported"):
        Hyper.from_config(odd)


@torch.no_grad()
def test_llama_cpp_continues_each_rope_scaling_as_transformers(tmp_path):
    """Greedy tokens of llama.cpp from 48-token prompts (positions well past where the scalings
    part from plain rope) are transformers', logits within f16 rounding; the same weights with
    plain rope give other logits, so the check sees the scaling."""
    runtime = llama_runtime()
    prompts = [torch.randint(3, 32000, (48,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]
    models, paths = {}, []
    for name, scaling in SCALINGS.items():
        models[name] = _tiny_llama(scaling)
        paths.append(str(_write(models[name], tmp_path / f"{name}.gguf")))
    plain = _tiny_llama({"rope_type": "default"})
    steps = 8
    got = run_llama_cpp(runtime, "llama_cpp_greedy.mjs", {"models": paths, "prompts": prompts, "steps": steps,
                                                           "top": 5}, tmp_path)
    for (name, model), path in zip(models.items(), paths):
        reference = model.half().float()  # the weights as the f16 file holds them
        plain_ref = plain.half().float()
        for prompt, answer in zip(prompts, got[path]):
            ids = torch.tensor([prompt + answer["tokens"]])
            logits = reference(ids).logits[0, len(prompt) - 1:-1]
            other = plain_ref(ids).logits[0, len(prompt) - 1:-1]
            for step, top in enumerate(answer["top"]):
                assert all(abs(v - logits[step, t].item()) < 0.05 for t, v in top), (name, step, top)
                best = logits[step].max().item()
                assert logits[step, answer["tokens"][step]].item() >= best - 0.05, (name, step)
            assert (other - logits).abs().max() > 0.1, name  # plain rope would not pass
