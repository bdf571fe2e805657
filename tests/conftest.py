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


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m mistral_qlora ARGS` in a fresh process; returns CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mistral_qlora", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
