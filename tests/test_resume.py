"""Nothing lost: SIGTERM saves and resumes exactly; kill -9 at random moments loses nothing."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, story_records

STEPS = 24


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mistral_qlora", "train", str(ROOT / "configs/tiny.yaml"),
            "--set", f"data.train={data}", "--set", "data.max_seq_len=128", "--set", "data.tokens_per_row=128",
            "--set", f"train.max_steps={STEPS}", "--set", "train.save_steps=3", "--set", "train.logging_steps=1",
            "--set", "train.eval_steps=1000", "--set", "train.keep_checkpoints=2", "--set", "eval.samples=0",
            "--set", f"output_dir={out}", *extra]


def _start(data, out, *extra):
    return subprocess.Popen(_args(data, out, *extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _adapter(out: Path) -> dict:
    return load_file(str(out / "adapter/adapter_model.safetensors"))


def _train_losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "history.json").read_text())
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def _assert_same_adapter(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "qa.json"
    path.write_text(json.dumps(story_records(60)))
    return path


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = subprocess.run(_args(data, out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _wait_for(predicate, proc, timeout=300, poll=0.002):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError


def test_sigterm_saves_and_the_resumed_run_is_exact(data, reference, tmp_path):
    out = tmp_path / "run"
    proc = _start(data, out)
    assert _wait_for(lambda: (out / "checkpoints/checkpoint-6").is_dir(), proc), "finished before the signal"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "preempted: stopped at step" in err and "run the same command again to resume" in err
    assert not (out / "summary.json").exists()
    saved = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert saved and all((c / "manifest.json").is_file() for c in saved)
    stopped_at = max(int(c.name.split("-")[1]) for c in saved)
    assert 6 <= stopped_at < STEPS

    proc = subprocess.run(_args(data, out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from"].endswith(f"checkpoint-{stopped_at}")
    assert _train_losses(out) == _train_losses(reference)  # every step's loss, bit for bit
    _assert_same_adapter(_adapter(out), _adapter(reference))


def test_a_kill_after_the_last_checkpoint_trains_no_extra_step(data, reference, tmp_path):
    """Killed after the final checkpoint was committed, before the adapter and summary: the next
    run finishes from that checkpoint without training (the Trainer alone would take a 25th step)."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()
    assert (out / f"checkpoints/checkpoint-{STEPS}/manifest.json").is_file()
    proc = subprocess.run(_args(data, out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint-{STEPS} was saved at the run's last step ({STEPS}): nothing left to train" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from"].endswith(f"checkpoint-{STEPS}")
    _assert_same_adapter(_adapter(out), _adapter(reference))
    assert _train_losses(out) == _train_losses(reference)


def test_kill_9_at_random_moments_loses_nothing(data, reference, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(1234)
    kills, during_write = 0, 0
    staging = out / "checkpoints/.staging"
    while kills < 10:
        if staging.is_dir() and any(staging.iterdir()):
            during_write += 1  # the last kill landed while a checkpoint was being written
        proc = _start(data, out)
        mode = kills % 3
        if mode == 0:  # any moment: start-up, loading, training
            alive = _wait_for(lambda t=time.time() + rng.uniform(0.5, 8): time.time() > t, proc)
        elif mode == 1:  # while the Trainer is writing a checkpoint into staging
            alive = _wait_for(lambda: staging.is_dir() and any(staging.iterdir()), proc, poll=0.0005)
        else:  # right after a commit
            before = {p.name for p in (out / "checkpoints").glob("checkpoint-*")}
            alive = _wait_for(lambda: {p.name for p in (out / "checkpoints").glob("checkpoint-*")} - before, proc)
        if not alive:
            break  # it finished before we could kill it
        proc.kill()
        proc.wait()
        kills += 1
    else:
        proc = subprocess.run(_args(data, out), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.returncode != 0 and not (out / "summary.json").exists():
        pytest.fail(f"the run ended with {proc.returncode}")
    assert kills >= 10, f"only {kills} kills landed before the run finished"
    assert during_write >= 1, "no kill landed during a checkpoint write"
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
    _assert_same_adapter(_adapter(out), _adapter(reference))
    assert _train_losses(out) == _train_losses(reference)


@pytest.mark.slow
def test_zero3_two_processes_sigterm_and_resume_is_exact(data, tmp_path):
    """The same under 2-process ZeRO-3 (accelerate launch, gloo): the signal reaches the launcher,
    which passes it to the training processes; they save their partitions and exit 75."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for k in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        env.pop(k, None)
    extra = ("--nproc", "2", "--set", "train.strategy=zero3", "--set", "train.max_steps=12",
             "--set", "lora.dropout=0")

    def run(out):
        return subprocess.run(_args(data, out, *extra), cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)

    ref = tmp_path / "ref"
    proc = run(ref)
    assert proc.returncode == 0, proc.stderr[-4000:]

    out = tmp_path / "run"
    proc = subprocess.Popen(_args(data, out, *extra), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: (out / "checkpoints/checkpoint-3").is_dir(), proc), "finished before the signal"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-4000:]
    assert not (out / "summary.json").exists()
    saved = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    stopped_at = int(saved[-1].name.split("-")[1])
    assert 3 <= stopped_at < 12
    assert list(saved[-1].glob("global_step*/*zero_pp_rank_1*"))  # rank 1's partition is in the checkpoint

    proc = run(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "zero3" and summary["steps"] == 12
    assert summary["resumed_from"].endswith(f"checkpoint-{stopped_at}")
    ref_losses, losses = _train_losses(ref), _train_losses(out)
    assert ref_losses.keys() == losses.keys()
    assert all(abs(ref_losses[k] - losses[k]) < 1e-6 for k in ref_losses), (ref_losses, losses)
    _assert_same_adapter(_adapter(out), _adapter(ref))
