"""FP8 (e4m3) matmuls for the frozen base weight of the fused LoRA layer.

The base weight W [out x in] has no gradient, so of a LoRA layer's matmuls only two touch it:
the forward `Y = X W^T` and the input gradient `dX = dY W`. On GPUs with FP8 tensor cores
(compute capability 9.0 and newer) both run in e4m3 at twice the bf16 rate, through
`torch._scaled_mm` with one scale per row of each operand and fp32 accumulation:

    forward:   X ~ sx * qx        sx [T x 1]: one scale per token (row of X)
               W ~ sw * qw        sw [out x 1]: one scale per output channel (row of W)
               Y = sx * (qx @ qw^T) * sw^T                         (scales applied in the epilogue)
    backward:  dX = dY W = (dY * sw^T) @ qw
               dY * sw^T ~ sg * qg   sg [T x 1]: one scale per row, taken after the column scale
               dX = sg * (qg @ qw)

`torch._scaled_mm` takes its second operand column-major, i.e. K-contiguous for the contraction:
qw as stored ([out x in], rows contiguous) is that for the forward (contraction over `in`); the
backward contracts over `out`, so it takes qw transposed in memory: a second copy kept beside the
first where the weight is kept for the run (`Fp8Rows.data_t`), else a copy made just before the
matmul (one byte a weight read and written). W's per-channel scale is folded into dY before dY is
quantized, so both layouts share one scale vector.

Scales are amax / 448 (e4m3's largest finite value), so each row's largest magnitude maps to 448
and nothing saturates. The per-row amax makes an outlier channel cost only its own rows' precision:
a value 100x below its row's largest still lands in e4m3's normal range with 3 mantissa bits.

From NF4: bitsandbytes stores W in blocks of 64 weights with one absmax each, and every block's
largest magnitude is exactly its absmax (NF4's code book holds -1 and 1). A row's amax is therefore
the largest absmax of its blocks, known before a weight is dequantized, so `nf4_to_fp8` dequantizes
and quantizes in one pass: code[nibble] * absmax[block] / row_scale -> e4m3.

The Triton kernels run on CUDA; on any other device (CI's CPU) the same math runs in PyTorch
(`*_reference`), which is also what the kernels are tested against on the GPU. Triton's CPU
interpreter rounds float8 conversions differently from PyTorch, so it does not stand in for the
GPU here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# A row of zeros gets this scale instead of 0 (its quantized values are then 0, not NaN).
MIN_SCALE = 1e-12
ROW_BLOCK = 1024  # columns a quantizing program reads at a time
NF4_BLOCK = 1024  # packed bytes (2048 weights) a dequantizing program converts


@dataclass
class Fp8Rows:
    """A matrix in e4m3 with one float32 scale per row: value ~ data * scale."""

    data: torch.Tensor  # [rows x cols], float8_e4m3fn, rows contiguous
    scale: torch.Tensor  # [rows x 1], float32
    # data transposed in memory ([cols x rows], rows contiguous), where a weight keeps both layouts
    data_t: torch.Tensor | None = None

    def with_transposed(self) -> "Fp8Rows":
        """The same matrix also holding its transposed layout (what `fp8_input_grad` reads)."""
        return Fp8Rows(self.data, self.scale, _transposed(self.data))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.float() * self.scale).to(dtype)


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


# --- quantizing rows -------------------------------------------------------------------------------

def quantize_rows_reference(x: torch.Tensor, col_scale: torch.Tensor | None = None) -> Fp8Rows:
    """x (times col_scale, one factor per column) with one scale per row, in PyTorch."""
    xf = x.float()
    if col_scale is not None:
        xf = xf * col_scale.reshape(1, -1).float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    return Fp8Rows((xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale)


@functools.lru_cache(maxsize=1)
def _quantize_rows_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_kernel(x_ptr, cs_ptr, q_ptr, s_ptr, K, s_x, s_q,
                             HAS_COL_SCALE: tl.constexpr, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
                             MIN_SCALE: tl.constexpr):
        # One program a row: a first pass for the row's amax, a second (from cache) to scale and store.
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * s_x
        amax = tl.zeros((BLOCK,), tl.float32)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            ok = cols < K
            v = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_COL_SCALE:
                v = v * tl.load(cs_ptr + cols, mask=ok, other=0.0)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX, MIN_SCALE)
        tl.store(s_ptr + row, scale)
        q_row = q_ptr + row * s_q
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            ok = cols < K
            v = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_COL_SCALE:
                v = v * tl.load(cs_ptr + cols, mask=ok, other=0.0)
            v = tl.minimum(tl.maximum(v / scale, -FP8_MAX), FP8_MAX)
            tl.store(q_row + cols, v.to(q_ptr.dtype.element_ty), mask=ok)

    return quantize_rows_kernel


def quantize_rows(x: torch.Tensor, col_scale: torch.Tensor | None = None) -> Fp8Rows:
    """x [T x K] (optionally times col_scale [K], float32) in e4m3 with one scale per row: one
    Triton kernel on CUDA (x read once from memory, the second pass from cache), PyTorch elsewhere."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows: a 2-D tensor, not {tuple(x.shape)}")
    if not _on_gpu(x):
        return quantize_rows_reference(x, col_scale)
    if x.stride(1) != 1:
        x = x.contiguous()
    T, K = x.shape
    q = torch.empty(T, K, dtype=FP8, device=x.device)
    scale = torch.empty(T, 1, dtype=torch.float32, device=x.device)
    cs = col_scale.reshape(-1).float().contiguous() if col_scale is not None else scale
    _quantize_rows_kernel()[(T,)](x, cs, q, scale, K, x.stride(0), q.stride(0),
                                  HAS_COL_SCALE=col_scale is not None, BLOCK=ROW_BLOCK,
                                  FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE, num_warps=4)
    return Fp8Rows(q, scale)


# --- NF4 -> FP8 ------------------------------------------------------------------------------------

def nf4_row_scales(absmax: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows x 1] float32: each row's amax (the largest absmax of its blocks) / 448."""
    return (absmax.float().reshape(rows, -1).amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)


@functools.lru_cache(maxsize=1)
def _nf4_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_to_fp8_kernel(packed_ptr, absmax_ptr, code_ptr, rs_ptr, q_ptr, n_bytes, bytes_per_row,
                          BYTES_PER_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
        # Byte i holds weights 2i (high nibble) and 2i+1 (low nibble) of the row-major [out x in]
        # weight; weight j belongs to absmax block j // blocksize and to row j // in.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n_bytes
        byte = tl.load(packed_ptr + offs, mask=ok, other=0).to(tl.int32)
        block_scale = tl.load(absmax_ptr + offs // BYTES_PER_BLOCK, mask=ok, other=0.0)
        row_scale = tl.load(rs_ptr + offs // bytes_per_row, mask=ok, other=1.0)
        # (code * absmax) / row_scale, in that order: bitsandbytes' dequantized value, then the scale
        hi = tl.load(code_ptr + (byte >> 4)) * block_scale / row_scale
        lo = tl.load(code_ptr + (byte & 15)) * block_scale / row_scale
        pair = tl.join(hi, lo)  # [BLOCK, 2]: weights 2i and 2i+1 side by side, as in memory
        out_offs = tl.join(2 * offs, 2 * offs + 1)
        tl.store(q_ptr + out_offs, pair.to(q_ptr.dtype.element_ty), mask=tl.join(ok, ok))

    return nf4_to_fp8_kernel


def nf4_to_fp8(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: tuple[int, int],
               blocksize: int) -> Fp8Rows:
    """A bitsandbytes 4-bit weight straight to e4m3 with one scale per output row, in one CUDA
    kernel. packed: the uint8 storage (two weights a byte, high nibble first); absmax: the float32
    block scales (one per `blocksize` weights, already dequantized); code: the 16-value code book.
    Rows must be whole blocks (in_features % blocksize == 0)."""
    rows, cols = shape
    if cols % blocksize or blocksize % 2:
        raise ValueError(f"nf4_to_fp8: in_features {cols} is not a multiple of the block size {blocksize}")
    row_scale = nf4_row_scales(absmax, rows)
    q = torch.empty(rows, cols, dtype=FP8, device=packed.device)
    n_bytes = rows * cols // 2
    grid = (triton_cdiv(n_bytes, NF4_BLOCK),)
    _nf4_kernel()[grid](packed.reshape(-1), absmax.float().contiguous(), code.float().contiguous(), row_scale, q,
                        n_bytes, cols // 2, BYTES_PER_BLOCK=blocksize // 2, BLOCK=NF4_BLOCK, num_warps=4)
    return Fp8Rows(q, row_scale)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# --- the two matmuls -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _ones(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(1, n, dtype=torch.float32, device=device)


def _scaled_mm(a: Fp8Rows, b_t: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b_t^T with a's row scales and b_t's row scales ([1 x N]): b_t is [N x K] with rows
    contiguous (column-major as the matmul's second operand, which `_scaled_mm` requires)."""
    if _on_gpu(a.data):
        return torch._scaled_mm(a.data, b_t.t(), scale_a=a.scale, scale_b=b_scale, out_dtype=out_dtype,
                                use_fast_accum=False)
    return ((a.data.float() @ b_t.float().t()) * a.scale * b_scale).to(out_dtype)


def _transposed(data: torch.Tensor) -> torch.Tensor:
    """An e4m3 matrix transposed in memory (copied as bytes: every device copies those)."""
    return data.view(torch.uint8).t().contiguous().view(FP8)


def fp8_linear(x: Fp8Rows, w: Fp8Rows, out_dtype: torch.dtype) -> torch.Tensor:
    """Y = X W^T [T x out] from X and W in e4m3, each with one scale per row, fp32 accumulation."""
    return _scaled_mm(x, w.data, w.scale.reshape(1, -1), out_dtype)


def fp8_input_grad(grad_out: torch.Tensor, w: Fp8Rows) -> torch.Tensor:
    """dX = dY W [T x in] for Y = X W^T: dY times W's row scales, quantized by row, against W's
    e4m3 values transposed in memory (the layout the matmul needs for this contraction)."""
    g = quantize_rows(grad_out, col_scale=w.scale)
    w_t = w.data_t if w.data_t is not None else _transposed(w.data)  # [in x out]: rows contiguous
    return _scaled_mm(g, w_t, _ones(w_t.shape[0], w_t.device), grad_out.dtype)
