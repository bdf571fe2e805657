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
