"""The fused LoRA layer's math: its two autograd functions, on a 4-bit base weight.

`LoraLinear4bitFunction` computes PEFT's LoRA output with the adapter folded into the matmuls:

    forward:  xa   = dropout(x) @ A.T              [tokens x r]
              out  = x @ W.T + scaling * xa @ B.T  W dequantized from NF4 (bitsandbytes); the rank-r
                                                    product written by a Triton kernel
                                                    (kernels/lora_product.py), the GEMM adding onto it
    backward: ga   = scaling * g @ B               [tokens x r]
              dB   = scaling * g.T @ xa,   dA = ga.T @ dropout(x)
              dx   = g @ W + ga @ A                (with dropout: + mask * keep_scale * (ga @ A)),
                                                    the same kernel and GEMM

W is dequantized again in backward, as bitsandbytes does, so no 16-bit copy of the base is kept,
unless the caller hands the forward's W on (`keep_weight`) or a copy it keeps for the run
(`dequantized`). `LoraLinearFp8Function` runs the base weight's two matmuls in e4m3 instead
(kernels/fp8.py): x quantized by row (by the caller, once for the linears that read it), W
converted from NF4 in one kernel (`requantize_fp8`) or handed on in e4m3, in both layouts the two
matmuls read; the adapter's products stay in 16 bits. Linears that read one input add their input
gradients into one buffer (`SharedInputGrad`).

The layer that calls these, replacing PEFT's, is kernels/fused_lora.py.
"""

from __future__ import annotations

import weakref

import torch

import bitsandbytes as bnb

from mistral_qlora.kernels.fp8 import Fp8Rows, fp8_input_grad, fp8_linear, nf4_to_fp8, quantize_rows
from mistral_qlora.kernels.lora_product import add_lora_product_, add_lora_product_torch_, lora_product_usable


class LoraLinear4bitFunction(torch.autograd.Function):
    """y = x @ deq(W).T + scaling * dropout(x) @ A.T @ B.T, with hand-written backward.

    Dropout (p > 0) is `torch.native_dropout`, PEFT's own kernel; its dropped copy and mask are
    kept for backward, as PEFT's layer keeps them."""

    @staticmethod
    def forward(ctx, x, weight, absmax, lora_A, lora_B, scaling: float, dropout_p: float, dtype: torch.dtype,
                keep_weight: bool = False, dequantized: torch.Tensor | None = None, shared=None,
                product_first: bool = False):
        shape, x_dtype = x.shape, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            A, B = lora_A.to(dtype), lora_B.to(dtype)
            W = dequantize(weight, absmax, dtype) if dequantized is None else dequantized
            dx, mask, xa = _adapter_input(x2, A, dropout_p)
            out = _matmul_plus_product(x2, W.t(), xa, B.t(), scaling, None, product_first)
        ctx.weight, ctx.absmax = weight, absmax  # frozen 4-bit parameter: dequantized again in backward, unless kept
        ctx.scaling, ctx.dropout_p, ctx.dtype, ctx.shared = scaling, dropout_p, dtype, shared
        ctx.product_first = product_first
        ctx.x_shape, ctx.x_dtype, ctx.A_dtype, ctx.B_dtype = shape, x_dtype, lora_A.dtype, lora_B.dtype
        ctx.save_for_backward(dx, mask, xa, A, B, W if keep_weight else None)
        return out.reshape(*shape[:-1], out.shape[-1]).to(x_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        dx, mask, xa, A, B, W = ctx.saved_tensors
        need_x, _, _, need_A, need_B = ctx.needs_input_grad[:5]
        grad_x = grad_A = grad_B = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
            grad_A, grad_B, ga = _adapter_grads(ctx, g, dx, xa, B, need_A, need_B, need_x)
            if need_x:
                W = W if W is not None else dequantize(ctx.weight, ctx.absmax, ctx.dtype)
                shared = ctx.shared
                keep_scale = 1.0 / (1.0 - ctx.dropout_p)
                if shared is not None and shared.buffer is not None:  # another reader's gradient: add to it
                    grad_x = shared.buffer.addmm_(g, W)
                    _add_product(grad_x, ga, A, keep_scale, mask)
                else:
                    grad_x = _matmul_plus_product(g, W, ga, A, keep_scale, mask, ctx.product_first)
                if shared is not None:
                    grad_x = shared.pass_on(grad_x)
                if grad_x is not None:
                    grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, grad_A, grad_B, None, None, None, None, None, None, None


def _adapter_input(x2: torch.Tensor, A: torch.Tensor, dropout_p: float):
    """(dropped input, dropout mask or None, xa = dropped input @ A.T [tokens x r])."""
    if dropout_p > 0:
        dx, mask = torch.native_dropout(x2, dropout_p, True)
    else:
        dx, mask = x2, None
    return dx, mask, dx @ A.t()


def _adapter_grads(ctx, g: torch.Tensor, dx: torch.Tensor, xa: torch.Tensor, B: torch.Tensor,
                   need_A: bool, need_B: bool, need_x: bool):
    """(dA, dB, ga = scaling * g @ B) of the adapter branch; each None where not needed."""
    grad_A = grad_B = ga = None
    if need_B:
        grad_B = _mm(g.t(), xa, ctx.scaling).to(ctx.B_dtype)
    if need_A or need_x:
        ga = _mm(g, B, ctx.scaling)
    if need_A:
        grad_A = (ga.t() @ dx).to(ctx.A_dtype)
    return grad_A, grad_B, ga


class LoraLinearFp8Function(torch.autograd.Function):
    """The same layer with the base weight's two matmuls in FP8 (kernels/fp8.py):

        forward:  out = fp8(x) @ fp8(W).T + scaling * dropout(x) @ A.T @ B.T
        backward: dx  = fp8(g * sw) @ fp8(W) + (mask *) keep_scale * (scaling * g @ B) @ A

    The adapter's products and gradients stay in `dtype`. `xq` is x already quantized by row (the
    linears that read one input share it); `kept` the weight in e4m3 when the layer keeps it for the
    run, else it is converted from NF4 here and, with `keep_weight`, kept until backward."""

    @staticmethod
    def forward(ctx, x, weight, absmax, lora_A, lora_B, scaling: float, dropout_p: float, dtype: torch.dtype,
                keep_weight: bool, kept: Fp8Rows | None, shared, xq: Fp8Rows):
        shape, x_dtype = x.shape, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            A, B = lora_A.to(dtype), lora_B.to(dtype)
            W8 = requantize_fp8(weight, absmax) if kept is None else kept
            dx, mask, xa = _adapter_input(x2, A, dropout_p)
            out = fp8_linear(xq, W8, dtype)
            _add_product(out, xa, B.t(), scaling)
        ctx.weight, ctx.absmax = weight, absmax
        ctx.scaling, ctx.dropout_p, ctx.dtype, ctx.shared = scaling, dropout_p, dtype, shared
        ctx.x_shape, ctx.x_dtype, ctx.A_dtype, ctx.B_dtype = shape, x_dtype, lora_A.dtype, lora_B.dtype
        wq, ws, wt = (W8.data, W8.scale, W8.data_t) if keep_weight else (None, None, None)
        ctx.save_for_backward(dx, mask, xa, A, B, wq, ws, wt)
        return out.reshape(*shape[:-1], out.shape[-1]).to(x_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        dx, mask, xa, A, B, wq, ws, wt = ctx.saved_tensors
        need_x, _, _, need_A, need_B = ctx.needs_input_grad[:5]
        grad_x = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
            grad_A, grad_B, ga = _adapter_grads(ctx, g, dx, xa, B, need_A, need_B, need_x)
            if need_x:
                W8 = Fp8Rows(wq, ws, wt) if wq is not None else requantize_fp8(ctx.weight, ctx.absmax)
                grad_x = fp8_input_grad(g, W8)
                shared = ctx.shared
                keep_scale = 1.0 / (1.0 - ctx.dropout_p)
                if shared is not None and shared.buffer is not None:
                    # another reader's gradient: this one's matmul and product added to it in one pass
                    grad_x = _add_product(shared.buffer, ga, A, keep_scale, mask, addend=grad_x)
                else:
                    _add_product(grad_x, ga, A, keep_scale, mask)
                if shared is not None:
                    grad_x = shared.pass_on(grad_x)
                if grad_x is not None:
                    grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, grad_A, grad_B, None, None, None, None, None, None, None


def _add_product(out: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: float, mask=None,
                 addend: torch.Tensor | None = None) -> torch.Tensor:
    """out += (addend +) scale * (u @ v), the product masked where a dropout mask is given: the
    Triton kernel where it runs (one pass over out; cuBLAS runs these rank-r products at a
    fraction of the card's memory bandwidth), else the PyTorch expression. Returns out."""
    if lora_product_usable(out):
        return add_lora_product_(out, u, v, scale, mask, addend=addend)
    return add_lora_product_torch_(out, u, v, scale, mask, addend=addend)


def _matmul_plus_product(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: float,
                         mask, product_first: bool) -> torch.Tensor:
    """a @ b + scale * (mask *) (u @ v): the base matmul plus the adapter's rank-r share.

    With `product_first`, where the Triton kernel runs, the kernel writes the rank-r product first
    (2 bytes a value; out is not read) and cuBLAS adds the matmul onto it (beta=1: out is read in
    the GEMM's epilogue, while the GEMM is compute-bound); otherwise the GEMM writes out and the
    kernel reads it back to add the product (4 bytes a value)."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    if product_first and lora_product_usable(out):
        add_lora_product_(out, u, v, scale, mask, accumulate=False)
        return out.addmm_(a, b)
    torch.mm(a, b, out=out)
    _add_product(out, u, v, scale, mask)
    return out


def _mm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * a @ b as one GEMM (the scale applied in its epilogue, not by a second kernel)."""
    if alpha == 1.0:
        return a @ b
    return a.new_empty(a.shape[0], b.shape[1]).addmm_(a, b, beta=0, alpha=alpha)


def dequantized_absmax(weight) -> torch.Tensor:
    """The float32 block scales of an NF4/FP4 weight, as bitsandbytes computes them on every
    dequantization: with double quantization they are themselves 8-bit and dequantized first."""
    state = weight.quant_state
    if not state.nested:
        return state.absmax.float()
    absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax.float()


def dequantize(weight, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' 4-bit dequantization (its registered op) with block scales already in float32."""
    state = weight.quant_state
    out = torch.ops.bitsandbytes.dequantize_4bit.default(weight, absmax, state.blocksize, state.quant_type,
                                                         state.shape, state.dtype)
    if weight.shape[0] == 1:  # the transposed [1, n] packing, as bnb.functional.dequantize_4bit undoes it
        out = out.t()
    return out.to(dtype)


def requantize_fp8(weight, absmax: torch.Tensor) -> Fp8Rows:
    """The frozen 4-bit weight in e4m3 with one scale per output row: NF4 converted in one kernel
    on CUDA (kernels/fp8.py); otherwise dequantized to float32 and quantized by row."""
    state = weight.quant_state
    rows, cols = state.shape
    if (weight.is_cuda and state.quant_type == "nf4" and weight.shape[0] != 1
            and cols % state.blocksize == 0):
        return nf4_to_fp8(weight.data, absmax, state.code, (rows, cols), state.blocksize)
    return quantize_rows(dequantize(weight, absmax, torch.float32))


class SharedInputGrad:
    """The input gradient of the fused linears that read one tensor in one forward pass: each
    one's backward adds its share into one buffer (its GEMM with beta=1, then the adapter's
    product), and the last one hands the sum to autograd. Autograd would otherwise take each
    share as a new tensor and add them up, one more pass over [tokens x hidden] per extra reader."""

    def __init__(self, x: torch.Tensor):
        self._x = weakref.ref(x)
        self.readers = 0
        self.buffer: torch.Tensor | None = None

    def reads(self, x: torch.Tensor) -> bool:
        return self._x() is x

    def pass_on(self, grad_x: torch.Tensor) -> torch.Tensor | None:
        """After one reader's share is in `grad_x`: the sum for the last reader, None before."""
        self.readers -= 1
        if self.readers > 0:
            self.buffer = grad_x
            return None
        self.buffer = None
        return grad_x
