"""Shared fixtures (the helpers they use live in testkit): GPU tests skipped without CUDA, the end-to-end
folder marked, the data cache in the session's temporary folder, small datasets, one tracked run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testkit import ROOT, MlflowServer, story_records


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


E2E = ROOT / "tests" / "e2e"


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e/ is marked `e2e` (`make test-fast` leaves it out); GPU tests skip
    without CUDA."""
    for item in items:
        if E2E in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)
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


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    path = tmp_path / "small.json"
    path.write_text(json.dumps(story_records(40)))
    return path


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
