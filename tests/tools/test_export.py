"""Export: the merged tiny model as GGUF, read back with gguf's reader and run in a real llama.cpp
(node-llama-cpp's prebuilt binary), against transformers on the same merged weights.

The adapter is made here (PEFT LoRA with random, nonzero A and B on every projection) instead of
trained: what is checked is the export, and a random adapter moves every merged weight.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from testkit.llama_cpp import llama_runtime as find_llama_runtime
from testkit import QA, TESTKIT, tiny_path

TYPES = ("f16", "bf16", "q8_0")
# The file holds the merge (done in export's MERGE_DTYPE) as it was for f16 and bf16; q8_0 rounds
# each block of 32 weights to a multiple (at most 127) of its step, max|block|/127 stored in f16:
# off by at most half a step plus 127 times the step's f16 rounding.
Q8_0_BLOCK = 32
STEPS = 12  # generated tokens per prompt: prompt + answer stay under the tiny model's 64-token window


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mistral_qlora.model.adapter import record_base_model

    folder = tmp_path_factory.mktemp("export") / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_path(), dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(
            r=8, lora_alpha=16, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.save_pretrained(str(folder))
    record_base_model(folder, "tiny-random-mistral")
    return folder


@pytest.fixture(scope="module")
def exported(adapter):
    from mistral_qlora.tools.export import export_model

    out = adapter.parent / "gguf"
    return {t: export_model(str(adapter), str(out / f"tiny-{t}.gguf"), qtype=t) for t in TYPES}


@pytest.fixture(scope="module")
def merged(adapter):
    """dtype -> the merged model as tools.merge.load_merged makes it in that dtype, in fp32; each
    loaded once (the caller must not change it)."""
    from mistral_qlora.tools.merge import load_merged

    cache = {}

    def get(dtype: str):
        if dtype not in cache:
            cache[dtype] = load_merged(str(adapter), dtype)[0].float().eval()
        return cache[dtype]

    return get


@pytest.fixture(scope="module")
def readers(exported):
    """type -> GGUFReader of its file (parsing a 32000-token vocabulary takes a while: once each)."""
    from gguf import GGUFReader

    return {t: GGUFReader(gguf_path) for t, (gguf_path, _) in exported.items()}


def _field(reader, key):
    return reader.fields[key].contents()


def test_gguf_round_trip_holds_every_tensor_the_metadata_and_the_vocabulary(merged, exported, readers):
    from gguf.quants import dequantize
    from sentencepiece import SentencePieceProcessor

    from mistral_qlora.tools.export import MERGE_DTYPE
    from mistral_qlora.tools.chat_format import JINJA_V1
    from mistral_qlora.tools.gguf_file import gguf_name, permute_rotary

    cfg = merged("bf16").config
    sp = SentencePieceProcessor(model_file=str(Path(tiny_path()) / "tokenizer.model"))
    for qtype, (gguf_path, modelfile) in exported.items():
        assert gguf_path.is_file() and modelfile.is_file()
        assert not list(gguf_path.parent.glob(".*"))  # no temporary file left behind
        reader = readers[qtype]
        assert _field(reader, "general.architecture") == "llama"
        assert _field(reader, "llama.block_count") == cfg.num_hidden_layers
        assert _field(reader, "llama.embedding_length") == cfg.hidden_size
        assert _field(reader, "llama.feed_forward_length") == cfg.intermediate_size
        assert _field(reader, "llama.attention.head_count") == cfg.num_attention_heads
        assert _field(reader, "llama.attention.head_count_kv") == cfg.num_key_value_heads
        assert _field(reader, "llama.rope.dimension_count") == cfg.head_dim
        assert _field(reader, "llama.context_length") == cfg.max_position_embeddings
        assert _field(reader, "llama.rope.freq_base") == pytest.approx(cfg.rope_parameters["rope_theta"])
        assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
        assert _field(reader, "tokenizer.ggml.model") == "llama"
        assert _field(reader, "tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
        assert _field(reader, "tokenizer.ggml.scores")[:5] == pytest.approx([sp.get_score(i) for i in range(5)])
        types = _field(reader, "tokenizer.ggml.token_type")
        assert types[:3] == [2, 3, 3] and types[3] == 6 and types[-1] == 1  # unk, <s>, </s>, <0x00>, a piece
        assert (_field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id"),
                _field(reader, "tokenizer.ggml.unknown_token_id")) == (1, 2, 0)
        assert _field(reader, "tokenizer.ggml.add_bos_token") is True
        assert _field(reader, "tokenizer.chat_template") == JINJA_V1  # no run folder: auto, v1 here
        assert _field(reader, "general.file_type") == {"f16": 1, "bf16": 32, "q8_0": 7}[qtype]  # llama.cpp's ftype

        tensors = {t.name: t for t in reader.tensors}
        expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
            f"blk.{i}.{n}.weight" for i in range(cfg.num_hidden_layers)
            for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                      "attn_norm", "ffn_norm")}
        assert set(tensors) == expected
        for hf_name, ref in merged(MERGE_DTYPE[qtype]).state_dict().items():
            if hf_name.endswith("q_proj.weight"):
                ref = permute_rotary(ref, cfg.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                ref = permute_rotary(ref, cfg.num_key_value_heads)
            name = gguf_name(hf_name)
            t = tensors[name]
            assert [int(n) for n in reversed(t.shape)] == list(ref.shape), name  # GGUF lists dimensions innermost first
            got = dequantize(t.data, t.tensor_type).reshape(ref.shape)
            ref = ref.numpy()
            if ref.ndim == 1:  # norms stay float32 (from the merge's dtype)
                assert t.tensor_type.name == "F32"
            else:
                assert t.tensor_type.name == qtype.upper(), name
            if qtype != "q8_0" or ref.ndim == 1:
                np.testing.assert_array_equal(got, ref, err_msg=f"{qtype} {name}")
                continue
            blocks, got_blocks = ref.reshape(-1, Q8_0_BLOCK), got.reshape(-1, Q8_0_BLOCK)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            # half a step, plus up to 127 steps times the step's f16 rounding (2^-11 relative)
            bound = step * (0.5 + 127 * 2.0 ** -11) + 1e-12
            assert (np.abs(got_blocks - blocks) <= bound).all(), f"q8_0 {name}"
            assert np.abs(got - ref).max() > 0  # quantized for real


def test_chat_template_and_modelfile(exported):
    import jinja2

    from mistral_qlora.tools.chat_format import JINJA_V1, OLLAMA_V1, ChatFormat, modelfile_text

    template = jinja2.Environment().from_string(JINJA_V1)
    kw = {"bos_token": "<s>", "eos_token": "</s>"}
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "q2"}]
    assert template.render(messages=turns, **kw) == "<s>[INST] q1 [/INST] a1</s>[INST] q2 [/INST]"
    system = [{"role": "system", "content": "Be brief."}, *turns]
    assert template.render(messages=system, **kw) == "<s>[INST] Be brief.\n\nq1 [/INST] a1</s>[INST] q2 [/INST]"

    gguf_path, modelfile = exported["q8_0"]
    v1 = ChatFormat("mistral-v1", JINJA_V1, OLLAMA_V1, ("</s>", "[INST]"))
    assert modelfile.name == "tiny-q8_0.Modelfile" and modelfile.read_text() == modelfile_text(gguf_path.name, v1)
    lines = modelfile.read_text().splitlines()
    assert "FROM ./tiny-q8_0.gguf" in lines
    assert 'PARAMETER stop "</s>"' in lines and 'PARAMETER stop "[INST]"' in lines


def test_mistral_7b_takes_the_same_path():
    """Mistral-7B-Instruct-v0.2's shapes (on the meta device: nothing allocated) through the plan,
    the rotary reordering and the size estimate the disk check uses."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from mistral_qlora.model.builtin import MISTRAL_7B_V02
    from mistral_qlora.tools import gguf_file
    from mistral_qlora.tools.gguf_vocab import read_sentencepiece

    config = MistralConfig(**MISTRAL_7B_V02)
    hyper = gguf_file.Hyper.from_config(config)
    assert (hyper.layers, hyper.heads, hyper.kv_heads, hyper.head_dim, hyper.rope_theta) == (32, 32, 8, 128, 1e6)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = gguf_file.tensor_plan(shapes, hyper)
    assert len(plan) == 32 * 9 + 3
    assert all(gguf_file.ggml_type("q8_0", shape).name == ("Q8_0" if len(shape) == 2 else "F32")
               for _, _, shape in plan)
    q = model.model.layers[0].self_attn.q_proj.weight
    k = model.model.layers[0].self_attn.k_proj.weight
    assert gguf_file.permute_rotary(q, 32).shape == (4096, 4096)
    assert gguf_file.permute_rotary(k, 8).shape == (1024, 4096)
    vocab = read_sentencepiece(Path(tiny_path()) / "tokenizer.model", hyper.vocab)
    params = sum(math.prod(shape) for _, _, shape in plan)
    assert 7.2e9 < params < 7.3e9
    for qtype, bytes_per_weight in (("f16", 2), ("bf16", 2), ("q8_0", 34 / 32)):
        estimate = gguf_file.estimate_bytes(plan, qtype, vocab)
        assert params * bytes_per_weight < estimate < params * bytes_per_weight * 1.01 + 2e6, qtype


# --- a real llama.cpp --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_runtime() -> tuple[str, Path]:
    return find_llama_runtime()


def _llama_cpp_greedy(runtime: tuple[str, Path], gguf_paths: list[Path], prompts: list[list[int]],
                      tmp_path: Path) -> list[list[dict]]:
    """Per file, per prompt: llama.cpp's greedy tokens and its top-5 logits at each step."""
    node, prefix = runtime
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"models": [str(p) for p in gguf_paths], "prompts": prompts, "steps": STEPS,
                                   "top": 5}))
    proc = subprocess.run([node, str(TESTKIT / "llama_cpp_greedy.mjs"), str(prefix), str(request)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    return [results[str(p)] for p in gguf_paths]


@torch.no_grad()
def _agrees(model, prompt: list[int], got: dict, tolerance: float) -> None:
    """llama.cpp's continuation against transformers on the same tokens (teacher-forced on
    llama.cpp's own continuation): at each step, llama.cpp's top-5 logits within `tolerance` of
    transformers', and the token it picked transformers' best or within `tolerance` of it."""
    logits = model(torch.tensor([prompt + got["tokens"]])).logits[0, len(prompt) - 1:-1].float()
    for step, top in enumerate(got["top"]):
        for token, value in top:
            assert abs(value - logits[step, token].item()) < tolerance, (step, token)
        assert logits[step, got["tokens"][step]] >= logits[step].max() - tolerance, step


@torch.no_grad()
def _transformers_greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation and the logits that chose each token."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                         do_sample=False, pad_token_id=0)
    logits = model(out).logits[0, len(prompt) - 1:-1].float()
    return out[0, len(prompt):].tolist(), logits


# llama.cpp against transformers, in logits (about 5 here). f16: the CPU backend rounds activations
# to f16 before its f16 products, a few hundredths at most. q8_0: llama.cpp quantizes activations to
# 8 bits as well, so against the very weights the file holds (dequantized into transformers) its
# logits stay within Q8_0_RUNTIME_TOLERANCE; against the merged model the weights' own rounding (up
# to half a step of max|block|/127 each, nothing averaging it out in random weights) adds more:
# Q8_0_MERGED_TOLERANCE. The random tiny model's logits crowd together (its top 5 often within
# 0.1), so a greedy pick may flip between near-ties: the q8_0 check is in logits, not tokens.
F16_TOLERANCE = 0.05
Q8_0_RUNTIME_TOLERANCE = 0.2
Q8_0_MERGED_TOLERANCE = 0.5


@torch.no_grad()
def _with_gguf_weights(model, reader):
    """`model` with every weight replaced by the GGUF file's, dequantized (rotary rows put back
    in transformers' order)."""
    from gguf.quants import dequantize

    from mistral_qlora.tools.gguf_file import gguf_name

    cfg = model.config
    tensors = {t.name: t for t in reader.tensors}
    for name, p in model.named_parameters():
        t = tensors[gguf_name(name)]
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(p.shape).copy())
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # inverse of gguf_file.permute_rotary
            heads = cfg.num_attention_heads if name.endswith("q_proj.weight") else cfg.num_key_value_heads
            w = w.reshape(heads, p.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(p.shape)
        p.copy_(w)
    return model


def test_llama_cpp_continues_like_transformers(llama_runtime, merged, exported, readers, tmp_path):
    from mistral_qlora.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_path())
    prompts = [[tokenizer.bos_token_id] + tokenizer(f"[INST] {q} [/INST]", add_special_tokens=False)["input_ids"]
               for q, _ in QA[:3]]
    assert all(len(p) + STEPS < 64 for p in prompts)  # llama.cpp attends to all; the tiny model's window is 64

    # transformers on the merged model as the f16 file holds it: weights rounded to f16, computed in fp32
    reference = merged("fp16")

    # f16: token for token the greedy continuation of transformers; should the two part, only at a
    # tie (transformers' best two within F16_TOLERANCE), where greedy decoding is arbitrary
    f16, q8_0 = _llama_cpp_greedy(llama_runtime, [exported["f16"][0], exported["q8_0"][0]], prompts, tmp_path)
    for prompt, got in zip(prompts, f16):
        tokens, logits = _transformers_greedy(reference, prompt)
        if got["tokens"] != tokens:
            step = next(i for i, (a, b) in enumerate(zip(got["tokens"], tokens)) if a != b)
            best, second = logits[step].topk(2).values.tolist()
            assert best - second < F16_TOLERANCE, f"llama.cpp parts from transformers at step {step}: {got['tokens']} {tokens}"
        _agrees(reference, prompt, got, F16_TOLERANCE)

    # q8_0: in logits, at every step
    q8_0_weights = _with_gguf_weights(copy.deepcopy(merged("bf16")), readers["q8_0"])
    for prompt, got in zip(prompts, q8_0):
        _agrees(q8_0_weights, prompt, got, Q8_0_RUNTIME_TOLERANCE)
        _agrees(reference, prompt, got, Q8_0_MERGED_TOLERANCE)


# --- bad input: one line, exit 2, nothing written -----------------------------------------------

def _cli(capsys, *args: str) -> tuple[int, str]:
    """`mistral-qlora export ARGS` in this process: (exit code, stderr); stdout stays in capsys."""
    from mistral_qlora.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["export", *args])
    captured = capsys.readouterr()
    print(captured.out, end="")
    return exit_info.value.code, captured.err


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2 and err.count("\n") == 1 and err.startswith("mistral-qlora: error: "), err
    assert all(w in err for w in words), err


def test_bad_input_is_one_line_and_writes_nothing(adapter, exported, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out" / "model.gguf"

    # an adapter whose base is not here
    orphan = tmp_path / "orphan"
    shutil.copytree(adapter, orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/no/such/base"}))
    _one_line_error(*_cli(capsys, "--adapter", str(orphan), "--output", str(out)), "/no/such/base", "--model")

    # an unknown type or format
    _one_line_error(*_cli(capsys, "--adapter", str(adapter), "--output", str(out), "--type", "q4_k"),
                    "q4_k", "f16, bf16, q8_0")
    _one_line_error(*_cli(capsys, "--adapter", str(adapter), "--output", str(out), "--format", "onnx"), "onnx",
                    "gguf-lora")
    _one_line_error(*_cli(capsys, "--adapter", str(adapter), "--output", str(tmp_path / "st"), "--format",
                          "safetensors", "--type", "q8_0"), "q8_0 is a GGUF type")

    # too little disk for the file (its size estimated from the tensor shapes, before anything loads)
    from mistral_qlora.tools import export

    free = {"bytes": 10**6}
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, free["bytes"]))
    _one_line_error(*_cli(capsys, "--adapter", str(adapter), "--output", str(out), "--type", "q8_0"),
                    str(out), "needs about 0.02 GB", "0.00 GB free")
    monkeypatch.undo()
    assert not (tmp_path / "out").exists()

    # an output that exists, without --overwrite: left as it was
    existing = exported["q8_0"][0]
    before = existing.read_bytes()
    _one_line_error(*_cli(capsys, "--adapter", str(adapter), "--output", str(existing), "--type", "q8_0"),
                    str(existing), "--overwrite")
    assert existing.read_bytes() == before


def test_a_failure_while_writing_leaves_no_file(adapter, tmp_path, monkeypatch):
    from mistral_qlora.tools import export, gguf_file

    calls = {"n": 0}
    real = gguf_file._as_array

    def fails_on_the_fifth_tensor(weight, t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk went away")
        return real(weight, t)

    monkeypatch.setattr(gguf_file, "_as_array", fails_on_the_fifth_tensor)
    with pytest.raises(OSError, match="disk went away"):
        export.export_model(str(adapter), str(tmp_path / "model.gguf"), qtype="f16")
    assert calls["n"] == 5 and list(tmp_path.iterdir()) == []


def test_export_overwrites_when_asked_and_safetensors_is_merge(adapter, exported, tmp_path, capsys):
    from gguf import GGUFReader

    target = tmp_path / "model.gguf"
    shutil.copy(exported["q8_0"][0], target)  # a q8_0 file, replaced by an f16 one
    code, _ = _cli(capsys, "--adapter", str(adapter), "--output", str(target), "--type", "f16", "--overwrite")
    assert code == 0 and f"ollama create NAME -f {tmp_path / 'model.Modelfile'}" in capsys.readouterr().out
    assert {t.tensor_type.name for t in GGUFReader(target).tensors} == {"F16", "F32"}
    assert (tmp_path / "model.Modelfile").is_file()

    code, _ = _cli(capsys, "--adapter", str(adapter), "--output", str(tmp_path / "st"), "--format", "safetensors")
    assert code == 0
    assert (tmp_path / "st" / "config.json").is_file() and list((tmp_path / "st").glob("*.safetensors"))
