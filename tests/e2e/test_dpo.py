"""DPO through the command line: the toy preference set learned, SIGTERM and an exact resume that
reuses the cached reference log-probs, 2-process ZeRO-2 and ZeRO-3 runs whose distributed reference
pass equals one process's, and merge / export / generate on the adapter.

The toy set is dataset/story_pairs.jsonl (a question, its own answer chosen, another record's
answer rejected). Its held-out pairs are the sampled training questions, each with its own answer
against an answer it was never compared with in training: a model with random weights cannot tell
which answer belongs to an unseen question (that needs language it does not have), but DPO must
make it prefer a question's own answer in general, not only over the one answer it was trained
against."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from testkit import ROOT, write_jsonl, wait_for

STEPS = 24
TRAIN_PAIRS, EVAL_PAIRS = 48, 24


def toy_pairs(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a seeded sample of the toy set, and for its first EVAL_PAIRS questions
    their own answer against another sampled question's answer that is neither it nor the one
    they were trained against."""
    rows = [json.loads(line) for line in (ROOT / "dataset/story_pairs.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    train = rng.sample(rows, TRAIN_PAIRS)
    held_out = []
    for r in train[:EVAL_PAIRS]:
        others = [o["chosen"] for o in train if o["chosen"] not in (r["chosen"], r["rejected"])]
        held_out.append({**r, "rejected": rng.choice(others)})
    return train, held_out


def _args(train: Path, evals: Path, out: Path, *extra: str) -> list[str]:
    sets = {"data.train": train, "data.eval": evals, "data.max_seq_len": 48, "data.tokens_per_row": 384,
            "train.method": "dpo", "train.max_steps": STEPS, "train.learning_rate": 2e-3,
            "train.gradient_checkpointing": "false", "train.logging_steps": 1, "train.eval_steps": 1000,
            "train.save_steps": 3, "train.keep_checkpoints": 2, "lora.dropout": 0, "eval.samples": 1,
            "eval.max_new_tokens": 4, "train.report_to": "[none]", "output_dir": out}
    args = [sys.executable, "-m", "mistral_qlora", "train", str(ROOT / "configs/tiny.yaml")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


def _env(cache: Path) -> dict:
    env = {**os.environ, "MISTRAL_QLORA_DATA_CACHE": str(cache), "DS_ACCELERATOR": "cpu"}
    for k in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        env.pop(k, None)
    return env


def _train_losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in json.loads((out / "history.json").read_text()) if "loss" in e}


def _reference_files(cache: Path) -> list[Path]:
    return sorted((cache / "reference").glob("*.npz"))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The files and one finished run of the toy set: (train file, eval file, data cache, run)."""
    root = tmp_path_factory.mktemp("dpo")
    train, held_out = toy_pairs()
    train_file, eval_file = write_jsonl(root / "train.jsonl", train), write_jsonl(root / "eval.jsonl", held_out)
    cache, out = root / "cache", root / "run"
    proc = subprocess.run(_args(train_file, eval_file, out), cwd=ROOT, env=_env(cache), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return train_file, eval_file, cache, out


def test_dpo_lifts_held_out_preference_accuracy_on_the_toy_set(toy):
    *_, out = toy
    summary = json.loads((out / "summary.json").read_text())
    pref = summary["preference"]
    assert summary["steps"] == STEPS and pref["reference_computed"] is True
    # before: the base's (random) preference, about a coin toss; after: the question's own answer
    assert 0.2 <= pref["preference_accuracy_before"] <= 0.8, pref
    assert pref["preference_accuracy_after"] >= 0.9, pref
    train = [e for e in json.loads((out / "history.json").read_text()) if "rewards/margins" in e]
    assert train[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # the first step's policy is the reference
    assert train[-1]["loss"] < 0.1 and train[-1]["rewards/margins"] > 1.0 and train[-1]["rewards/accuracies"] == 1.0
    assert pref["eval"]["rewards/accuracies"] >= 0.9 and pref["eval"]["rewards/margins"] > 0



def test_sigterm_saves_and_the_resumed_dpo_run_is_exact_with_the_cached_reference(toy, tmp_path):
    train_file, eval_file, cache, reference = toy
    out = tmp_path / "run"
    env = _env(cache)  # the toy run's data cache: its reference log-probs are this run's too
    ref_file, = _reference_files(cache)
    written = ref_file.stat().st_mtime_ns
    proc = subprocess.Popen(_args(train_file, eval_file, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (out / "checkpoints/checkpoint-6").is_dir(), proc), "finished before the signal"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert not (out / "summary.json").exists()
    stopped_at = max(int(c.name.split("-")[1]) for c in (out / "checkpoints").glob("checkpoint-*"))
    assert 6 <= stopped_at < STEPS

    proc = subprocess.run(_args(train_file, eval_file, out), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"DPO reference log-probs: read from {ref_file}" in proc.stderr
    assert "one pass over the train and eval pairs" not in proc.stderr
    assert ref_file.stat().st_mtime_ns == written and _reference_files(cache) == [ref_file]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"checkpoint-{stopped_at}") and summary["steps"] == STEPS
    assert _train_losses(out) == _train_losses(reference)  # every step's loss, bit for bit
    assert json.loads((out / "summary.json").read_text())["preference"]["eval"] == \
        json.loads((reference / "summary.json").read_text())["preference"]["eval"]
    a, b = (load_file(str(o / "adapter/adapter_model.safetensors")) for o in (out, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_export_and_generate_run_on_the_dpo_adapter(toy, tmp_path):
    from testkit import run_cli

    *_, out = toy
    merged = tmp_path / "merged"
    proc = run_cli("merge", "--adapter", str(out / "adapter"), "--output", str(merged))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(merged.glob("*.safetensors")) and (merged / "config.json").is_file()
    exported = tmp_path / "exported"
    proc = run_cli("export", "--adapter", str(out / "adapter"), "--format", "safetensors", "--output", str(exported))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(exported.glob("*.safetensors"))
    proc = run_cli("generate", "--adapter", str(out / "adapter"), "--prompt", "What is photosynthesis?",
                   "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_two_process_deepspeed_dpo_gives_one_process_reference_log_probs(toy, tmp_path, strategy):
    """`--nproc 2` under ZeRO-2 and ZeRO-3 (accelerate launch, gloo): each rank scores every other
    row of the reference pass and the sums are all-reduced; the cached table equals the one-process
    run's (the toy run's, of the same data and rows), and the run trains and finishes."""
    train_file, eval_file, one_cache, _ = toy
    cache, out = tmp_path / "cache", tmp_path / "run"
    proc = subprocess.run(_args(train_file, eval_file, out, "--nproc", "2", "--set", f"train.strategy={strategy}",
                                "--set", "train.max_steps=2", "--set", "train.save_steps=100"),
                          cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == strategy and summary["steps"] == 2
    pref = summary["preference"]
    assert pref["reference_computed"] is True
    assert all(np.isfinite(v) for part in ("train", "eval") for v in pref[part].values())
    assert all(np.isfinite(v) for v in _train_losses(out).values())
    (mine,), (one,) = _reference_files(cache), _reference_files(one_cache)
    assert mine.name == one.name  # the same key: base, adapter, data and rows
    with np.load(mine) as got, np.load(one) as want:
        assert set(got.files) == set(want.files) == {"train", "eval"}
        for split in want.files:
            assert got[split].shape == want[split].shape and (got[split] < 0).all()
            np.testing.assert_allclose(got[split], want[split], rtol=1e-6, atol=1e-4)
