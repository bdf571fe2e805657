"""Streaming: sources mixed, tokenized and packed on the fly; a resumed stream (and a resumed
training run) continues exactly where the checkpoint says."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from mistral_qlora.config import load_config
from mistral_qlora.data import build_data
from mistral_qlora.bench.synthetic import qa_records

from testkit import ROOT, story_records, tiny_path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("stream")
    a = tmp / "a.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in qa_records(120, seed=1)))
    b = tmp / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": r["prompt"], "answer": r["response"]}
                                         for r in qa_records(90, seed=2)]), b)
    return a, b


def _stream(a: Path, b: Path, buffer: int = 16):
    from mistral_qlora.model.tokenizer import load_tokenizer

    cfg = load_config(None, [f"data.train=[{{path: {a}, weight: 2}}, {{path: {b}, weight: 1, "
                             "columns: {prompt: question, response: answer}}]", "data.streaming=true",
                             "data.eval_fraction=0", f"data.stream_buffer={buffer}", "data.max_seq_len=256",
                             "data.tokens_per_row=512", "train.max_steps=1"])
    return build_data(cfg.data, load_tokenizer(tiny_path()), seed=3).stream


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_the_stream_mixes_packs_and_resumes_at_any_row(sources):
    stream = _stream(*sources)
    first_pass = list(stream)
    second_pass = list(stream)
    again = _stream(*sources)
    assert first_pass and list(again) == first_pass and list(again) == second_pass  # deterministic for the seed
    assert second_pass != first_pass  # a later pass draws the mix and the rows anew
    assert all(sum(len(ex["input_ids"]) for ex in row) <= 512 for row in first_pass)
    stats, per_source, rows = stream.scan()
    assert rows == len(first_pass) and stats.tokens == sum(len(ex["input_ids"]) for row in first_pass for ex in row)
    drawn_a, drawn_b = per_source[0][0], per_source[1][0]
    assert drawn_a == 120 or drawn_b == 90  # the pass ends when a drawn source runs out
    assert 0.55 < drawn_a / (drawn_a + drawn_b) < 0.8  # weights 2:1

    n = len(first_pass)
    for at in (3, n // 2, n - 1, n, n + 5):  # inside chunks, at their edges, into the next pass
        fresh = _stream(*sources)
        if at < n:
            _take(iter(fresh), at + 1)  # the stream has produced the chunk holding row `at`
        else:
            list(fresh)
            _take(iter(fresh), at - n + 1)
        position = json.loads(json.dumps(fresh.position_at(at)))  # as a checkpoint stores it
        resumed = _stream(*sources)
        resumed.resume(position)
        got = list(resumed) if at < n else _take(iter(resumed), 2)
        want = (first_pass + second_pass)[at:n] if at < n else second_pass[at - n:at - n + 2]
        assert got == want, at


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mistral_qlora", "train", str(ROOT / "configs/tiny.yaml"),
            "--set", f"data.train={data}", "--set", "data.max_seq_len=128", "--set", "data.tokens_per_row=128",
            "--set", "data.streaming=true", "--set", "data.eval_fraction=0", "--set", "data.stream_buffer=8",
            "--set", "train.max_steps=8", "--set", "train.save_steps=2", "--set", "train.logging_steps=1",
            "--set", "train.keep_checkpoints=10", "--set", "eval.samples=0", "--set", f"output_dir={out}", *extra]


@pytest.mark.slow  # processes of their own
def test_a_streaming_run_resumed_from_a_checkpoint_is_exact(tmp_path):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps(story_records(60)))
    ref = tmp_path / "ref"
    proc = subprocess.run(_train_args(data, ref), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    position = json.loads((ref / "checkpoints/checkpoint-4/stream.json").read_text())
    assert position["rows"] == 4 and position["chunk"] > 0  # 4 rows of 8-record chunks: past the first

    # The same run stopped after checkpoint-4: what a preempted run leaves behind
    cut = tmp_path / "cut"
    shutil.copytree(ref, cut)
    for name in ("summary.json", "adapter", "checkpoints/checkpoint-6", "checkpoints/checkpoint-8"):
        p = cut / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    proc = subprocess.run(_train_args(data, cut), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "checkpoint-4" in proc.stderr

    a, b = load_file(str(ref / "adapter/adapter_model.safetensors")), load_file(str(cut / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    losses = [{e["step"]: e["loss"] for e in json.loads((d / "history.json").read_text()) if "loss" in e}
              for d in (ref, cut)]
    assert all(losses[0][s] == losses[1][s] for s in range(5, 9))

    # A stream has no epochs: each log says how many rows were read from it (1 row a step here),
    # counting on across the resume, on the console and in history.json alike
    for d in (ref, cut):
        logged = [e for e in json.loads((d / "history.json").read_text()) if "loss" in e]
        assert [e["stream_rows"] for e in logged] == [e["step"] for e in logged] and "epoch" not in logged[-1]
        assert json.loads((d / "summary.json").read_text())["stream_rows"] == 8
    shown = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert shown[0].startswith("step 5/8 | rows 5 | ") and shown[-1].startswith("step 8/8 | rows 8 | ")
    assert not any("epoch" in line for line in shown)
