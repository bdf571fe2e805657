"""Resilient at cluster scale, through the real launcher (2 processes on the CPU, gloo):

- ZeRO-2 and ZeRO-3: a 2-process run stopped and resumed on 1 process, stopped again and resumed
  on 2 (one chain of three launches covers N -> M and M -> N), each segment continuing the global
  sample sequence of one uninterrupted run with the same global batch (run/sampler.py;
  train.grad_accum changed to keep it, run/elastic.py), to its losses and adapter;
- the ZeRO-3 chain's first stop is a rank frozen with SIGSTOP: the hang watchdog (run/watchdog.py)
  fires within train.hang_timeout, every rank's stacks land in run.log, the run exits with 76, and
  the rerun resumes from the last committed checkpoint. The ZeRO-2 chain's stops are SIGTERMs.
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


def _stop_after_checkpoint(cmd, stats: Path, out: Path, after: int = 0) -> int:
    """Start the run, SIGTERM it once a checkpoint past step `after` is committed; the step it
    stopped at (the preemption saves at the next step boundary)."""
    proc = subprocess.Popen(cmd, env=_env(stats), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    deadline = time.time() + 900
    while max(_committed(out), default=0) <= after:
        assert proc.poll() is None and time.time() < deadline, f"ended before a checkpoint past step {after}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_PREEMPTED, err[-4000:]
    k = max(_committed(out))
    assert after < k < STEPS
    return k


def _committed(out: Path) -> list[int]:
    return [int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*/manifest.json")]


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
    """One process, ZeRO-2, 2 micro-batches a step: the global batch of 2 rows, uninterrupted. The
    reference of both chains: on the CPU ZeRO-2 and ZeRO-3 do the same float32 arithmetic."""
    root = tmp_path_factory.mktemp("ref")
    out, stats = root / "run", root / "stats"
    _finish(_cmd(data, out, 1, "train.strategy=zero2", "train.grad_accum=2"), stats, "reference")
    return out, _steps_rows(stats)


def _check_segment(stats: Path, ref_rows: list[int], start: int, end: int) -> None:
    """The rows a resumed segment trained in steps start+1..end are the uninterrupted run's, in the
    same global order (a data loader may read a row past its last step: accelerate reads ahead)."""
    assert _steps_rows(stats)[:2 * (end - start)] == ref_rows[2 * start:2 * end]


def _check_finished(out: Path, ref_out: Path, resumes: list[dict], after: int) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumes"] == resumes
    log = (out / "run.log").read_text()
    for r in resumes:
        assert f"resuming {r['checkpoint']} (step {r['step']}) saved by {r['from_world_size']} process(es) on " \
               f"{r['to_world_size']}" in log
    ref_losses, losses = _losses(ref_out), _losses(out)
    for step in range(after + 1, STEPS + 1):
        assert abs(ref_losses[step] - losses[step]) < 1e-4, (step, ref_losses, losses)
    _same_adapter(out, ref_out)
    assert not (out / "checkpoints/.staging-resume").exists()


def _resume(step: int, before: int, after: int, accum_before: int, accum_after: int) -> dict:
    changed = {"train.grad_accum": [1, 2]} if (before, after) == (2, 1) else {}  # the config says 1 (2 processes)
    assert accum_before * before == accum_after * after
    return {"step": step, "checkpoint": f"checkpoint-{step}", "from_world_size": before, "to_world_size": after,
            "changed": changed}


def test_zero2_stopped_on_2_processes_resumes_on_1_then_on_2_continuing_the_same_sequence(data, reference, tmp_path):
    """One config (grad_accum 1, written for 2 processes): SIGTERM on 2, resumed on 1 (grad_accum
    2 keeps the global batch of 2 rows), SIGTERM again, resumed on 2 to the end: the rows, losses
    and adapter of the uninterrupted 1-process run with the same global batch."""
    ref_out, ref_rows = reference
    out = tmp_path / "run"
    k1 = _stop_after_checkpoint(_cmd(data, out, 2, "train.strategy=zero2"), tmp_path / "stats0", out)
    k2 = _stop_after_checkpoint(_cmd(data, out, 1, "train.strategy=zero2"), tmp_path / "stats1", out, after=k1)
    _check_segment(tmp_path / "stats1", ref_rows, k1, k2)
    log = _finish(_cmd(data, out, 2, "train.strategy=zero2"), tmp_path / "stats2", "resume on 2")
    _check_segment(tmp_path / "stats2", ref_rows, k2, STEPS)
    assert "train.grad_accum 1 -> 2" in (out / "run.log").read_text() and "nothing changed" in log
    _check_finished(out, ref_out, [_resume(k1, 2, 1, 1, 2), _resume(k2, 1, 2, 2, 1)], k1)
    # the straggler report of the 2-process segments, in history.json and run.log
    history = json.loads((out / "history.json").read_text())
    assert any({"forward_s/rank1/median", "forward_s/spread"} <= e.keys() for e in history)
    assert "forward time per step, 1 step(s) to step 6 (s, min/median/max): rank 0 " in (out / "run.log").read_text()


def _worker(launcher: psutil.Process, rank: int) -> psutil.Process:
    for p in launcher.children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "LOCAL_RANK" in p.environ():
                return p
        except psutil.Error:
            continue
    raise LookupError(rank)


def test_zero3_frozen_rank_hangs_then_resumes_on_1_and_on_2_continuing_the_same_sequence(data, reference, tmp_path):
    """Rank 1 of a 2-process ZeRO-3 run frozen with SIGSTOP after checkpoint-2: the watchdog fires
    within train.hang_timeout, both ranks' stacks land in run.log, the exit is EXIT_HUNG and the
    committed checkpoints verify; the rerun resumes from the last one on 1 process, is stopped by
    SIGTERM, and resumes on 2 to the end, on the uninterrupted run's rows, losses and adapter."""
    ref_out, ref_rows = reference
    timeout = 15
    out = tmp_path / "run"
    z3 = ("train.strategy=zero3", f"train.hang_timeout={timeout}")
    proc = subprocess.Popen(_cmd(data, out, 2, *z3), env=_env(tmp_path / "stats0"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 900
    while not _committed(out):
        assert proc.poll() is None and time.time() < deadline, "ended before checkpoint-2"
        time.sleep(0.05)
    frozen = _worker(psutil.Process(proc.pid), 1)
    frozen.send_signal(signal.SIGSTOP)
    stopped = time.time()
    while not (out / "hang.json").is_file():
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.time() - stopped < timeout + 30, "the watchdog did not fire"
        time.sleep(0.1)
    assert time.time() - stopped < timeout + 10
    frozen.send_signal(signal.SIGCONT)  # thawed, it finds its own step overdue and dumps its stacks too
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_HUNG, err[-4000:]
    log = (out / "run.log").read_text()
    for rank in (0, 1):
        assert f"[rank {rank}] hang: no training step finished on rank {rank} within {timeout} s" in log
        assert f"[rank {rank}] Thread" in log or f"[rank {rank}] Current thread" in log
    committed = sorted(_committed(out))
    assert committed and all(verify(out / f"checkpoints/checkpoint-{c}") is None for c in committed)
    k1 = committed[-1]
    k2 = _stop_after_checkpoint(_cmd(data, out, 1, *z3), tmp_path / "stats1", out, after=k1)
    assert "the previous start ended on a hang" in (out / "run.log").read_text()
    _check_segment(tmp_path / "stats1", ref_rows, k1, k2)
    _finish(_cmd(data, out, 2, *z3), tmp_path / "stats2", "resume on 2")
    _check_segment(tmp_path / "stats2", ref_rows, k2, STEPS)
    _check_finished(out, ref_out, [_resume(k1, 2, 1, 1, 2), _resume(k2, 1, 2, 2, 1)], k1)
