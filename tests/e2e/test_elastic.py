"""Resilient at cluster scale, through the real launcher (2 processes on the CPU, gloo):

- a checkpoint of a 2-process ZeRO-2 run resumes on 1 process, and one of a 1-process run on 2,
  each continuing the global sample sequence of an uninterrupted run with the same global batch
  (run/sampler.py; train.grad_accum changed to keep it, run/elastic.py), to the same adapter;
- a rank frozen with SIGSTOP: the hang watchdog (run/watchdog.py) fires within train.hang_timeout,
  every rank's stacks land in run.log, the run exits with 76, and a rerun resumes.
Rows read per rank come from tests/testkit/instrument/sitecustomize.py (MISTRAL_QLORA_DIST_STATS).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mistral_qlora.errors import EXIT_HUNG, EXIT_PREEMPTED
from mistral_qlora.model.adapter import adapter_tensors
from mistral_qlora.run.checkpoints import verify

from testkit import ROOT, TESTKIT

pytestmark = pytest.mark.slow

STEPS = 6


def _env(stats: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTKIT / "instrument"), str(ROOT / "src"),
                                                    env.get("PYTHONPATH")) if p)
    env["MISTRAL_QLORA_DIST_STATS"] = str(stats)
    env["DS_ACCELERATOR"] = "cpu"
    for k in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        env.pop(k, None)
    return env


def _cmd(data: Path, out: Path, nproc: int, *sets: str) -> list[str]:
    base = {"data.train": data, "output_dir": out, "data.tokens_per_row": 256, "data.max_seq_len": 256,
            "train.max_steps": STEPS, "train.save_steps": 2, "train.logging_steps": 1, "train.eval_steps": 1000,
            "lora.dropout": 0, "eval.samples": 0, "train.keep_checkpoints": 5, "train.report_to": "[none]"}
    args = [sys.executable, "-m", "mistral_qlora", "train", str(ROOT / "configs" / "tiny.yaml"), "--nproc", str(nproc)]
    for k, v in base.items():
        args += ["--set", f"{k}={v}"]
    for s in sets:
        args += ["--set", s]
    return args


def _finish(cmd, stats: Path, what: str) -> str:
    proc = subprocess.run(cmd, env=_env(stats), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc.stdout + proc.stderr


def _stop_after_checkpoint(cmd, stats: Path, out: Path) -> int:
    """Start the run, SIGTERM it once checkpoint-2 is committed; the step it stopped at."""
    proc = subprocess.Popen(cmd, env=_env(stats), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    deadline = time.time() + 900
    while not (out / "checkpoints/checkpoint-2/manifest.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "ended before checkpoint-2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_PREEMPTED, err[-4000:]
    saved = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")]
    assert 2 <= max(saved) < STEPS
    return max(saved)


def _losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in json.loads((out / "history.json").read_text()) if "loss" in e}


def _rows(stats: Path) -> list[list[int]]:
    return [json.loads(f.read_text())["rows_read"] for f in sorted(stats.glob("rank*.json"))]


def _steps_rows(stats: Path) -> list[int]:
    """The rows the run read, in the global order (micro-batches of one row)."""
    ranks = _rows(stats)
    flat = []
    for i in range(len(ranks[0])):  # micro-batch j goes to rank j mod world: interleave them back
        flat += [r[i] for r in ranks]
    return flat


def _same_adapter(a: Path, b: Path, atol=1e-4):
    ta, tb = adapter_tensors(a / "adapter"), adapter_tensors(b / "adapter")
    worst = max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)
    assert worst < atol, f"adapters differ by {worst}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("elastic") / "data.json"
    rng = random.Random(0)
    records = []
    for _ in range(120):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        records.append({"text": f"<s>[INST] What is {a} plus {b}? [/INST] {a} plus {b} is {a + b}. We add the ones "
                                f"first and then the tens. So the answer is {a + b}. </s>"})
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[Path, list[int]]:
    """One process, ZeRO-2, 2 micro-batches a step: the global batch of 2 rows, uninterrupted."""
    root = tmp_path_factory.mktemp("ref")
    out, stats = root / "run", root / "stats"
    _finish(_cmd(data, out, 1, "train.strategy=zero2", "train.grad_accum=2"), stats, "reference")
    return out, _steps_rows(stats)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes_continues_the_same_sequence(data, reference, tmp_path, before, after):
    ref_out, ref_rows = reference
    out = tmp_path / "run"
    accum = {1: 2, 2: 1}
    k = _stop_after_checkpoint(_cmd(data, out, before, "train.strategy=zero2", f"train.grad_accum={accum[before]}"),
                               tmp_path / "stats0", out)
    stats = tmp_path / "stats1"
    log = _finish(_cmd(data, out, after, "train.strategy=zero2", f"train.grad_accum={accum[before]}"), stats,
                  "resume")
    assert f"saved by {before} process(es) on {after}: train.grad_accum {accum[before]} -> {accum[after]}" in log
    # the rows read after step k are the uninterrupted run's, in the same global order (a data
    # loader may read one row past the last step: accelerate looks one batch ahead)
    trained = 2 * (STEPS - k)
    assert _steps_rows(stats)[:trained] == ref_rows[2 * k:2 * k + trained]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == after
    assert summary["resumes"] == [{"step": k, "checkpoint": f"checkpoint-{k}", "from_world_size": before,
                                   "to_world_size": after,
                                   "changed": {"train.grad_accum": [accum[before], accum[after]]}}]
    assert "train.grad_accum" in (out / "run.log").read_text()
    ref_losses, losses = _losses(ref_out), _losses(out)
    for step in range(k + 1, STEPS + 1):
        assert abs(ref_losses[step] - losses[step]) < 1e-4, (step, ref_losses, losses)
    _same_adapter(out, ref_out)
    assert not (out / "checkpoints/.staging-resume").exists()


def _worker(launcher: psutil.Process, rank: int) -> psutil.Process:
    for p in launcher.children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "LOCAL_RANK" in p.environ():
                return p
        except psutil.Error:
            continue
    raise LookupError(rank)


def test_a_frozen_rank_ends_in_a_hang_exit_with_every_ranks_stacks(data, tmp_path):
    timeout = 20
    out = tmp_path / "run"
    cmd = _cmd(data, out, 2, "train.strategy=ddp", "train.max_steps=40", f"train.hang_timeout={timeout}")
    proc = subprocess.Popen(cmd, env=_env(tmp_path / "stats"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    deadline = time.time() + 900
    while "step 3/" not in ((out / "run.log").read_text() if (out / "run.log").is_file() else ""):
        assert proc.poll() is None and time.time() < deadline, "ended before step 3"
        time.sleep(0.05)
    frozen = _worker(psutil.Process(proc.pid), 1)
    frozen.send_signal(signal.SIGSTOP)
    stopped = time.time()
    while not (out / "hang.json").is_file():
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.time() - stopped < timeout + 30, "the watchdog did not fire"
        time.sleep(0.1)
    fired = time.time() - stopped
    assert fired < timeout + 10
    frozen.send_signal(signal.SIGCONT)  # thawed, it finds its own step overdue and dumps its stacks too
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_HUNG, err[-4000:]
    log = (out / "run.log").read_text()
    for rank in (0, 1):
        assert f"[rank {rank}] hang: no training step finished on rank {rank} within {timeout} s" in log
        assert f"[rank {rank}] Thread" in log or f"[rank {rank}] Current thread" in log
    committed = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert committed and all(verify(c) is None for c in committed)
    k = int(committed[-1].name.split("-")[1])
    # a rerun (here on one process, a few steps further) resumes from the last committed checkpoint
    log = _finish(_cmd(data, out, 1, "train.strategy=single", f"train.max_steps={k + 1}", f"train.hang_timeout={timeout}"),
                  tmp_path / "stats2", "rerun")
    assert "the previous start ended on a hang" in log
    assert json.loads((out / "summary.json").read_text())["resumes"][0]["step"] == k
