"""`mistral-qlora train --nproc N [--nnodes M --node-rank R --main-addr A --main-port P]`: the
`accelerate launch` command line that starts the run's processes on this node, and the hand-off
of a scheduler's signals to them.

One process (the default on a machine with at most one GPU) trains in this process. More than
one re-launches `python -m mistral_qlora train ...` through `accelerate launch` with the
package's accelerate config for the strategy (resources/: ddp.yaml, zero2.yaml, zero3.yaml,
zero3_offload.yaml on one node, multi_node.yaml, strategy-neutral, on several; the DeepSpeed
config then comes from `train.strategy`). A process that a launcher already started (torchrun,
accelerate launch, deepspeed: they all set LOCAL_RANK) is never re-launched.

Every value has an environment fallback so that schedulers can drive it: NPROC_PER_NODE, NNODES,
NODE_RANK, MASTER_ADDR, MASTER_PORT (launch/train.sh, the per-node entry, passes them on).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mistral_qlora import resources
from mistral_qlora.config import RunConfig
from mistral_qlora.errors import EXIT_HUNG, EXIT_PREEMPTED, UserError
from mistral_qlora.model.base import load_model_config, resolve_model_path
from mistral_qlora.plan.strategy import STRATEGY_WHY_ENV, is_deepspeed, plan_strategy
from mistral_qlora.run.artifacts import check_output_dir
from mistral_qlora.runtime import free_port, gpu_budget, launched_processes, log, resolve_dtype

DEFAULT_PORT = 29500


@dataclass
class LaunchSpec:
    nproc: int  # processes on this node
    nnodes: int = 1
    node_rank: int = 0
    main_addr: str = "127.0.0.1"
    main_port: int | None = None  # None: a free port (one node only)

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def _int(value, name: str, minimum: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}: expected an integer, got {value!r}") from None
    if n < minimum:
        raise UserError(f"{name}: must be >= {minimum} (got {n})")
    return n


def default_nproc() -> int:
    """One process per visible GPU; one on a machine without GPUs."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch/CUDA: one process
        return 1


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or scheduler's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_gpus(spec: LaunchSpec, visible: int | None = None, cores: int | None = None) -> None:
    """On a GPU machine each process takes one GPU: refuse to start more processes than GPUs.
    Without GPUs, processes run on the CPU (as the tests do) and any number is allowed, but more
    processes than cores share them: one line says so, since each step then takes longer."""
    if visible is None:
        try:
            import torch

            visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001
            visible = 0
    if visible and spec.nproc > visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else ""
        raise UserError(f"--nproc {spec.nproc} asks for {spec.nproc} GPUs on this node but {visible} "
                        f"{'is' if visible == 1 else 'are'} visible{where}; use --nproc {visible} or fewer")
    cores = cpu_cores() if cores is None else cores
    if not visible and spec.nproc > 1 and spec.nproc > cores:
        log(f"warning: no GPU: the {spec.nproc} processes of --nproc {spec.nproc} share this machine's "
            f"{cores} CPU core{'s' if cores != 1 else ''}, each slower than alone")


def launch_spec(nproc=None, nnodes=None, node_rank=None, main_addr=None, main_port=None, env=None) -> LaunchSpec:
    """Arguments first, then the environment, then defaults; validated."""
    env = os.environ if env is None else env
    nnodes = _int(nnodes if nnodes is not None else env.get("NNODES", 1), "--nnodes", 1)
    nproc = nproc if nproc is not None else env.get("NPROC_PER_NODE")
    nproc = _int(nproc, "--nproc", 1) if nproc is not None else default_nproc()
    node_rank = _int(node_rank if node_rank is not None else env.get("NODE_RANK", 0), "--node-rank", 0)
    if node_rank >= nnodes:
        raise UserError(f"--node-rank {node_rank} must be less than --nnodes {nnodes}")
    main_addr = main_addr or env.get("MASTER_ADDR")
    port = main_port if main_port is not None else env.get("MASTER_PORT")
    port = _int(port, "--main-port", 1) if port is not None else None
    if nnodes > 1:
        if not main_addr:
            raise UserError(f"--nnodes {nnodes}: give every node the main node's address "
                            "(--main-addr HOST or MASTER_ADDR)")
        port = port or DEFAULT_PORT
    return LaunchSpec(nproc, nnodes, node_rank, main_addr or "127.0.0.1", port)


def accelerate_command(spec: LaunchSpec, strategy: str, train_argv: list[str], python: str | None = None) -> list[str]:
    """The `accelerate launch` command for this node; `train_argv` follows `python -m mistral_qlora`."""
    config = resources.accelerate_config_path(strategy, spec.nnodes)
    cmd = [python or sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(spec.world_size), "--num_machines", str(spec.nnodes),
           "--machine_rank", str(spec.node_rank), "--main_process_ip", spec.main_addr,
           "--main_process_port", str(spec.main_port if spec.main_port is not None else free_port())]
    if spec.nnodes == 1 and is_deepspeed(strategy):
        # absolute, so the run may start from any folder (the YAML names it relative to its root)
        cmd += ["--deepspeed_config_file", str(resources.ds_config_path(strategy))]
    return cmd + ["-m", "mistral_qlora", *train_argv]


def child_env(env=None) -> dict[str, str]:
    """The environment the launched processes get: ours, plus what a CPU-only machine needs."""
    env = dict(os.environ if env is None else env)
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        cuda = False
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, gloo underneath
    # A collective whose peer died fails (after the process group's timeout, run/trainer.py)
    # instead of waiting for ever; the error tears the process group down.
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # the children import this package from where this process did (a source checkout's src/)
    import mistral_qlora

    src = os.path.dirname(os.path.dirname(os.path.abspath(mistral_qlora.__file__)))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if os.path.basename(src) == "src" and src not in paths:
        env["PYTHONPATH"] = os.pathsep.join([src, *paths])
    return env


def check_not_relaunched(spec_world: int | None) -> int | None:
    """Under a launcher, the launcher's world size (and --nproc/--nnodes must agree with it)."""
    world = launched_processes()
    if world is not None and spec_world is not None and spec_world != world:
        raise UserError(f"this process was started by a launcher with {world} processes; "
                        f"--nproc x --nnodes asks for {spec_world}: drop them or make them agree")
    return world


NOTICE_SIGNALS = ("SIGTERM", "SIGUSR1")  # a scheduler's (or `docker stop`'s) notice: save, then stop


def restore_notice_signals() -> None:
    """In a training process started by `run`: SIGTERM and SIGUSR1 back to their default action
    (they were ignored, inherited from the launcher) until the trainer installs its handler, so
    a notice before training starts stops the process instead of being lost."""
    import signal

    for name in NOTICE_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)


def run(cmd: list[str], env: dict[str, str], output_dir: str | None = None) -> int:
    """Run the launcher and return its exit code.

    SIGTERM and SIGUSR1 sent to this process (a scheduler's notice, `docker stop`) are passed on
    to the training processes themselves, not to the launcher, whose own handler would kill them
    before they save: each saves a checkpoint at the next step boundary and exits with
    EXIT_PREEMPTED, and so does this process then. ^C reaches them through the terminal's
    process group, so here it is only waited out while the training processes stop.

    Some senders signal every process of a task at once (srun passes a signal to all of them,
    like `kill -- -PGID`): the launcher itself then gets it too. So it starts with SIGTERM and
    SIGUSR1 ignored (torchelastic is told not to handle SIGTERM): it neither dies (USR1's default
    action), leaving its workers orphaned while they save, nor kills them (its SIGTERM handler).
    The workers inherit "ignore"; `restore_notice_signals` undoes that in them."""
    import signal

    import time

    import psutil

    from mistral_qlora.run.watchdog import hang_in_run

    started = time.time()
    print("mistral-qlora: " + " ".join(cmd), file=sys.stderr, flush=True)
    notices = [getattr(signal, n) for n in NOTICE_SIGNALS if hasattr(signal, n)]
    env = dict(env)
    for key in ("PET_SIGNALS_TO_HANDLE", "TORCHELASTIC_SIGNALS_TO_HANDLE"):  # torchrun's flag; older torch
        env.setdefault(key, "SIGINT,SIGHUP,SIGQUIT")
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in notices}  # inherited by the launcher
    try:
        proc = subprocess.Popen(cmd, env=env)
    except BaseException:
        for s, handler in previous.items():
            signal.signal(s, handler)
        raise
    forwarded = []

    def forward(signum, _frame):
        forwarded.append(signum)
        try:
            workers = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for worker in workers:
            try:
                worker.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    for s in notices:
        signal.signal(s, forward)
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    # The launcher reports its workers' exit 75 as a plain failure: after a forwarded notice,
    # a failed launch is the preemption the workers answered.
    # A rank's hang watchdog (run/watchdog.py) exits with EXIT_HUNG and the launcher stops the
    # rest, reporting a plain failure: the hang it recorded in output_dir names the cause.
    if code != 0 and output_dir is not None and hang_in_run(output_dir, started):
        return EXIT_HUNG
    return EXIT_PREEMPTED if forwarded and code != 0 else code


def relaunch(cfg: RunConfig, config_path: str, overrides: list[str], *, nproc=None, nnodes=None, node_rank=None,
             main_addr=None, main_port=None, overwrite: bool = False, force: bool = False,
             debug: bool = False) -> int | None:
    """With more than one process to start on this node (and no launcher above us): resolve the
    strategy, build the `accelerate launch` command, run it and return its exit code. None:
    train in this process."""
    explicit = nproc is not None or nnodes is not None
    if launched_processes() is not None:  # torchrun / accelerate launch already started us
        restore_notice_signals()
        check_not_relaunched((nproc or 1) * (nnodes or 1) if explicit else None)
        return None
    spec = launch_spec(nproc, nnodes, node_rank, main_addr, main_port)
    check_gpus(spec)
    if spec.world_size == 1:
        return None
    check_output_dir(Path(cfg.output_dir), overwrite)  # fail here, not in every process
    model_config = None
    if cfg.train.strategy == "auto":  # the memory estimate needs the checkpoint's shapes
        model_config = load_model_config(resolve_model_path(cfg.model.name_or_path), cfg.model)
    strategy, why, _ = plan_strategy(cfg, spec.world_size, model_config, resolve_dtype(cfg.model.dtype).itemsize,
                                     gpu_budget())
    argv = (["--debug"] if debug else []) + ["train", config_path]
    for item in overrides:
        argv += ["--set", item]
    if strategy != cfg.train.strategy:
        argv += ["--set", f"train.strategy={strategy}"]
    if overwrite:
        argv.append("--overwrite")
    if force:
        argv.append("--force")
    env = child_env()
    env[STRATEGY_WHY_ENV] = why  # logged once, by rank 0
    return run(accelerate_command(spec, strategy, argv), env, cfg.output_dir)
