"""Shared fixtures: the repo root, small datasets written on the fly, a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """Tokenized data is cached in a folder of the test session (children inherit it), not in ~/.cache."""
    if "MISTRAL_QLORA_DATA_CACHE" not in os.environ:
        os.environ["MISTRAL_QLORA_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    yield


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


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    path = tmp_path / "small.json"
    path.write_text(json.dumps(story_records(40)))
    return path


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


@pytest.fixture(scope="session")
def tracked_run(tmp_path_factory):
    """One tiny `train` in a subprocess with stdout and stderr to pipes: every tracker (W&B offline,
    a real local MLflow server, TensorBoard) and the LoRA variants that run on the fused path
    (rsLoRA, LoRA+, NEFTune, a target_modules list, lm_head trained in full). The server starts
    first and answers while the run sets up (MLflow's client retries until it does)."""
    tmp = tmp_path_factory.mktemp("tracked")
    data = tmp / "qa.json"
    data.write_text(json.dumps(story_records(24)))
    out = tmp / "run"
    server = MlflowServer(tmp)
    try:
        env = {**os.environ, "WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": server.uri, "PYTHONUNBUFFERED": "1"}
        for var in ("WANDB_PROJECT", "WANDB_TAGS", "WANDB_DIR", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS"):
            env.pop(var, None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "mistral_qlora", "train", str(ROOT / "configs/tiny.yaml"),
             *[f"--set={s}" for s in (
                 f"data.train={data}", "data.max_seq_len=64", "data.tokens_per_row=128", "train.max_steps=3",
                 "train.gradient_checkpointing=false", "train.logging_steps=1", "train.eval_steps=2",
                 "train.save_steps=100", "eval.samples=1", "eval.max_new_tokens=4", "train.peak_tflops=0.001",
                 "train.report_to=[tensorboard, wandb, mlflow]",
                 "train.run_name=tracked-tiny", "train.project=qlora-ci", "train.tags=[ci, tiny]",
                 "lora.rslora=true", "lora.plus_lr_ratio=16", "train.neftune_alpha=5",
                 "lora.target_modules=[q_proj, v_proj, down_proj]", "lora.modules_to_save=[lm_head]",
                 f"output_dir={out}")]],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        server.wait()
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        yield {"out": out, "stdout": stdout, "stderr": stderr, "mlflow_uri": server.uri}
    finally:
        server.stop()
