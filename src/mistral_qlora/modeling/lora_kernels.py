"""A Triton kernel for the fused LoRA layer's backward: the adapter's input gradient under dropout.

With LoRA dropout, the adapter's share of the input gradient is `mask * keep_scale * (ga @ A)`
(ga = scaling * grad_out @ B, [tokens x r]; A is [r x in]; mask is the dropout's keep mask). In
PyTorch that is a GEMM writing a [tokens x in] product, then `addcmul_` reading it back with the
bool mask and the base gradient. The addcmul runs as PyTorch's unrolled (unvectorised) kernel
because its operands mix bf16 and bool: on an H100 at 8192-token rows it took 49 ms of a
Mistral-7B step, more than any kernel but the big GEMMs (docs/benchmarks.md).

`add_lora_input_grad_` does it in one pass: each program computes a [BLOCK_T x BLOCK_N] tile of
`ga @ A` in registers (the inner dimension is the LoRA rank, 8 to 256), applies the mask and the
scale, adds the tile to the base gradient and stores it. It reads the base gradient and the mask
once and writes the result once (5 bytes a value in bf16), and the product is never stored. It
also rounds once where the PyTorch path rounds twice (the product to bf16, then the sum).

The kernel runs on CUDA in bf16/fp16; `lora_input_grad_usable` says when, and the fused layer
falls back to the PyTorch expression otherwise (CPU, float32, no Triton), and also, with one
warning, if Triton fails to compile it on the card at hand. Under `TRITON_INTERPRET=1` Triton runs
it on the CPU, which is how CI tests it.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

BLOCK_T = 64
BLOCK_N = 128
BLOCK_R = 16  # tl.dot's smallest inner dimension; the rank is walked in steps of this
NUM_WARPS = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def triton_problem() -> str | None:
    """None when Triton imports, else why not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # no wheel for this platform, or a broken install
        return f"Triton does not import ({_describe(exc)})"
    return None


def _describe(exc: Exception) -> str:
    """The exception's type and the first line of its message, for a one-line warning."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160] if lines else ''}"


# (device type, dtype) -> why the kernel failed there; the PyTorch expression takes over for the
# rest of the process.
_failed: dict[tuple[str, torch.dtype], str] = {}


def lora_input_grad_usable(grad_x: torch.Tensor) -> bool:
    """Whether the Triton kernel handles this gradient (else the PyTorch expression does)."""
    if grad_x.dtype not in (torch.bfloat16, torch.float16) or grad_x.dim() != 2:
        return False
    if (grad_x.device.type, grad_x.dtype) in _failed:
        return False
    if not (grad_x.is_cuda or _interpreting()):
        return False
    return triton_problem() is None


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """The jitted kernel (built on first use: Triton decides at decoration whether it interprets)."""
    import triton
    import triton.language as tl

    @triton.jit
    def lora_input_grad_kernel(gx_ptr, ga_ptr, a_ptr, mask_ptr, T, N, R, keep_scale,
                               s_gx, s_ga, s_a, s_m,
                               BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < T
        col_ok = cols < N
        acc = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rank_ok = ranks < R
            ga = tl.load(ga_ptr + rows[:, None].to(tl.int64) * s_ga + ranks[None, :],
                         mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            a = tl.load(a_ptr + ranks[:, None].to(tl.int64) * s_a + cols[None, :],
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            # In float32: every bf16/fp16 value is exact in TF32, so the tensor cores lose nothing
            # (the inner dimension is the rank: speed is not at stake), and Triton's CPU
            # interpreter, which mis-reads bf16 in tl.dot, gets it right too.
            acc += tl.dot(ga.to(tl.float32), a.to(tl.float32))
        tile = row_ok[:, None] & col_ok[None, :]
        keep = tl.load(mask_ptr + rows[:, None].to(tl.int64) * s_m + cols[None, :], mask=tile, other=0)
        gx_at = gx_ptr + rows[:, None].to(tl.int64) * s_gx + cols[None, :]
        gx = tl.load(gx_at, mask=tile, other=0.0).to(tl.float32)
        out = gx + tl.where(keep != 0, acc * keep_scale, 0.0)
        tl.store(gx_at, out.to(gx_ptr.dtype.element_ty), mask=tile)

    return lora_input_grad_kernel


def add_lora_input_grad_(grad_x: torch.Tensor, ga: torch.Tensor, A: torch.Tensor, mask: torch.Tensor,
                         keep_scale: float) -> torch.Tensor:
    """grad_x += keep_scale * mask * (ga @ A), in place; grad_x [T x N] with contiguous rows,
    ga [T x R], A [R x N], mask [T x N] bool. Same dtype for grad_x, ga and A."""
    T, N = grad_x.shape
    R = ga.shape[1]
    if ga.shape != (T, R) or A.shape != (R, N) or mask.shape != (T, N):
        raise ValueError(f"shapes: grad_x {tuple(grad_x.shape)}, ga {tuple(ga.shape)}, A {tuple(A.shape)}, "
                         f"mask {tuple(mask.shape)}")
    if not (ga.dtype == A.dtype == grad_x.dtype) or mask.dtype != torch.bool:
        raise ValueError(f"dtypes: grad_x {grad_x.dtype}, ga {ga.dtype}, A {A.dtype}, mask {mask.dtype}")
    if grad_x.stride(1) != 1:
        raise ValueError(f"grad_x must have contiguous rows (strides {grad_x.stride()})")
    ga, A, mask = ga.contiguous(), A.contiguous(), mask.contiguous()  # no copies in the fused layer
    grid = ((T + BLOCK_T - 1) // BLOCK_T, (N + BLOCK_N - 1) // BLOCK_N)
    try:
        _kernel(_interpreting())[grid](
            grad_x, ga, A, mask.view(torch.uint8), T, N, R, float(keep_scale),
            grad_x.stride(0), ga.stride(0), A.stride(0), mask.stride(0),
            BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, num_warps=NUM_WARPS,
        )
    except Exception as exc:
        # Triton compiles on first use, and its compiler can fail on a card or version we have
        # not run (Triton 3.6 fails an assertion on some LoRA kernel layouts on Hopper:
        # docs/benchmarks.md). A compile error comes before the launch, so grad_x is untouched:
        # compute the same sum in PyTorch, say so once, and keep to PyTorch from then on.
        key = (grad_x.device.type, grad_x.dtype)
        _failed[key] = _describe(exc)
        warnings.warn(f"the Triton kernel for the LoRA input gradient failed on {key[0]} {key[1]} "
                      f"({_failed[key]}); using the PyTorch expression instead (same result, slower)",
                      RuntimeWarning, stacklevel=2)
        add_lora_input_grad_torch_(grad_x, ga, A, mask, keep_scale)
    return grad_x


def add_lora_input_grad_torch_(grad_x: torch.Tensor, ga: torch.Tensor, A: torch.Tensor, mask: torch.Tensor,
                               keep_scale: float) -> torch.Tensor:
    """The same sum in PyTorch (any device and dtype): the kernel's reference and fallback."""
    return grad_x.addcmul_(ga @ A, mask, value=float(keep_scale))
