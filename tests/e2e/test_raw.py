"""Continued pretraining on raw documents through `train`: the loss falls on a raw-text run, raw
and chat sources train together by weight, and a streamed raw run resumed from a checkpoint is exact."""

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from testkit import ROOT, story_records

WORDS = ["the", "river", "runs", "past", "the", "old", "mill", "and", "into", "the", "valley", "below"]


def _documents(n: int) -> list[dict]:
    """Documents of a repeating sentence, each a different length and starting word: text a tiny
    model learns to continue within a few steps."""
    return [{"text": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(40 + 13 * (i % 7))) + "."}
            for i in range(n)]


def _run(tmp_path, *sets):
    from mistral_qlora.config import load_config
    from mistral_qlora.train import run_training

    cfg = load_config(ROOT / "configs/tiny.yaml", ["data.max_seq_len=64", "data.tokens_per_row=128",
                                                   "train.logging_steps=1", "eval.max_new_tokens=4",
                                                   f"output_dir={tmp_path / 'run'}", *sets])
    return run_training(cfg)


def test_the_loss_falls_on_a_raw_text_run(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(r) + "\n" for r in _documents(60)))
    summary = _run(tmp_path, f"data.train=[{{path: {docs}, format: raw}}]", "train.max_steps=12",
                   "train.eval_steps=12", "train.save_steps=12", "train.learning_rate=5e-3", "eval.samples=1")
    assert summary["steps"] == 12
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.5
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()


def test_raw_documents_and_chat_records_train_together(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, r in enumerate(_documents(12)):
        (folder / f"{i:02d}.txt").write_text(r["text"])
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(story_records(30)))
    summary = _run(tmp_path, f"data.train=[{{path: '{folder}/*.txt', weight: 1}}, {{path: {chat}, weight: 2}}]",
                   "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2", "eval.samples=1")
    assert summary["steps"] == 2 and summary["final_eval_loss"] == summary["final_eval_loss"]  # a number, not NaN
    log = (tmp_path / "run/run.log").read_text()
    assert "documents read" in log and "records read" in log  # both sources in the run's log


def _stream_args(data, out):
    return ["-m", "mistral_qlora", "train", str(ROOT / "configs/tiny.yaml"), "--set", f"data.train=[{{path: {data}, "
            "format: raw}]", "--set", "data.max_seq_len=64", "--set", "data.tokens_per_row=128", "--set",
            "data.streaming=true", "--set", "data.eval_fraction=0", "--set", "data.stream_buffer=4", "--set",
            "train.max_steps=6", "--set", "train.save_steps=3", "--set", "train.logging_steps=1", "--set",
            "train.keep_checkpoints=10", "--set", "eval.samples=0", "--set", f"output_dir={out}"]


@pytest.mark.slow  # processes of their own
def test_a_streamed_raw_run_resumed_from_a_checkpoint_is_exact(tmp_path):
    import sys

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _documents(40)))
    ref = tmp_path / "ref"
    proc = subprocess.run([sys.executable, *_stream_args(data, ref)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    position = json.loads((ref / "checkpoints/checkpoint-3/stream.json").read_text())
    assert position["rows"] == 3 and position["chunk"] > 0  # past the first chunk of 4 documents

    cut = tmp_path / "cut"  # the same run stopped after checkpoint-3, as a preempted run leaves it
    shutil.copytree(ref, cut)
    for name in ("summary.json", "adapter", "checkpoints/checkpoint-6"):
        p = cut / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    proc = subprocess.run([sys.executable, *_stream_args(data, cut)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "checkpoint-3" in proc.stderr
    a = load_file(str(ref / "adapter/adapter_model.safetensors"))
    b = load_file(str(cut / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    losses = [{e["step"]: e["loss"] for e in json.loads((d / "history.json").read_text()) if "loss" in e}
              for d in (ref, cut)]
    assert all(losses[0][s] == losses[1][s] for s in range(4, 7))
