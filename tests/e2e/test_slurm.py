"""slurm/train.sbatch on a real SLURM: slurmctld and two slurmd ("node1", "node2") on this machine,
started by slurm/local-cluster.sh (and stopped again if this module started them).

Jobs run the tiny config on the CPU: one node (one process), two nodes (one process each, gloo,
rendezvous at the first host of the node list), and a two-node job that gets USR1 mid-run the
way `--signal=B:USR1@N` delivers it (to the batch shell only), saves a checkpoint, is requeued
under the same id, resumes, and ends where the uninterrupted two-node job did; and a one-node,
two-process job whose rank 1 is frozen (SIGSTOP): the hang watchdog ends it with 76, the script
requeues it, and it resumes and finishes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testkit import ROOT

pytestmark = pytest.mark.slow

SBATCH = ROOT / "slurm" / "train.sbatch"
CLUSTER = ROOT / "slurm" / "local-cluster.sh"
STEPS = 30
SAVE_STEPS = 5
TRAIN_SETS = {"train.max_steps": STEPS, "train.save_steps": SAVE_STEPS, "train.logging_steps": 1,
              "train.eval_steps": 1000, "data.max_seq_len": 128, "data.tokens_per_row": 128, "eval.samples": 0}
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def _sets() -> list[str]:
    args = []
    for k, v in TRAIN_SETS.items():
        args += ["--set", f"{k}={v}"]
    return args


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
              "NPROC_PER_NODE"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env["MISTRAL_QLORA"] = f"{sys.executable} -m mistral_qlora"  # what every node runs (sbatch exports it)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def cluster():
    missing = [c for c in ("sbatch", "scontrol", "scancel", "slurmctld", "slurmd", "munged") if not shutil.which(c)]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("slurm/local-cluster.sh needs root to start a local SLURM cluster")
    was_up = subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode == 0
    up = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, f"slurm/local-cluster.sh up failed:\n{up.stdout}{up.stderr}"
    yield
    if not was_up:
        subprocess.run([str(CLUSTER), "down"], capture_output=True, timeout=120)


class Job:
    def __init__(self, job_id: str, runs: Path, batch_log: Path):
        self.id, self.runs, self.batch_log = job_id, runs, batch_log

    @property
    def folder(self) -> Path:  # the per-job folder: job.log and the run's output
        return self.runs / self.id

    def info(self) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True, text=True).stdout
        keys = ("JobState", "Restarts", "ExitCode", "NodeList", "Requeue", "Reason")
        return {k: m.group(1) for k in keys if (m := re.search(rf"\b{k}=(\S+)", out))}

    def log(self) -> str:
        path = self.folder / "job.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def describe(self) -> str:
        tail = "\n".join(line for line in self.log().splitlines() if "it/s]" not in line)[-6000:]
        head = self.batch_log.read_text() if self.batch_log.exists() else "(no batch log)"
        return f"job {self.id}: {self.info()}\n{head}\n--- job.log ---\n{tail}"

    def wait(self, timeout: float = 600) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.info()
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(0.5)
        subprocess.run(["scancel", self.id])
        pytest.fail(f"timed out after {timeout} s\n{self.describe()}")

    @property
    def summary(self) -> dict:
        return json.loads((self.folder / "summary.json").read_text())

    def losses(self) -> dict[int, float]:
        history = json.loads((self.folder / "history.json").read_text())
        return {e["step"]: e["loss"] for e in history if "loss" in e}


def _submit(tmp: Path, nodes: int, gpus: int = 0, sets: tuple[str, ...] = ()) -> Job:
    """`sbatch slurm/train.sbatch configs/tiny.yaml --set ...` from the repository, as a user would,
    with the cluster-specific defaults (GPUs, CPUs, time) overridden before the script name. The
    local cluster's GPUs are make-believe (SLURM allocates them; CUDA sees none): each one the
    job asks for per node is one CPU training process there."""
    runs = tmp / "runs"
    env = {**_env(), "RUNS_DIR": str(runs)}
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", f"--gpus-per-node={gpus}", "--cpus-per-task=1", "--time=20",
           f"--output={tmp}/slurm-%j.out", str(SBATCH), "configs/tiny.yaml", *_sets(),
           *(a for kv in sets for a in ("--set", kv))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    return Job(job_id, runs, tmp / f"slurm-{job_id}.out")


def _assert_finished(job: Job, info: dict, world_size: int, restarts: int = 0) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.describe()
    assert int(info["Restarts"]) == restarts, job.describe()
    s = job.summary
    assert s["world_size"] == world_size and s["steps"] == STEPS, s
    assert (job.folder / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (job.folder / "adapter" / "adapter_config.json").is_file()
    assert f"job {job.id}: log and output in {job.folder}" in job.batch_log.read_text()


def _cluster_gpus() -> int:
    gres = subprocess.run(["sinfo", "-h", "-N", "-o", "%G"], capture_output=True, text=True).stdout
    counts = [int(m) for m in re.findall(r"gpu:(\d+)", gres)]
    return min(counts) if counts else 0


@pytest.fixture(scope="module")
def two_node_job(cluster, tmp_path_factory) -> tuple[Job, dict]:
    job = _submit(tmp_path_factory.mktemp("slurm2"), nodes=2, gpus=1 if _cluster_gpus() else 0)
    return job, job.wait()


def test_sbatch_defaults_are_plain_sbatch_lines():
    """Admins edit the #SBATCH block in one place; SLURM does not expand variables there."""
    lines = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert lines and not [line for line in lines if "$" in line]
    options = {line.split()[1].split("=")[0] for line in lines}
    for option in ("--ntasks-per-node", "--gpus-per-node", "--signal", "--requeue", "--open-mode", "--output"):
        assert option in options, option
    assert "#SBATCH --ntasks-per-node=1" in lines
    assert any(re.fullmatch(r"#SBATCH --signal=B:USR1@\d+", line) for line in lines)


def test_one_node(cluster, tmp_path):
    job = _submit(tmp_path, nodes=1)
    info = job.wait()
    _assert_finished(job, info, world_size=1)
    assert info["NodeList"] == "node1"
    assert "done: 30 steps" in job.log()


def test_gpus_per_node_set_the_processes_per_node(cluster, tmp_path):
    """SLURM_GPUS_ON_NODE -> NPROC_PER_NODE: 2 GPUs on 1 node, 2 training processes."""
    if _cluster_gpus() < 2:
        pytest.skip("the local cluster has fewer than 2 GPUs per node (LOCAL_SLURM_GPUS)")
    job = _submit(tmp_path, nodes=1, gpus=2)
    info = job.wait()
    _assert_finished(job, info, world_size=2)
    assert re.search(r"^0: mistral-qlora: .*accelerate.commands.launch .* --num_processes 2 --num_machines 1 ",
                     job.log(), re.M), job.describe()


def test_two_nodes_one_process_each(two_node_job):
    job, info = two_node_job
    _assert_finished(job, info, world_size=2)
    assert info["NodeList"] == "node[1-2]"
    log = job.log()
    # one task per node, each starting its node's process with its node rank; rank 0's node is the
    # first host of the node list and the port comes from the job id
    port = 20000 + int(job.id) % 20000
    for rank in (0, 1):
        assert re.search(rf"^{rank}: mistral-qlora: .*accelerate.commands.launch .*multi_node.yaml "
                         rf"--num_processes 2 --num_machines 2 --machine_rank {rank} "
                         rf"--main_process_ip node1 --main_process_port {port} ", log, re.M), log[-4000:]
    assert len(re.findall(r"^0: done: 30 steps", log, re.M)) == 1 and not re.search(r"^1: done:", log, re.M)


def test_preempted_job_is_requeued_and_resumes(cluster, two_node_job, tmp_path):
    reference, _ = two_node_job
    job = _submit(tmp_path, nodes=2, gpus=1 if _cluster_gpus() else 0)
    first_save = job.folder / "checkpoints" / f"checkpoint-{SAVE_STEPS}"
    deadline = time.time() + 300
    while not first_save.is_dir():
        state = job.info().get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"before the signal:\n{job.describe()}"
        assert time.time() < deadline, job.describe()
        time.sleep(0.05)
    # what `--signal=B:USR1@N` does before the time limit: USR1 to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True)
    info = job.wait()

    _assert_finished(job, info, world_size=2, restarts=1)  # requeued once; a finished run never again
    log = job.log()
    stops = re.findall(r"^\d: mistral-qlora: preempted: stopped at step (\d+) after saving", log, re.M)
    assert len(stops) == 2 and len(set(stops)) == 1, log[-6000:]  # both nodes, at the same step
    stopped_at = int(stops[0])
    assert SAVE_STEPS <= stopped_at < STEPS
    assert f"requeueing job {job.id}" in log
    assert re.search(rf"^0: mistral-qlora: resuming from .*checkpoint-{stopped_at}$", log, re.M), log[-6000:]
    assert job.summary["resumed_from"].endswith(f"checkpoint-{stopped_at}")
    assert job.summary["steps"] == reference.summary["steps"] == STEPS
    # the same steps as the uninterrupted job, loss for loss
    ref, got = reference.losses(), job.losses()
    assert ref.keys() == got.keys() == set(range(1, STEPS + 1))
    assert all(abs(ref[k] - got[k]) < 1e-6 for k in ref), (ref, got)


def test_a_job_whose_rank_hangs_is_requeued_by_the_script_and_finishes(cluster, tmp_path):
    import psutil

    from mistral_qlora.errors import EXIT_HUNG

    if _cluster_gpus() < 2:
        pytest.skip("needs two processes on one node: the local cluster's make-believe GPUs (LOCAL_SLURM_GPUS=2)")
    timeout = 15
    job = _submit(tmp_path, nodes=1, gpus=2, sets=(f"train.hang_timeout={timeout}",))
    first_save = job.folder / "checkpoints" / f"checkpoint-{SAVE_STEPS}"
    deadline = time.time() + 300
    while not first_save.is_dir():
        assert job.info().get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job.describe()
        assert time.time() < deadline, job.describe()
        time.sleep(0.05)
    ranks = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if env.get("RANK") == "1" and "LOCAL_RANK" in env and f"output_dir={job.folder}" in " ".join(p.cmdline()):
                ranks.append(p)
        except psutil.Error:
            continue
    assert len(ranks) == 1, ranks
    ranks[0].send_signal(signal.SIGSTOP)
    stopped = time.time()
    while not (job.folder / "hang.json").is_file():
        assert time.time() - stopped < timeout + 30, job.describe()
        time.sleep(0.1)
    ranks[0].send_signal(signal.SIGCONT)  # thawed, it writes its own stacks and exits too
    info = job.wait()

    _assert_finished(job, info, world_size=2, restarts=1)
    log = job.log()
    assert f"exit code {EXIT_HUNG}" in log and f"hang (1 of at most 3 requeues); requeueing job {job.id}" in log
    run_log = (job.folder / "run.log").read_text()
    assert "[rank 0] hang: no training step finished on rank 0" in run_log
    assert "the previous start ended on a hang" in run_log
    assert re.search(r"checkpoint-\d+$", job.summary["resumed_from"]), job.summary


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_a_signal_to_every_process_of_the_node_still_saves(tmp_path, sig):
    """srun hands a signal to every process of a task, not only to its first one (SIGUSR1 from
    the script, SIGTERM at scancel or the time limit): the launcher (accelerate launch) must
    neither die of it nor stop the training processes, which save and exit first."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "mistral_qlora", "train", "configs/tiny.yaml", "--nproc", "2",
            "--set", f"output_dir={out}", *_sets()]
    env = {**_env(), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    first_save = out / "checkpoints" / f"checkpoint-{SAVE_STEPS}"
    deadline = time.time() + 300
    while not first_save.is_dir():
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, getattr(signal, sig))  # the whole process group, as srun does
    _, err = proc.communicate(timeout=300)
    left = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    for p in left:
        p.kill()
    assert proc.returncode == 75, err[-4000:]
    assert not left, "training processes outlived their launcher (orphaned while saving)"
    assert "preempted: stopped at step" in err and not (out / "summary.json").exists(), err[-4000:]
    assert "shutting down workers" not in err  # torchelastic's own SIGTERM handler stayed out of it
    saved = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert int(saved[-1].name.split("-")[1]) > SAVE_STEPS and (saved[-1] / "manifest.json").is_file()
