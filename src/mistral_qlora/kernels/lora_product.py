"""A Triton kernel for the fused LoRA layer's two rank-r products.

Both passes of the fused layer (kernels/lora_autograd.py) add a rank-r product to a full-width
tensor: the forward adds the adapter's output to the base's, `out += scaling * xa @ B.T`, and the
backward, under LoRA dropout, adds the adapter's share of the input gradient,
`grad_x += keep_scale * mask * (ga @ A)` (ga = scaling * grad_out @ B, [tokens x r]; mask is the
dropout's keep mask). In PyTorch the first is a rank-r `addmm_`, which cuBLAS runs far below the
card's memory bandwidth (the inner dimension is only r), and the second a GEMM writing a
[tokens x in] product, then `addcmul_` reading it back with the bool mask, which PyTorch runs
unvectorised because its operands mix bf16 and bool.

`add_lora_product_` does either in one pass: each program computes a [BLOCK_T x BLOCK_N] tile of
`u @ v` in registers (the inner dimension is the LoRA rank, 8 to 256), scales it, applies the mask
if there is one, adds the tile to `out` and stores it. `out` is read and written once (4 bytes a
value in bf16, 5 with the mask), the product is never stored, and the sum is rounded once where
the PyTorch path rounds twice (the product to bf16, then the sum). With `accumulate=False` it
stores the tile without reading `out` (2 bytes a value): that is how the fused layer uses it, the
adapter's share written first and cuBLAS adding the base matmul onto it in its GEMM's epilogue
(`lora_autograd._matmul_plus_product`). With an `addend` it also adds a third tensor of out's shape in
the same pass, `out += addend + scale * (u @ v)`: the FP8 layer's input gradient, whose matmul
(`torch._scaled_mm`) cannot add onto an existing tensor, joins the shared input-gradient buffer
that way (6 bytes a value instead of 10 for a separate `add_` and product pass).

The kernel runs on CUDA in bf16/fp16; `lora_product_usable` says when, and the fused layer falls
back to the PyTorch expressions otherwise (CPU, float32, no Triton), and also, with one warning, if
Triton fails to compile it on the card at hand. Under `TRITON_INTERPRET=1` Triton runs it on the
CPU, which is how CI tests it.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

BLOCK_T = 32  # 32x256 tiles: the best of a sweep of tile shapes (docs/benchmarks.md)
BLOCK_N = 256
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


def lora_product_usable(out: torch.Tensor) -> bool:
    """Whether the Triton kernel handles this output (else the PyTorch expression does)."""
    if out.dtype not in (torch.bfloat16, torch.float16) or out.dim() != 2:
        return False
    if (out.device.type, out.dtype) in _failed:
        return False
    if not (out.is_cuda or _interpreting()):
        return False
    return triton_problem() is None


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """The jitted kernel (built on first use: Triton decides at decoration whether it interprets)."""
    import triton
    import triton.language as tl

    @triton.jit
    def lora_product_kernel(out_ptr, u_ptr, v_ptr, mask_ptr, add_ptr, T, N, R, scale,
                            s_out, s_u, s_vr, s_vn, s_m, s_add,
                            BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                            HAS_MASK: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_ADDEND: tl.constexpr):
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
            u = tl.load(u_ptr + rows[:, None].to(tl.int64) * s_u + ranks[None, :],
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            v = tl.load(v_ptr + ranks[:, None] * s_vr + cols[None, :].to(tl.int64) * s_vn,
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            # In float32: every bf16/fp16 value is exact in TF32, so the tensor cores lose nothing
            # (the inner dimension is the rank: speed is not at stake), and Triton's CPU
            # interpreter, which mis-reads bf16 in tl.dot, gets it right too.
            acc += tl.dot(u.to(tl.float32), v.to(tl.float32))
        tile = row_ok[:, None] & col_ok[None, :]
        acc = acc * scale
        if HAS_MASK:
            keep = tl.load(mask_ptr + rows[:, None].to(tl.int64) * s_m + cols[None, :], mask=tile, other=0)
            acc = tl.where(keep != 0, acc, 0.0)
        out_at = out_ptr + rows[:, None].to(tl.int64) * s_out + cols[None, :]
        if ACCUMULATE:
            acc += tl.load(out_at, mask=tile, other=0.0).to(tl.float32)
        if HAS_ADDEND:
            acc += tl.load(add_ptr + rows[:, None].to(tl.int64) * s_add + cols[None, :], mask=tile,
                           other=0.0).to(tl.float32)
        tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=tile)

    return lora_product_kernel


def add_lora_product_(out: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: float,
                      mask: torch.Tensor | None = None, accumulate: bool = True,
                      addend: torch.Tensor | None = None) -> torch.Tensor:
    """out += scale * (u @ v), or with a mask out += scale * mask * (u @ v), in place; with
    `accumulate=False`, out = the same product (out's values are not read); with `addend`, that
    tensor is added too (out += addend + ..., not masked), in the same pass.

    out [T x N] with contiguous rows, u [T x R], v [R x N] (any strides: the forward passes
    B.t()), mask [T x N] bool, addend [T x N] with contiguous rows. Same dtype for out, u, v and
    addend."""
    T, N = out.shape
    R = u.shape[1]
    if (u.shape != (T, R) or v.shape != (R, N) or (mask is not None and mask.shape != (T, N))
            or (addend is not None and addend.shape != (T, N))):
        raise ValueError(f"shapes: out {tuple(out.shape)}, u {tuple(u.shape)}, v {tuple(v.shape)}"
                         + (f", mask {tuple(mask.shape)}" if mask is not None else "")
                         + (f", addend {tuple(addend.shape)}" if addend is not None else ""))
    if (not (u.dtype == v.dtype == out.dtype) or (mask is not None and mask.dtype != torch.bool)
            or (addend is not None and addend.dtype != out.dtype)):
        raise ValueError(f"dtypes: out {out.dtype}, u {u.dtype}, v {v.dtype}"
                         + (f", mask {mask.dtype}" if mask is not None else "")
                         + (f", addend {addend.dtype}" if addend is not None else ""))
    if out.stride(1) != 1 or (addend is not None and addend.stride(1) != 1):
        raise ValueError(f"out and addend must have contiguous rows (strides {out.stride()}"
                         + (f", {addend.stride()})" if addend is not None else ")"))
    u = u.contiguous()  # no copies in the fused layer
    m = mask.contiguous().view(torch.uint8) if mask is not None else out  # any pointer: unread without a mask
    a = addend if addend is not None else out  # likewise
    grid = ((T + BLOCK_T - 1) // BLOCK_T, (N + BLOCK_N - 1) // BLOCK_N)
    try:
        _kernel(_interpreting())[grid](
            out, u, v, m, a, T, N, R, float(scale),
            out.stride(0), u.stride(0), v.stride(0), v.stride(1), m.stride(0), a.stride(0),
            BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, HAS_MASK=mask is not None, ACCUMULATE=accumulate,
            HAS_ADDEND=addend is not None, num_warps=NUM_WARPS,
        )
    except Exception as exc:
        # Triton compiles on first use, and its compiler can fail on a card or version we have
        # not run (some versions fail an assertion on some tile layouts). A compile error comes
        # before the launch, so out is untouched:
        # compute the same sum in PyTorch, say so once, and keep to PyTorch from then on.
        key = (out.device.type, out.dtype)
        _failed[key] = _describe(exc)
        warnings.warn(f"the Triton kernel for the LoRA product failed on {key[0]} {key[1]} "
                      f"({_failed[key]}); using the PyTorch expression instead (same result, slower)",
                      RuntimeWarning, stacklevel=2)
        add_lora_product_torch_(out, u, v, scale, mask, accumulate, addend)
    return out


def add_lora_product_torch_(out: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: float,
                            mask: torch.Tensor | None = None, accumulate: bool = True,
                            addend: torch.Tensor | None = None) -> torch.Tensor:
    """The same sum in PyTorch (any device and dtype): the kernel's reference and fallback."""
    if addend is not None:
        if accumulate:
            out.add_(addend)
        else:
            out.copy_(addend)
        accumulate = True
    if mask is None:
        return out.addmm_(u, v, beta=1 if accumulate else 0, alpha=float(scale))
    if accumulate:
        return out.addcmul_(u @ v, mask, value=float(scale))
    return torch.mul(u @ v, mask, out=out).mul_(float(scale))
