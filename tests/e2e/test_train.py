"""End to end: the tiny QLoRA fine-tune trains, learns, and leaves every artifact behind."""

import json

import pytest
import torch

from testkit import ROOT

SUMMARY_KEYS = {"initial_eval_loss", "final_eval_loss", "steps", "train_tokens", "tokens_per_second",
                "peak_memory_gib", "world_size", "attention_backend", "runtime_seconds"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from mistral_qlora.config import load_config
    from mistral_qlora.train import run_training

    out = tmp_path_factory.mktemp("run") / "tiny"
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"data.train={ROOT / 'dataset/story.json'}", "train.max_steps=40", "train.eval_steps=20",
        "train.save_steps=20", "train.logging_steps=5", "eval.samples=2", "eval.max_new_tokens=8",
        "train.peak_tflops=0.001",  # a CPU has no entry in the peak table: MFU against a given peak
        f"output_dir={out}",
    ])
    summary = run_training(cfg)
    return cfg, out, summary


def test_run_learns_and_writes_every_artifact(tiny_run):
    cfg, out, summary = tiny_run
    assert SUMMARY_KEYS <= set(summary)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["steps"] == 40 and summary["world_size"] == 1
    assert summary["attention_backend"] == "sdpa"
    assert summary["lora_layer"] == "fused"  # the default on a 4-bit base
    assert summary["flops_per_token"] > 0
    assert summary["mfu"] == pytest.approx(summary["tokens_per_second"] * summary["flops_per_token"] / 1e9)
    rated = [e for e in json.loads((out / "history.json").read_text()) if "tokens_per_second" in e]
    assert rated and all(e["mfu"] == pytest.approx(e["tokens_per_second"] * summary["flops_per_token"] / 1e9,
                                                   rel=1e-3) for e in rated)
    assert summary["peak_memory_of"] == "host" and summary["peak_memory_gib"] > 0  # CPU: the peak RSS
    assert summary["sliding_window"] == 64  # the tiny model's window is in force
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 1.0
    assert summary["train_tokens"] > 0 and summary["tokens_per_second"] > 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json"):
        assert (out / "adapter" / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "**Before:**" in (out / "samples.md").read_text()
    assert (out / "config.yaml").read_text() == cfg.to_yaml()
    assert any((out / "tensorboard").iterdir())
    adapter_cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "tiny-random-mistral"


def test_saved_adapter_reproduces_the_final_eval_loss(tiny_run):
    from peft import PeftModel

    from mistral_qlora.data import build_data
    from mistral_qlora.model.base import load_base_model, load_model_config, resolve_model_path
    from mistral_qlora.model.tokenizer import load_tokenizer

    cfg, out, summary = tiny_run
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(str(out / "adapter"))
    data = build_data(cfg.data, tokenizer, cfg.train.seed)
    base = load_base_model(path, load_model_config(path, cfg.model), None, cfg.quantization,
                           summary["attention_backend"], torch.float32)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    # The eval loss is the mean over every answer token of the eval set: each record run alone here.
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ex in data.eval:
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1].double()
            labels = torch.tensor(ex["labels"][1:])
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            tokens += int((labels != -100).sum())
    assert total / tokens == pytest.approx(summary["final_eval_loss"], abs=1e-4)


def test_generate_command_answers_with_the_adapter(tiny_run):
    from testkit import run_cli

    _, out, _ = tiny_run
    proc = run_cli("generate", "--adapter", str(out / "adapter"), "--prompt", "What is a noun?",
                   "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("[INST] What is a noun? [/INST]\n")
