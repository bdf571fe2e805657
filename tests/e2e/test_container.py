"""docker/Dockerfile and docker/entrypoint.sh: a real image, built and run with podman.

The image is built once per session from a copy of the repository on a Debian base image made
locally with debootstrap (docker/local-podman.sh: no registry needed), with the CPU torch wheel
this environment uses mounted into the build. Then `train configs/tiny.yaml` runs in it with a
mounted output folder, and a training container is stopped (`podman stop`, SIGTERM) to check
that it writes a checkpoint, exits with 75, and that the same command resumes from it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from testkit import ROOT

pytestmark = pytest.mark.slow

HELPER = ROOT / "docker" / "local-podman.sh"
TAG = "localhost/mistral-qlora:test"
BASE_IMAGE = "localhost/debian-base:bookworm"
WHEELS = Path(os.environ.get("MISTRAL_QLORA_WHEELS", "/tmp/mistral-qlora-wheels"))  # kept between sessions
CONTEXT_PARTS = ("setup.cfg", "pyproject.toml", "src", "configs", "launch", "ds_configs", "dataset",
                 "docker")
STEPS = 40
SAVE_STEPS = 5
TRAIN_SETS = {"train.save_steps": SAVE_STEPS, "train.logging_steps": 1, "train.eval_steps": 1000,
              "data.max_seq_len": 128, "data.tokens_per_row": 128, "eval.samples": 0, "output_dir": "runs/tiny"}


def _train_args(steps: int) -> list[str]:
    args = ["train", "configs/tiny.yaml"]
    for k, v in {**TRAIN_SETS, "train.max_steps": steps}.items():
        args += ["--set", f"{k}={v}"]
    return args


class Engine:
    def __init__(self, env: dict[str, str]):
        self.env = env

    def __call__(self, *args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        return proc


def _torch_wheel() -> str:
    """The torch this environment runs (a CPU build here), as a wheel for the image's build."""
    import torch

    version = torch.__version__
    WHEELS.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--python-version", "3.11", "-d", str(WHEELS), f"torch=={version}"],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"no wheel of torch=={version} for the image (pip download failed: "
                    f"{proc.stderr.strip().splitlines()[-1:]})")
    return f"torch=={version}"


def _context(dest: Path) -> Path:
    """What the Dockerfile copies, plus this machine's extra CA certificates (a proxy here may
    intercept HTTPS; the Dockerfile's optional step installs them). Never committed."""
    for part in CONTEXT_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / part)
    for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy2(crt, dest / "docker" / "certs" / crt.name)
    return dest


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Engine:
    missing = [c for c in ("podman", "runc") if not shutil.which(c)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found (apt-get install podman runc debootstrap); "
                    "this test builds and runs the image with podman")
    if os.geteuid() != 0:
        pytest.skip("docker/local-podman.sh runs podman as root")
    setup = subprocess.run([str(HELPER), "setup"], capture_output=True, text=True, timeout=600)
    assert setup.returncode == 0, f"docker/local-podman.sh setup failed:\n{setup.stdout}{setup.stderr}"
    env = dict(os.environ)
    env.update(re.findall(r"^export (\w+)=(\S+)$", setup.stdout, re.M))
    engine = Engine(env)

    torch_spec = _torch_wheel()
    ctx = _context(tmp_path_factory.mktemp("context"))
    start = time.time()
    engine("build", "-f", "docker/Dockerfile", "--volume", f"{WHEELS}:/wheels:ro",
           "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", f"TORCH_SPEC={torch_spec}",
           "--build-arg", "PIP_FIND_LINKS=/wheels", "-t", TAG, str(ctx), timeout=1800, check=True)
    print(f"\nimage {TAG} built in {time.time() - start:.0f} s")
    engine("image", "prune", "--force")  # the layers of earlier builds of the tag
    return engine


def _output_folder(tmp_path: Path) -> Path:
    out = tmp_path / "runs"
    out.mkdir()
    os.chown(out, 1000, 1000)  # the image's non-root user
    return out


def _losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in json.loads((run / "history.json").read_text()) if "loss" in e}


def test_dockerfile_defaults():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+-devel-\S+$", text, re.M)
    assert re.search(r"^USER (?!root)\w+$", text, re.M)
    assert re.search(r'^VOLUME \[.*huggingface.*runs.*\]$', text, re.M)
    assert re.search(r"^ENTRYPOINT \[\"tini\", \"--\"", text, re.M)
    if (ROOT / ".git").exists() and shutil.which("git"):  # no certificates committed: only the folder
        tracked = subprocess.run(["git", "ls-files", "docker/certs"], cwd=ROOT, capture_output=True, text=True).stdout
        assert tracked.split() == ["docker/certs/.gitkeep"]


def test_entrypoint_commands(image):
    help_ = image("run", "--rm", TAG, check=True).stdout
    for command in ("train CONFIG", "bench", "merge", "export", "generate", "env", "shell"):
        assert command in help_
    env = image("run", "--rm", TAG, "env", check=True).stdout
    assert "torch" in env
    who = image("run", "--rm", TAG, "shell", "-c", "id -u; ls /workspace", check=True).stdout.split()
    assert who[0] != "0" and {"configs", "dataset", "runs"} <= set(who[1:])
    unknown = image("run", "--rm", TAG, "frobnicate")
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr


def test_train_in_a_container(image, tmp_path):
    out = _output_folder(tmp_path)
    proc = image("run", "--rm", "-e", "OMP_NUM_THREADS=1", "-v", f"{out}:/workspace/runs", TAG, *_train_args(6))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 GPU(s) visible; 1 training process(es)" in proc.stderr
    run = out / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 1
    adapter = run / "adapter" / "adapter_model.safetensors"
    assert adapter.stat().st_size > 0 and (run / "adapter" / "adapter_config.json").is_file()
    assert adapter.stat().st_uid == 1000  # written by the non-root user


def _start_and_stop(image: Engine, out: Path, *options: str) -> tuple[list[str], int]:
    """Start a training container, `podman stop` it after its first checkpoint: (its options, the
    step it stopped at). It must exit with 75 having saved a checkpoint at that step."""
    name = f"mq-stop-{uuid.uuid4().hex[:8]}"
    run = out / "tiny"
    args = ["-e", "OMP_NUM_THREADS=1", *options, "-v", f"{out}:/workspace/runs", TAG, *_train_args(STEPS)]
    image("run", "-d", "--name", name, *args, check=True)
    try:
        first_save = run / "checkpoints" / f"checkpoint-{SAVE_STEPS}"
        deadline = time.time() + 300
        while not first_save.is_dir():
            state = image("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", image("logs", name).stderr[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        image("stop", "-t", "60", name, check=True)  # SIGTERM to the container's init, SIGKILL after 60 s
        code = image("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        logs = image("logs", name)
        logs = logs.stdout + logs.stderr
    finally:
        image("rm", "-f", name)
    assert code == "75", logs[-3000:]
    stops = {int(n) for n in re.findall(r"preempted: stopped at step (\d+) after saving", logs)}
    assert len(stops) == 1, logs[-3000:]  # every process, the same step
    stopped_at = stops.pop()
    assert SAVE_STEPS <= stopped_at < STEPS and not (run / "summary.json").exists()
    assert (run / "checkpoints" / f"checkpoint-{stopped_at}" / "manifest.json").is_file()
    return args, stopped_at


def test_stop_writes_a_checkpoint_and_the_same_command_resumes(image, tmp_path):
    out = _output_folder(tmp_path)
    args, stopped_at = _start_and_stop(image, out)
    proc = image("run", "--rm", *args)  # the same command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from"].endswith(f"checkpoint-{stopped_at}")
    assert sorted(_losses(run)) == list(range(1, STEPS + 1))


def test_stop_with_two_processes_writes_a_checkpoint(image, tmp_path):
    """As with 2 GPUs: the entrypoint starts the launcher, which passes SIGTERM to both processes."""
    out = _output_folder(tmp_path)
    _start_and_stop(image, out, "-e", "NPROC_PER_NODE=2")
