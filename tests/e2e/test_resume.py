"""Nothing lost: SIGTERM saves and resumes exactly; kill -9 at every kind of moment loses nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from testkit import ROOT, story_records, wait_for

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


def test_sigterm_saves_and_the_resumed_run_is_exact(data, reference, tmp_path):
    out = tmp_path / "run"
    proc = _start(data, out)
    assert wait_for(lambda: (out / "checkpoints/checkpoint-6").is_dir(), proc), "finished before the signal"
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


class Attempt:
    """One start of the run, its stdout and stderr read line by line as they come."""

    def __init__(self, data: Path, out: Path):
        self.proc = subprocess.Popen(_args(data, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [threading.Thread(target=lines.extend, args=(stream,), daemon=True)
                         for lines, stream in ((self.stdout, self.proc.stdout), (self.stderr, self.proc.stderr))]
        for reader in self._readers:
            reader.start()

    def planned(self) -> bool:  # the run has logged its plan: it is loading the model or training
        return any("train.strategy=" in line for line in self.stderr)

    def steps_logged(self) -> int:  # the console's step lines of this start (logging_steps=1; run/console.py)
        return sum(1 for line in self.stdout if line.startswith("step "))

    def stop(self) -> None:
        """Freeze the process where it is (SIGSTOP), and let the readers take what it wrote."""
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.05)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.proc.kill()
        self.finish()

    def finish(self) -> int:
        code = self.proc.wait(timeout=600)
        for reader in self._readers:
            reader.join(timeout=10)
        return code


def _committed(out: Path) -> set[str]:
    return {p.name for p in (out / "checkpoints").glob("checkpoint-*")}


def _staged(out: Path) -> bool:
    staging = out / "checkpoints/.staging"
    return staging.is_dir() and any(staging.iterdir())


# The moments a kill -9 lands, each recognised by what the test sees while the process is frozen:
# - start-up: the plan is logged (the model loads next) and no step has been logged by this start;
# - training: a step has been logged and no checkpoint is being written;
# - a checkpoint write: the Trainer's staging folder holds a checkpoint being written;
# - after a commit: a checkpoint this start committed has appeared, and no other is being written.
KINDS = ("start-up", "training", "a checkpoint write", "after a commit")


def _kill_at(attempt: Attempt, out: Path, kind: str, deadline: float) -> bool:
    """Wait for the moment `kind` names, freeze the process, check that the moment is what the
    test sees, and kill it there (True); a moment missed (it moved on before the freeze) is let go
    and the next one awaited. False when the run ended first."""
    before, logged = _committed(out), attempt.steps_logged()
    triggers = {
        "start-up": attempt.planned,
        "training": lambda: attempt.steps_logged() > logged,
        "a checkpoint write": lambda: _staged(out),
        "after a commit": lambda: bool(_committed(out) - before),
    }
    checks = {
        "start-up": lambda: attempt.steps_logged() == 0,
        "training": lambda: not _staged(out),
        "a checkpoint write": lambda: _staged(out),
        "after a commit": lambda: bool(_committed(out) - before) and not _staged(out),
    }
    while time.time() < deadline:
        if attempt.proc.poll() is not None:
            return False
        if triggers[kind]():
            attempt.stop()
            if checks[kind]():
                attempt.kill()
                return True
            attempt.resume()
            if kind == "start-up":
                return False  # past start-up: this start cannot be killed there any more
            logged, before = attempt.steps_logged(), _committed(out)
        time.sleep(0.001)
    raise TimeoutError(f"no {kind} kill within the time limit")


def test_kill_9_at_every_kind_of_moment_loses_nothing(data, reference, tmp_path):
    """kill -9 during start-up, during training, during a checkpoint write and right after a
    commit, each kind twice, the run restarted after every kill: the committed checkpoints stay
    intact, and the run ends exactly where the uninterrupted one did. Each kill is made at a moment
    the test observes while the process is frozen, and the test goes on until every kind has landed."""
    from mistral_qlora.run.checkpoints import verify

    out = tmp_path / "run"
    landed = {kind: 0 for kind in KINDS}
    deadline = time.time() + 1500
    while min(landed.values()) < 2:
        kind = min(KINDS, key=lambda k: (landed[k], KINDS.index(k)))
        attempt = Attempt(data, out)
        if _kill_at(attempt, out, kind, deadline):
            landed[kind] += 1
            for ckpt in _committed(out):
                assert verify(out / "checkpoints" / ckpt) is None, (kind, ckpt)
            continue
        if attempt.proc.poll() is None and kind == "start-up":  # missed start-up: kill it in training instead
            assert _kill_at(attempt, out, "training", deadline), "finished before a training kill"
            landed["training"] += 1
            continue
        code = attempt.finish()  # the run finished before the kill: it must have finished right
        assert code == 0, "".join(attempt.stderr)[-3000:]
        assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
        _assert_same_adapter(_adapter(out), _adapter(reference))
        shutil.rmtree(out)  # and start another run for the kinds still missing
    proc = subprocess.run(_args(data, out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
    assert wait_for(lambda: (out / "checkpoints/checkpoint-3").is_dir(), proc), "finished before the signal"
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
