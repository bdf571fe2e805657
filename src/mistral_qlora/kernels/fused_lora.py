"""The LoRA layer on a 4-bit linear that replaces PEFT's, computed by one autograd function.

PEFT's `Linear4bit` runs the 4-bit matmul, then clones its output, computes the adapter branch,
multiplies it by the scaling and adds it: four passes over the [tokens x out_features] output in
forward, and in backward a scaling pass plus a separate sum of the two input gradients. At
thousands of tokens per row that elementwise traffic is a large share of a step.
`FusedLoraLinear4bit` does the same math with the adapter folded into the matmuls, by the
autograd functions of kernels/lora_autograd.py.

W is dequantized again in backward, as bitsandbytes does, so no 16-bit copy of the base is kept,
unless the layer is told to keep it (`configure`, from the plan: plan/layers.py): `backward` keeps
the forward's W until the layer's backward (recomputing layers: from their recompute on),
`run` keeps it for the whole run, so the frozen weight is dequantized once instead of once per
forward.
Under `quantization.compute: fp8` (`configure(compute="fp8")`) the base weight's two matmuls run
in e4m3 (`LoraLinearFp8Function`): the input quantized by row once for the linears that read it
(`InputGroup`), the weight kept for the run in e4m3 or converted from NF4 at each use.
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

# Imported as a module: its functions are looked up at each call, here as inside its autograd
# functions, so replacing one of them (a test counting dequantizations) reaches both.
from mistral_qlora.kernels import lora_autograd
from mistral_qlora.kernels.fp8 import Fp8Rows, quantize_rows

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


class FusedLoraLinear4bit(_PeftLinear4bit):
    """PEFT's LoRA layer for a bitsandbytes `Linear4bit`, with the fused forward and backward.

    PEFT builds it (`register_fused_lora`); the plan then sets how it runs, once, through
    `configure` (model/lora.py applies it to every fused layer):
    - `keep`: how long the 16-bit weight the forward dequantized is kept (KEEP). `backward` costs
      the weight's 16-bit size for as long as the layer's activations are kept; `run` keeps it
      between steps too. A layer whose activations are all kept holds its weight at the step's
      peak (the end of forward) either way, so keeping it for the run adds nothing to the peak.
    - `product_first`: the adapter's product written first, the base GEMM adding onto it
      (`lora_autograd._matmul_plus_product`).
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
            return lora_autograd.LoraLinearFp8Function.apply(x, weight, absmax, A, B, scaling, p, dtype,
                                                             self.keep != KEEP_NONE, kept, shared, xq)
        cached = self.dequantized_weight(dtype, weight, absmax) if self.keep == KEEP_FOR_RUN else None
        return lora_autograd.LoraLinear4bitFunction.apply(x, weight, absmax, A, B, scaling, p, dtype,
                                                          self.keep != KEEP_NONE, cached, shared, self.product_first)

    def dequantized_weight(self, dtype: torch.dtype, weight=None, absmax=None) -> torch.Tensor:
        """The frozen weight in 16 bits, dequantized on first use and kept (`keep == "run"`);
        dequantized again when the 4-bit weight or its block scales are replaced or moved."""
        weight = self.get_base_layer().weight if weight is None else weight
        absmax = self.block_scales(weight) if absmax is None else absmax
        key = (weight.data_ptr(), weight.device, absmax.data_ptr(), dtype)
        if getattr(self, "_dequantized_key", None) != key:
            self._dequantized = None  # free the old copy before making the new one
            with torch.inference_mode(False):  # a copy made under inference mode could not be saved for backward
                self._dequantized = lora_autograd.dequantize(weight, absmax, dtype)
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
                self._fp8 = lora_autograd.requantize_fp8(weight, absmax).with_transposed()
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
            self._block_scales = lora_autograd.dequantized_absmax(weight)
            self._block_scales_key = key
        return self._block_scales

    def __repr__(self) -> str:
        return "fused_" + super().__repr__()


class InputGroup:
    """Fused linears of one block that read the same input (`SHARED_INPUT_LINEARS`): `size` of
    them. They share the input's gradient buffer and, under FP8, its quantized copy."""

    def __init__(self, size: int = 1, share_grad: bool = True):
        self.size, self.share_grad = size, share_grad
        self._current: lora_autograd.SharedInputGrad | None = None
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

    def join(self, x: torch.Tensor) -> lora_autograd.SharedInputGrad:
        """The shared gradient of `x` for this forward pass: a reader given another tensor than
        the last one starts a new one, so readers handed different tensors each keep their own."""
        if self._current is None or not self._current.reads(x):
            self._current = lora_autograd.SharedInputGrad(x)
        self._current.readers += 1
        return self._current


# Linears of a decoder layer's blocks that read one tensor: every one of their outputs is used,
# which the shared gradient needs (a reader whose backward never ran would hold the sum back).
SHARED_INPUT_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def register_fused_lora(peft_config) -> None:
    """Make `get_peft_model` wrap every bitsandbytes 4-bit linear with the fused layer."""
    peft_config._register_custom_module({bnb.nn.Linear4bit: FusedLoraLinear4bit})
