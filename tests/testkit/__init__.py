"""Helpers the tests share, imported by name (`from testkit import ...`; setup.cfg puts tests/ on
the path): the repo root, the sample Q&A, the tiny model, a CLI runner, a real MLflow server.
The scripts beside this file run in processes of their own: the distributed workers, llama.cpp's
greedy runner and the instrumentation every process of a distributed run loads (instrument/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTKIT = Path(__file__).resolve().parent


QA = [
    ("What do plants need to make food?", "Plants need sunlight, water and carbon dioxide to make food in their leaves."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What is 12 times 3?", "12 times 3 is 36."),
    ("Name the largest ocean on Earth.", "The Pacific Ocean is the largest ocean on Earth."),
    ("What is a noun?", "A noun is a word that names a person, place, animal or thing."),
    ("Why do we see lightning before we hear thunder?", "Light travels much faster than sound, so it reaches us first."),
]


def story_records(n: int) -> list[dict]:
    return [{"text": f"<s>[INST] {q} (#{i}) [/INST] {a} </s>"} for i, (q, a) in
            ((i, QA[i % len(QA)]) for i in range(n))]


def tiny_path() -> str:
    """The embedded tiny model's folder (built on first use)."""
    from mistral_qlora.model.base import resolve_model_path

    return resolve_model_path("tiny-random-mistral")


def load_tiny_base(attention: str = "sdpa", dtype=None, bits: int = 4, device_map=None):
    """The tiny base as `train` loads it (model.base.load_base_model), float32 unless `dtype`;
    on the CPU a 4-bit base keeps the layout training uses (model.base.keep_4bit_layout)."""
    import torch

    from mistral_qlora.config import ModelSection, QuantizationSection
    from mistral_qlora.model.base import keep_4bit_layout, load_base_model, load_model_config

    path = tiny_path()
    base = load_base_model(path, load_model_config(path, ModelSection()), None, QuantizationSection(bits=bits),
                           attention, dtype or torch.float32, device_map=device_map)
    if device_map is None and bits == 4:
        keep_4bit_layout(base)
    return base


def layer_plan(recompute: int = 0, fused: bool = False, kept_for_run: int = 0):
    """A LayerPlan (plan/layers.py) for `add_lora`: the first `recompute` layers recompute."""
    from mistral_qlora.plan.layers import LayerPlan

    return LayerPlan(lora_layer="fused" if fused else "peft", recompute=recompute, kept_for_run=kept_for_run)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m mistral_qlora ARGS` in a fresh process; returns CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mistral_qlora", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, proc, timeout: float = 300, poll: float = 0.002) -> bool:
    """Poll `predicate` until it holds (True) or the subprocess `proc` ends first (False);
    TimeoutError after `timeout` seconds."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on loopback: SQLite backend, artifacts in a local folder. Started in a
    session of its own (so it and its workers end together), stopped by `stop`."""

    def __init__(self, root: Path):
        import shutil

        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "mlflow-server.log", "w")
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        self.proc = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 180) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mlflow server exited: see {self.log.name}"
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server not answering after {timeout} s: see {self.log.name}")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def write_jsonl(path: Path, records) -> Path:
    """`records` as a JSON Lines file at `path`."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def train_tiny(tmp: Path, overrides: list[str], records: int = 24) -> tuple[dict, Path]:
    """One in-process `train` of configs/tiny.yaml on `records` sample Q&A records with `overrides`
    (--set items), into tmp/run: (summary, the run folder)."""
    import json

    from mistral_qlora.config import load_config
    from mistral_qlora.train import run_training

    data = tmp / "qa.json"
    data.write_text(json.dumps(story_records(records)))
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.train={data}", *overrides, f"output_dir={tmp / 'run'}"])
    return run_training(cfg), tmp / "run"

