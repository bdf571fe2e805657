"""Which attention backend and which fused kernels this machine can run, and which the run takes.

`model.attention: auto` takes the fastest usable backend: flash-attn's `flash_attention_2` where
the package imports and a GPU is present, else PyTorch's own varlen flash kernel (`varlen`,
model/attention.py), else FlexAttention on CUDA, else SDPA. `model.kernels: auto` takes Liger's
Triton kernels on a CUDA GPU where liger-kernel is installed. A backend or kernel asked for by
name that cannot run here is refused with the reason, never swapped for another; so is
`quantization.compute: fp8` where the GPU has no FP8 tensor cores (`fp8_problem`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from mistral_qlora.errors import UserError

# Fastest first; `auto` takes the first usable one.
AUTO_ORDER = ("flash_attention_2", "varlen", "flex", "sdpa")
BACKENDS = AUTO_ORDER + ("eager",)


def _cuda() -> bool:
    return torch.cuda.is_available()


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@functools.lru_cache(maxsize=1)
def _flash_attn_problem() -> str | None:
    """None when the flash-attn package imports, else why not (a build for another torch, say)."""
    if importlib.util.find_spec("flash_attn") is None:
        return "needs the flash-attn package (pip install mistral-qlora[flash])"
    try:
        importlib.import_module("flash_attn")
    except Exception as exc:  # an ABI mismatch raises ImportError or OSError, sometimes RuntimeError
        return f"flash-attn is installed but does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return None


def usable_backends(dtype: torch.dtype | None = None) -> dict[str, str | None]:
    """Each backend -> None when usable here (for `dtype`, when given), else why not."""
    cuda = _cuda()
    half = dtype is None or dtype in (torch.bfloat16, torch.float16)
    why_not_half = f"runs in bfloat16/float16 only (model.dtype resolves to {str(dtype).removeprefix('torch.')})"
    sm80 = cuda and torch.cuda.get_device_capability()[0] >= 8

    if not cuda:
        fa2 = "needs a CUDA GPU"
    elif _flash_attn_problem():
        fa2 = _flash_attn_problem()
    elif not half:
        fa2 = why_not_half
    else:
        fa2 = None

    if not cuda:
        varlen = "needs a CUDA GPU"
    elif not _importable("torch.nn.attention.varlen"):
        varlen = f"needs torch.nn.attention.varlen (torch >= 2.11; this is torch {torch.__version__})"
    elif not sm80:
        varlen = "needs an Ampere or newer GPU (compute capability >= 8.0)"
    elif not half:
        varlen = why_not_half
    else:
        varlen = None

    if not cuda:
        flex = "needs a CUDA GPU (FlexAttention is compiled with Triton)"
    elif not _importable("torch.nn.attention.flex_attention"):
        flex = f"needs torch.nn.attention.flex_attention (this is torch {torch.__version__})"
    else:
        flex = None

    return {"flash_attention_2": fa2, "varlen": varlen, "flex": flex, "sdpa": None, "eager": None}


def select_attention(requested: str, dtype: torch.dtype | None = None) -> str:
    """The config name of the backend to use; `auto` resolves to the fastest usable one."""
    usable = usable_backends(dtype)
    if requested == "auto":
        return next(name for name in AUTO_ORDER if usable[name] is None)
    if requested not in usable:
        raise UserError(f"model.attention={requested!r} is not implemented here (choose from {', '.join(usable)})")
    if usable[requested] is not None:
        raise UserError(f"model.attention={requested}: {usable[requested]}; use model.attention=auto")
    return requested


def kernels_usable() -> str | None:
    """None when Liger's kernels can run here, else why not."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (Liger's kernels are Triton)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "needs the liger-kernel package (pip install mistral-qlora[kernels])"
    return None


def select_kernels(requested: str) -> str:
    """`model.kernels` -> "liger" or "none"."""
    why_not = kernels_usable()
    if requested == "auto":
        return "liger" if why_not is None else "none"
    if requested == "liger" and why_not is not None:
        raise UserError(f"model.kernels=liger: {why_not}; use model.kernels=auto")
    return requested


FP8_CAPABILITY = (9, 0)  # torch._scaled_mm with per-row scales: Hopper and newer


def fp8_problem(dtype: torch.dtype | None = None) -> str | None:
    """None when the base's matmuls can run in FP8 here (kernels/fp8.py), else why not."""
    if not _cuda():
        return "needs a CUDA GPU with FP8 tensor cores (compute capability 9.0 or newer); this machine has none"
    cap = torch.cuda.get_device_capability()
    if cap < FP8_CAPABILITY:
        return (f"needs a GPU of compute capability 9.0 or newer (Hopper, Blackwell); "
                f"{torch.cuda.get_device_name()} is {cap[0]}.{cap[1]}")
    if not _importable("triton"):
        return "needs Triton for the FP8 quantization kernels"
    if dtype is not None and dtype != torch.bfloat16:
        return f"runs with model.dtype bfloat16 only (it resolves to {str(dtype).removeprefix('torch.')})"
    return None
