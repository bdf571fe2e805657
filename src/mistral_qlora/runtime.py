"""Where this process runs: its device and dtype, its place among the ranks, and the few
collectives and launcher facts every layer above may need.

Nothing here reads the run config: callers hand in the one value they mean (a dtype name, an
environment), so this module sits below everything that does.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass

import torch

GIB = 2**30


def log(message: str) -> None:
    """One line on stderr, from global rank 0 only (the others would repeat it)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"mistral-qlora: {message}", file=sys.stderr, flush=True)
        logging.getLogger("mistral_qlora").info(message)  # run.log (mistral_qlora.logs)


def phase(message: str) -> None:
    """The start of a phase of the run, one line on stdout (the console's stream, beside the step
    lines) from global rank 0, and in run.log; stderr stays for warnings and the error line."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)
        logging.getLogger("mistral_qlora").info(message)


def peak_memory(device: str) -> tuple[float, str]:
    """(GiB, of what): on a GPU the peak of the memory torch allocated there ("gpu"); elsewhere the
    process's peak resident set from getrusage ("host": weights, data, Python, everything the
    process touched), since a CPU run has no allocator of its own to ask."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30, "gpu"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / 2**30, "host"


def resolve_dtype(name: str) -> torch.dtype:
    """`model.dtype`: "auto" is bfloat16 on a GPU that has it, float32 elsewhere."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


@dataclass
class Runtime:
    """Where this process runs: device, dtype and its place among the ranks."""

    device: str
    dtype: torch.dtype
    world_size: int
    rank: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.device == "cuda" else torch.device("cpu")

    @classmethod
    def detect(cls, dtype_name: str, env=None) -> "Runtime":
        env = os.environ if env is None else env  # read now: `datasets` rebinds os.environ
        return cls(
            device="cuda" if torch.cuda.is_available() else "cpu",
            dtype=resolve_dtype(dtype_name),
            world_size=int(env.get("WORLD_SIZE", "1")),
            rank=int(env.get("RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
        )

    def gpu_budget(self) -> int | None:
        """Usable bytes on this process's GPU (None on the CPU)."""
        return gpu_budget(self.local_rank) if self.device == "cuda" else None


def gpu_budget(device_index: int = 0) -> int | None:
    """Usable bytes on one GPU (None without CUDA): its total less the CUDA context and allocator
    slack (8%, at least 1 GiB). Total rather than free memory, so that every rank, reading its own
    identical card, takes the same decision."""
    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(device_index).total_memory
    return total - max(GIB, int(0.08 * total))


def host_ram() -> int:
    """Bytes of host memory available to this run now: psutil's `available` (free plus what the
    kernel can reclaim), else the free pages from sysconf."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def processes_per_host(world_size: int, env=None) -> int:
    """The training processes that share this host's memory: the launcher's LOCAL_WORLD_SIZE,
    else every rank."""
    env = os.environ if env is None else env
    return int(env.get("LOCAL_WORLD_SIZE", world_size))


# ---------------------------------------------------------------------------------------------
# Launchers: who started this process


def launched_processes(env=None) -> int | None:
    """The world size when a launcher (torchrun, accelerate launch, deepspeed) started this
    process, else None. LOCAL_RANK is what all of them set and a plain shell does not."""
    env = os.environ if env is None else env  # read now: `datasets` rebinds os.environ
    if "LOCAL_RANK" not in env:
        return None
    return int(env.get("WORLD_SIZE", "1"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """DeepSpeed needs a process group even for one process: give it a one-rank one."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


# ---------------------------------------------------------------------------------------------
# Collectives that are no-ops in a single process


def _several_ranks() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    import torch.distributed as dist

    if _several_ranks():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (a collective: call it on all ranks)."""
    import torch.distributed as dist

    if not _several_ranks():
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
