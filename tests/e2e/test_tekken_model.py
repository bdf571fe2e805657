"""The built-in Tekken model (model/builtin.py: Mistral-Nemo's shape, head_dim != hidden / heads,
Nemo's tekken.json) trains on tool-call records, merges and generates through the CLI on the CPU;
generation renders the tools and stops at EOS."""

import json

import pytest
import torch

from mistral_qlora.model.builtin import TINY_TEKKEN_CONFIG

from testkit import ROOT, run_cli
from testkit.tool_records import TOOLS, tool_records


@pytest.mark.slow
def test_tekken_model_trains_on_tool_calls_merges_and_generates(tmp_path):
    assert TINY_TEKKEN_CONFIG["head_dim"] * TINY_TEKKEN_CONFIG["num_attention_heads"] != TINY_TEKKEN_CONFIG["hidden_size"]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in tool_records(24, seed=3)))
    out = tmp_path / "run"
    res = run_cli("train", str(ROOT / "configs/tiny.yaml"), "--set", "model.name_or_path=tiny-random-tekken",
                  "--set", f"data.train={data}", "--set", "train.max_steps=2", "--set", "data.tokens_per_row=256",
                  "--set", "data.max_seq_len=256", "--set", "eval.samples=1", "--set", f"output_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "chat template: mistral-tekken (auto: a Tekken vocabulary (v3)" in res.stderr
    assert (out / "summary.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    merged = tmp_path / "merged"
    res = run_cli("merge", "--adapter", str(out / "adapter"), "--output", str(merged))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (merged / "tekken.json").is_file()
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    res = run_cli("generate", "--model", str(merged), "--bits", "16", "--tools", str(tools), "--prompt",
                  "Weather in Paris?", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith('[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "get_weather"')
    assert "[/AVAILABLE_TOOLS][INST]Weather in Paris?[/INST]" in res.stdout


@pytest.mark.slow
def test_tekken_generation_stops_at_eos():
    """A model whose head makes EOS the first greedy token: the answer ends there, not at max_new_tokens."""
    from transformers import AutoModelForCausalLM

    from mistral_qlora.data.formats import Conversation
    from mistral_qlora.data.templates import resolve_template
    from mistral_qlora.model.base import resolve_model_path
    from mistral_qlora.model.greedy import greedy_answers
    from mistral_qlora.model.tokenizer import load_tokenizer

    path = resolve_model_path("tiny-random-tekken")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    template = resolve_template("auto", tokenizer)
    prompt = Conversation([("Weather in Paris?", "")], tools=TOOLS)
    ids = template.generation_ids(prompt)
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id] = hidden / hidden.norm()
    calls = []
    original = model.generate
    model.generate = lambda **kw: calls.append(original(**kw)) or calls[-1]
    assert greedy_answers(model, tokenizer, [prompt], max_new_tokens=8, template=template) == [""]
    assert calls[0][0, len(ids):].tolist() == [tokenizer.eos_token_id]
