"""The tiled MLP (model/tiling.py) on the tiny 4-bit model: the loss and the LoRA gradients equal the
untiled MLP's, with the fused layer and PEFT's, under both kinds of recompute and with activation
offload (under LoRA dropout, those of the same tiles through plain autograd: the masks are drawn per
tile, and backward must draw the forward's again); parameter names are unchanged and the intermediates exist a tile at a time."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from testkit import layer_plan, load_tiny_base

from mistral_qlora.config import LoraSection
from mistral_qlora.model.lora import add_lora, decoder_layers
from mistral_qlora.model.tiling import TiledMLP

TOKENS = 80  # with tiles of 32 tokens: two full tiles and a short one


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 32000, (1, TOKENS), generator=torch.Generator().manual_seed(0))


class _PlainTiles(TiledMLP):
    """The reference under LoRA dropout: the same tiles through plain autograd, every tile's
    intermediates kept. Its dropout masks are drawn tile by tile in the same order as the tiled
    MLP's, which the untiled MLP's single draw over the whole row is not."""

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        return torch.cat([self.inner(flat[s:s + self.tile]) for s in range(0, flat.shape[0], self.tile)]).view_as(x)


def _model(fused: bool, tile: int, reentrant: bool = False, offload: bool = False, dropout: float = 0.0,
           plain_tiles: bool = False):
    torch.manual_seed(0)
    plan = dataclasses.replace(layer_plan(recompute=3, fused=fused), reentrant=reentrant, offload=offload,
                               mlp_tile=0 if plain_tiles else tile)
    model = add_lora(load_tiny_base(), LoraSection(r=4, dropout=dropout), plan)
    if plain_tiles:
        for layer in decoder_layers(model)[:3]:
            layer.mlp = _PlainTiles(layer.mlp, tile)
    for name, p in model.named_parameters():  # B starts at zero: give the adapter branch some weight
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    if offload:
        for layer in decoder_layers(model):
            if layer.gradient_checkpointing:
                layer._gradient_checkpointing_func.func.__self__.min_bytes = 0  # the tiny boundaries move too
    return model


def _loss_and_grads(model, ids):
    model.train()
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout draws
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


# The forward computes every token's MLP output from that token alone, so the loss is the same bit
# for bit. A LoRA weight's gradient is a sum over the row's tokens: tiled, it is summed tile by
# tile (float32 additions in another order), hence the tolerance of a few float32 ulps of its size.
def _assert_same(reference, tiled):
    loss, grads = reference
    loss_t, grads_t = tiled
    assert loss_t == loss
    assert grads_t.keys() == grads.keys()
    for name, g in grads.items():
        assert torch.allclose(grads_t[name], g, rtol=1e-5, atol=1e-7 * g.abs().max().item()), name
        assert not torch.equal(g, torch.zeros_like(g)), name


@pytest.mark.parametrize("fused,reentrant,offload,dropout", [
    (True, False, True, 0.0),
    (True, True, False, 0.1),
    (False, True, True, 0.1),
], ids=["fused-offload", "fused-reentrant-dropout", "peft-reentrant-offload-dropout"])
def test_tiled_mlp_gives_the_untiled_loss_and_lora_gradients(ids, fused, reentrant, offload, dropout):
    reference = _loss_and_grads(_model(fused, 32, reentrant, offload, dropout, plain_tiles=dropout > 0), ids)
    model = _model(fused, 32, reentrant, offload, dropout)
    tiled = [layer.mlp for layer in decoder_layers(model)]
    assert [isinstance(m, TiledMLP) for m in tiled] == [True, True, True, False]  # the recomputing layers only
    _assert_same(reference, _loss_and_grads(model, ids))
    _assert_same(reference, _loss_and_grads(model, ids))  # a second step: nothing carried over


def test_tiled_mlp_keeps_parameter_names_and_computes_one_tile_at_a_time(ids):
    plain = _model(True, 0)
    model = _model(True, 32)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert model.state_dict().keys() == plain.state_dict().keys()
    rows = []
    mlp = decoder_layers(model)[0].mlp
    handle = mlp.inner.gate_proj.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    _loss_and_grads(model, ids)
    handle.remove()
    # forward, the layer's recompute, then backward's pass: each 32 + 32 + 16 rows
    assert rows == [32, 32, 16] * 3
    fused = mlp.fused_linears
    assert len(fused) == 3 and all(m.keep != "run" and m._dequantized is None for m in fused)  # nothing held after
