"""The LoRA layer on a 4-bit linear, computed as one autograd function.

PEFT's `Linear4bit` runs the 4-bit matmul, then clones its output, computes the adapter branch,
multiplies it by the scaling and adds it: four passes over the [tokens x out_features] output in
forward, and in backward a scaling pass plus a separate sum of the two input gradients. At
thousands of tokens per row that elementwise traffic is a large share of a step.

`LoraLinear4bitFunction` does the same math with the adapter folded into the matmuls:

    forward:  xa   = dropout(x) @ A.T              [tokens x r]
              out  = x @ W.T + scaling * xa @ B.T  W dequantized from NF4 (bitsandbytes); the rank-r
                                                    product written by a Triton kernel
                                                    (kernels/lora_product.py), the GEMM adding onto it
    backward: ga   = scaling * g @ B               [tokens x r]
              dB   = scaling * g.T @ xa,   dA = ga.T @ dropout(x)
              dx   = g @ W + ga @ A                (with dropout: + mask * keep_scale * (ga @ A)),
                                                    the same kernel and GEMM

W is dequantized again in backward, as bitsandbytes does, so no 16-bit copy of the base is kept,
unless the layer is told to keep it (`configure`, from the plan: plan/layers.py): `backward` keeps
the forward's W until the layer's backward (recomputing layers: from their recompute on),
`run` keeps it for the whole run, so the frozen weight is dequantized once instead of once per
forward.
Under `quantization.compute: fp8` (`configure(compute="fp8")`) `LoraLinearFp8Function` runs the
base weight's two matmuls in e4m3 instead (kernels/fp8.py): x quantized by row (once for the
linears that read it), W converted from NF4 in one kernel or kept for the run in e4m3, in both
layouts the two matmuls read; the adapter's products stay in 16 bits.
Parameters, names and the saved adapter are PEFT's own: `FusedLoraLinear4bit` subclasses PEFT's
`Linear4bit` and is registered through `LoraConfig._register_custom_module`, PEFT's extension
point for custom LoRA layers. Anything the fused path does not cover (several or disabled
adapters, merged weights, DoRA and other variants, a LoRA bias, a base bias, weights DeepSpeed
ZeRO-3 gathers through module hooks) runs PEFT's own forward.
"""

from __future__ import annotations

import weakref

import torch

import bitsandbytes as bnb
from peft.tuners.lora.bnb import Linear4bit as _PeftLinear4bit

from mistral_qlora.kernels.fp8 import Fp8Rows, fp8_input_grad, fp8_linear, nf4_to_fp8, quantize_rows
from mistral_qlora.kernels.lora_product import add_lora_product_, add_lora_product_torch_, lora_product_usable

# How long a fused layer keeps the 16-bit weight its forward dequantized (`FusedLoraLinear4bit.configure`).
KEEP_NONE = "none"  # dequantized again in backward
KEEP_FOR_BACKWARD = "backward"  # kept from forward (or recompute) until this layer's backward
KEEP_FOR_RUN = "run"  # kept from one step to the next: dequantized once per run
KEEP = (KEEP_NONE, KEEP_FOR_BACKWARD, KEEP_FOR_RUN)

# What the base weight's two matmuls run in (`quantization.compute`): the dequantized 16-bit weight,
# or e4m3 with per-row scales (kernels/fp8.py), the weight kept or converted in its FP8 form.
COMPUTE_BF16 = "bf16"
COMPUTE_FP8 = "fp8"
COMPUTE = (COMPUTE_BF16, COMPUTE_FP8)


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
            W = _dequantize(weight, absmax, dtype) if dequantized is None else dequantized
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
                W = W if W is not None else _dequantize(ctx.weight, ctx.absmax, ctx.dtype)
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
            W8 = _fp8_weight(weight, absmax) if kept is None else kept
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
                W8 = Fp8Rows(wq, ws, wt) if wq is not None else _fp8_weight(ctx.weight, ctx.absmax)
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


def _dequantize(weight, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' 4-bit dequantization (its registered op) with block scales already in float32."""
    state = weight.quant_state
    out = torch.ops.bitsandbytes.dequantize_4bit.default(weight, absmax, state.blocksize, state.quant_type,
                                                         state.shape, state.dtype)
    if weight.shape[0] == 1:  # the transposed [1, n] packing, as bnb.functional.dequantize_4bit undoes it
        out = out.t()
    return out.to(dtype)


def _fp8_weight(weight, absmax: torch.Tensor) -> Fp8Rows:
    """The frozen 4-bit weight in e4m3 with one scale per output row: NF4 converted in one kernel
    on CUDA (kernels/fp8.py); otherwise dequantized to float32 and quantized by row."""
    state = weight.quant_state
    rows, cols = state.shape
    if (weight.is_cuda and state.quant_type == "nf4" and weight.shape[0] != 1
            and cols % state.blocksize == 0):
        return nf4_to_fp8(weight.data, absmax, state.code, (rows, cols), state.blocksize)
    return quantize_rows(_dequantize(weight, absmax, torch.float32))

class FusedLoraLinear4bit(_PeftLinear4bit):
    """PEFT's LoRA layer for a bitsandbytes `Linear4bit`, with the fused forward and backward.

    PEFT builds it (`register_fused_lora`); the plan then sets how it runs, once, through
    `configure` (model/lora.py applies it to every fused layer):
    - `keep`: how long the 16-bit weight the forward dequantized is kept (KEEP). `backward` costs
      the weight's 16-bit size for as long as the layer's activations are kept; `run` keeps it
      between steps too. A layer whose activations are all kept holds its weight at the step's
      peak (the end of forward) either way, so keeping it for the run adds nothing to the peak.
    - `product_first`: the adapter's product written first, the base GEMM adding onto it
      (`_matmul_plus_product`).
    - `input_group`: the fused linears reading the same input share one input-gradient buffer
      (`InputGroup`), and under FP8 one quantized copy of the input, or None.
    - `compute`: COMPUTE_BF16, or COMPUTE_FP8 for the base weight's matmuls in e4m3
      (`LoraLinearFp8Function`); the weight a layer keeps is then its e4m3 copy (1 byte a weight).
    """

    keep = KEEP_NONE
    product_first = True
    input_group: "InputGroup | None" = None
    compute = COMPUTE_BF16

    def configure(self, keep: str = KEEP_NONE, product_first: bool = True,
                  input_group: "InputGroup | None" = None, compute: str = COMPUTE_BF16) -> None:
        if keep not in KEEP:
            raise ValueError(f"keep={keep!r}: one of {KEEP}")
        if compute not in COMPUTE:
            raise ValueError(f"compute={compute!r}: one of {COMPUTE}")
        self.keep, self.product_first, self.input_group, self.compute = keep, product_first, input_group, compute
        if keep != KEEP_FOR_RUN or compute != COMPUTE_BF16:
            self._dequantized = self._dequantized_key = None  # free a copy kept for the run
        if keep != KEEP_FOR_RUN or compute != COMPUTE_FP8:
            self._fp8 = self._fp8_key = None

    def fused_plan(self, args, kwargs, base=None):
        """(adapter, dropout p) when the fused path computes exactly what PEFT's forward would,
        else None. `base`: the base layer, where the caller has it already."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        lora_A = self.lora_A
        active = [a for a in self.active_adapters if a in lora_A]
        if len(active) != 1:
            return None
        (adapter,) = active
        if adapter in self.lora_variant or self.lora_bias.get(adapter, False):
            return None
        base = self.get_base_layer() if base is None else base
        weight = base.weight
        if (base.bias is not None or getattr(weight, "quant_state", None) is None or hasattr(weight, "ds_id")
                or getattr(weight, "packing_format_for_cpu", False)):
            return None
        dropout = self.lora_dropout[adapter]
        if isinstance(dropout, torch.nn.Dropout):
            p = dropout.p if dropout.training else 0.0
        elif isinstance(dropout, torch.nn.Identity):
            p = 0.0
        else:
            return None
        return adapter, p

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # The base layer is looked up once and handed on (PEFT's get_base_layer walks the wrappers
        # each time): a fused call's host time is small against its GEMMs on long rows, less so
        # on short rows and small layers.
        base = self.get_base_layer()
        plan = self.fused_plan(args, kwargs, base)
        if plan is None:
            return super().forward(x, *args, **kwargs)
        adapter, p = plan
        dtype = base.compute_dtype or x.dtype
        weight = base.weight
        absmax = self.block_scales(weight)
        shared = None
        if (self.input_group is not None and self.input_group.share_grad and torch.is_grad_enabled()
                and x.requires_grad):
            shared = self.input_group.join(x)
        A, B, scaling = self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter]
        if self.compute == COMPUTE_FP8:
            kept = self.fp8_weight(weight, absmax) if self.keep == KEEP_FOR_RUN else None
            xq = self.quantized_input(x, dtype)
            return LoraLinearFp8Function.apply(x, weight, absmax, A, B, scaling, p, dtype, self.keep != KEEP_NONE,
                                               kept, shared, xq)
        cached = self.dequantized_weight(dtype, weight, absmax) if self.keep == KEEP_FOR_RUN else None
        return LoraLinear4bitFunction.apply(x, weight, absmax, A, B, scaling, p, dtype, self.keep != KEEP_NONE,
                                            cached, shared, self.product_first)

    def dequantized_weight(self, dtype: torch.dtype, weight=None, absmax=None) -> torch.Tensor:
        """The frozen weight in 16 bits, dequantized on first use and kept (`keep == "run"`);
        dequantized again when the 4-bit weight or its block scales are replaced or moved."""
        weight = self.get_base_layer().weight if weight is None else weight
        absmax = self.block_scales(weight) if absmax is None else absmax
        key = (weight.data_ptr(), weight.device, absmax.data_ptr(), dtype)
        if getattr(self, "_dequantized_key", None) != key:
            self._dequantized = None  # free the old copy before making the new one
            with torch.inference_mode(False):  # a copy made under inference mode could not be saved for backward
                self._dequantized = _dequantize(weight, absmax, dtype)
            self._dequantized_key = key
        return self._dequantized

    def fp8_weight(self, weight=None, absmax=None) -> Fp8Rows:
        """The frozen weight in e4m3 (one scale per output row) in both layouts the two matmuls
        read (kernels/fp8.py), converted on first use and kept (`keep == "run"` under FP8),
        converted again when the 4-bit weight or its scales change."""
        weight = self.get_base_layer().weight if weight is None else weight
        absmax = self.block_scales(weight) if absmax is None else absmax
        key = (weight.data_ptr(), weight.device, absmax.data_ptr())
        if getattr(self, "_fp8_key", None) != key:
            self._fp8 = None
            with torch.inference_mode(False):
                self._fp8 = _fp8_weight(weight, absmax).with_transposed()
            self._fp8_key = key
        return self._fp8

    def quantized_input(self, x: torch.Tensor, dtype: torch.dtype) -> Fp8Rows:
        """x [.. x in] in e4m3 by row: quantized once for all the linears of this layer's input
        group that read it (q/k/v, gate/up), else for this linear alone."""
        def quantize():
            with torch.no_grad():
                return quantize_rows(x.reshape(-1, x.shape[-1]).to(dtype))
        if self.input_group is None:
            return quantize()
        return self.input_group.quantized(x, quantize)

    def block_scales(self, weight=None) -> torch.Tensor:
        """The frozen weight's float32 block scales, dequantized once and kept (4 bytes per 64
        weights: 0.45 GB for Mistral-7B). bitsandbytes recomputes them from their 8-bit form on
        every dequantization: two more kernel launches and a Python call per matmul, hundreds of
        times a step."""
        weight = self.get_base_layer().weight if weight is None else weight
        absmax = weight.quant_state.absmax
        key = (absmax.data_ptr(), absmax.device)
        if getattr(self, "_block_scales_key", None) != key:
            self._block_scales = dequantized_absmax(weight)
            self._block_scales_key = key
        return self._block_scales

    def __repr__(self) -> str:
        return "fused_" + super().__repr__()


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


class InputGroup:
    """Fused linears of one block that read the same input (`SHARED_INPUT_LINEARS`): `size` of
    them. They share the input's gradient buffer and, under FP8, its quantized copy."""

    def __init__(self, size: int = 1, share_grad: bool = True):
        self.size, self.share_grad = size, share_grad
        self._current: SharedInputGrad | None = None
        self._quantized = None  # (weakref to x, x's version, its quantized copy, readers served)

    def quantized(self, x: torch.Tensor, quantize):
        """`quantize()` of x, computed by the first reader of this forward pass and handed to the
        others; dropped after the group's last reader so no copy outlives its pass."""
        held = self._quantized
        if held is not None and held[0]() is x and held[1] == x._version:
            _, version, q, served = held
        else:
            version, q, served = x._version, quantize(), 0
        served += 1
        self._quantized = None if served >= self.size else (weakref.ref(x), version, q, served)
        return q

    def join(self, x: torch.Tensor) -> SharedInputGrad:
        """The shared gradient of `x` for this forward pass: a reader given another tensor than
        the last one starts a new one, so readers handed different tensors each keep their own."""
        if self._current is None or not self._current.reads(x):
            self._current = SharedInputGrad(x)
        self._current.readers += 1
        return self._current


# Linears of a decoder layer's blocks that read one tensor: every one of their outputs is used,
# which the shared gradient needs (a reader whose backward never ran would hold the sum back).
SHARED_INPUT_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def register_fused_lora(peft_config) -> None:
    """Make `get_peft_model` wrap every bitsandbytes 4-bit linear with the fused layer."""
    peft_config._register_custom_module({bnb.nn.Linear4bit: FusedLoraLinear4bit})
