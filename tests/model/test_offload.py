"""Activation offloading (model/offload.py) on the tiny model: the recomputing layers' inputs go
through the host and come back one layer ahead, and the loss and gradients are bit-identical."""

from __future__ import annotations

import pytest
import torch
from testkit import layer_plan

from mistral_qlora.config import LoraSection
from mistral_qlora.model.lora import add_lora, decoder_layers
from mistral_qlora.model.offload import BoundaryOffload


def _model(recompute: int, offload: bool, reentrant: bool, device: str = "cpu"):
    import dataclasses

    from transformers import AutoModelForCausalLM

    from mistral_qlora.model.base import resolve_model_path

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-random-mistral"), dtype=torch.float32).to(device)
    plan = dataclasses.replace(layer_plan(recompute=recompute), reentrant=reentrant, offload=offload)
    model = add_lora(base, LoraSection(r=4, dropout=0.1), plan)
    for name, p in model.named_parameters():  # B starts at zero: give the adapter branch some weight
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(device) * 0.02)
    return model


def _loss_and_grads(model, ids):
    model.train()
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout draws (CUDA's generator too)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _offload_of(model) -> BoundaryOffload | None:
    funcs = {getattr(getattr(layer._gradient_checkpointing_func, "func", None), "__self__", None)
             for layer in decoder_layers(model) if layer.gradient_checkpointing}
    assert len(funcs) == 1
    return next(iter(funcs))


@pytest.mark.parametrize("reentrant", [False, True])
def test_offloaded_boundaries_give_bit_identical_loss_and_grads(reentrant):
    ids = torch.randint(3, 32000, (1, 64), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(_model(3, offload=False, reentrant=reentrant), ids)
    model = _model(3, offload=True, reentrant=reentrant)
    offload = _offload_of(model)
    assert isinstance(offload, BoundaryOffload)
    offload.min_bytes = 0  # the tiny model's boundaries are small: move every one
    for step in (1, 2):  # a second micro-step starts a fresh list of boundaries
        loss_off, grads_off = _loss_and_grads(model, ids)
        assert loss_off == loss
        assert grads_off.keys() == grads.keys()
        for name, g in grads.items():
            assert torch.equal(g, grads_off[name]), name
        # three recomputing layers: three inputs out; in backward layer 2 fetches layer 1's input
        # ahead, and layer 1 layer 0's
        assert offload.packed == 3 * step
        assert offload.prefetched == 2 * step


def test_only_recomputing_layers_offload():
    model = _model(2, offload=True, reentrant=False)
    layers = decoder_layers(model)
    assert [layer.gradient_checkpointing for layer in layers] == [True, True, False, False]
    offload = _offload_of(model)
    assert isinstance(offload, BoundaryOffload)
    assert all(getattr(getattr(layer._gradient_checkpointing_func, "func", None), "__self__", None) is not offload
               for layer in layers[2:])
    assert _offload_of(_model(2, offload=False, reentrant=False)) is None


@pytest.mark.gpu
def test_offload_on_cuda_goes_through_pinned_host_memory_and_changes_nothing():
    """The CUDA path: inputs copied to pinned host buffers on the side stream and prefetched back;
    the loss and gradients equal the run that keeps them on the GPU."""
    ids = torch.randint(3, 32000, (1, 512), generator=torch.Generator().manual_seed(0)).cuda()
    loss, grads = _loss_and_grads(_model(3, offload=False, reentrant=False, device="cuda"), ids)
    model = _model(3, offload=True, reentrant=False, device="cuda")
    offload = _offload_of(model)
    offload.min_bytes = 0
    for step in (1, 2):
        loss_off, grads_off = _loss_and_grads(model, ids)
        torch.cuda.synchronize()
        assert loss_off == loss
        for name, g in grads.items():
            assert torch.equal(g, grads_off[name]), name
        assert offload.packed == 3 * step and offload.prefetched == 2 * step
