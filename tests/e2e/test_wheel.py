"""The package as users install it from a wheel (`pip install .` without -e, `pip install git+...`):
built, installed into a fresh virtual environment, and run from a folder outside the repository
as a 2-process ZeRO-2 job, which needs the accelerate and DeepSpeed configs shipped inside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from testkit import ROOT, story_records

pytestmark = pytest.mark.slow



def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_wheel_installs_and_runs_two_processes_from_anywhere(tmp_path):
    # Build from a copy of what the wheel is made of, so the checkout gets no build/ or egg-info.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
          str(source)], timeout=600)
    (wheel,) = dist.glob("mistral_qlora-*.whl")

    # A fresh venv that sees this environment's dependencies (torch & co. are not downloaded again)
    # through a plain path entry, which does not make this checkout's editable install visible.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=300)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", str(wheel)], timeout=600)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MISTRAL_QLORA_HOME")}
    env["DS_ACCELERATOR"] = "cpu"
    installed = _run([str(python), "-c", "import mistral_qlora; print(mistral_qlora.__file__)"], cwd=elsewhere,
                     env=env).stdout.strip()
    assert installed.startswith(str(site)), installed  # the wheel's copy, not the checkout's

    (elsewhere / "qa.json").write_text(json.dumps(story_records(40)))
    (elsewhere / "run.yaml").write_text(
        "data: {train: qa.json, eval_fraction: 0, max_seq_len: 128, tokens_per_row: 128}\n"
        "train: {max_steps: 2, strategy: zero2, logging_steps: 1}\n"
        "eval: {samples: 0}\n"
        "output_dir: out\n")
    proc = _run([str(venv / "bin" / "mistral-qlora"), "train", "run.yaml", "--nproc", "2"], cwd=elsewhere, env=env,
                timeout=900)
    launch_line = next(line for line in proc.stderr.splitlines() if "accelerate.commands.launch" in line)
    assert str(site / "mistral_qlora" / "resources" / "launch" / "zero2.yaml") in launch_line
    assert str(site / "mistral_qlora" / "resources" / "ds_configs" / "zero2.json") in launch_line
    summary = json.loads((elsewhere / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "zero2" and summary["steps"] == 2
    assert (elsewhere / "out" / "adapter" / "adapter_model.safetensors").stat().st_size > 0
