"""The MLP computed over tiles of the sequence (ALST's tiled MLP), for the longest rows.

A recomputing decoder layer's backward holds its whole saved set at once (plan/memory.py): at long
rows most of it is the MLP's, the gate and up outputs and the down projection's input, three
tensors of tokens x intermediate values each (3.5 times the hidden size for Mistral-7B), against
one tensor of tokens x hidden values for the layer's input. `TiledMLP` computes the MLP a tile of
`tile` tokens at a time, so those intermediates exist for one tile only:

- forward: each tile through the MLP without a graph, written into one output;
- backward: each tile computed again from the MLP's input with a graph, and differentiated at once
  (`torch.autograd.grad`), its input gradient written into one buffer and the trainable
  parameters' gradients summed over the tiles and returned as the function's own: autograd then
  accumulates each parameter's gradient once, as for the untiled MLP (DDP's and ZeRO-2's
  gradient hooks fire once per parameter and step).

What the function keeps for backward is its input only, through `save_for_backward`, so the layer's
checkpoint (reentrant or not) and activation offload (model/offload.py) treat it as any other saved
tensor. The random state (CPU and the input's device) is kept at forward and restored for the
backward's pass, so LoRA dropout draws the same masks; autocast is restored as it was in forward.
The cost is one more forward of the MLP per step in each tiled layer.

On the fused LoRA layer (kernels/fused_lora.py) each pass holds its linears' dequantized weights
from the first tile to the last (`_weights_held`), instead of dequantizing them once per tile; the
gate/up input group's shared input gradient works per tile, each tile being a tensor of its own.

Each token's MLP output depends on that token alone, so tiling changes no value of the forward;
the parameters' gradients are sums over tiles instead of one product over the row, equal up to the
order of the additions.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from mistral_qlora.kernels.fused_lora import KEEP_FOR_RUN, FusedLoraLinear4bit


@contextmanager
def _weights_held(linears):
    """The fused linears keep the weight they dequantize (or convert to FP8) until the block ends,
    then return to their own setting, which frees it."""
    kept = [(m, m.keep) for m in linears if m.keep != KEEP_FOR_RUN]
    for m, _ in kept:
        m.configure(KEEP_FOR_RUN, m.product_first, m.input_group, m.compute)
    try:
        yield
    finally:
        for m, keep in kept:
            m.configure(keep, m.product_first, m.input_group, m.compute)


def _autocast_state(device_type: str) -> dict:
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type), "cache_enabled": torch.is_autocast_cache_enabled()}


class _TiledMLPFunction(torch.autograd.Function):
    """out = mlp(x), one tile of rows at a time (module docstring); `params` are the MLP's
    trainable parameters, inputs of the function so their gradients come out of its backward."""

    @staticmethod
    def forward(ctx, tiled: "TiledMLP", x: torch.Tensor, *params):
        ctx.tiled, ctx.params = tiled, params
        ctx.autocast = _autocast_state(x.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        out = None
        with _weights_held(tiled.fused_linears):
            for start in range(0, flat.shape[0], tiled.tile):
                y = tiled.inner(flat[start:start + tiled.tile])
                if out is None:
                    out = y.new_empty(flat.shape[0], y.shape[-1])
                out[start:start + y.shape[0]] = y
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        tiled, params = ctx.tiled, ctx.params
        need_x = ctx.needs_input_grad[1]
        wanted = [i for i, p in enumerate(params) if ctx.needs_input_grad[2 + i]]
        flat = x.reshape(-1, x.shape[-1])
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat) if need_x else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), _weights_held(tiled.fused_linears):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.device_rng is not None:
                torch.cuda.set_rng_state(ctx.device_rng, x.device)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                for start in range(0, flat.shape[0], tiled.tile):
                    xt = flat[start:start + tiled.tile].detach().requires_grad_(need_x)
                    yt = tiled.inner(xt)
                    inputs = ([xt] if need_x else []) + [params[i] for i in wanted]
                    got = torch.autograd.grad(yt, inputs, g[start:start + xt.shape[0]], allow_unused=True)
                    if need_x:
                        grad_x[start:start + xt.shape[0]] = got[0]
                        got = got[1:]
                    for i, gp in zip(wanted, got):
                        if gp is not None:
                            grads[i] = gp if grads[i] is None else grads[i].add_(gp)
        return (None, None if grad_x is None else grad_x.view_as(x), *grads)


class TiledMLP(torch.nn.Module):
    """A decoder layer's MLP computed `tile` tokens at a time (module docstring).

    It takes the MLP's place in the layer (`tile_mlps`) and registers the MLP's own children as its
    children, so every parameter keeps its name (`...mlp.gate_proj.lora_A.default.weight`): the
    optimizer, the saved adapter and PEFT see the same model. The MLP itself is held unregistered
    and called for each tile."""

    def __init__(self, mlp: torch.nn.Module, tile: int):
        super().__init__()
        if tile < 1:
            raise ValueError(f"tile={tile}: at least one token")
        object.__setattr__(self, "inner", mlp)
        self.tile = tile
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.fused_linears = [m for m in mlp.modules() if isinstance(m, FusedLoraLinear4bit)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.inner.parameters() if p.requires_grad]
        return _TiledMLPFunction.apply(self, x, *params)

    def extra_repr(self) -> str:
        return f"tile={self.tile}, inner={type(self.inner).__name__}"


def tile_mlps(layers, tile: int) -> int:
    """Put a `TiledMLP` of `tile` tokens in place of the MLP of each recomputing layer among
    `layers` (transformers' `gradient_checkpointing` switch of each decoder layer); how many."""
    n = 0
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False) and not isinstance(layer.mlp, TiledMLP):
            layer.mlp = TiledMLP(layer.mlp, tile)
            n += 1
    return n
