"""Activation recompute and the fused layer's levers on the tiny model: recomputing any number of layers
gives the same gradients, and the levers switched off and back give the plan's layers again."""

from __future__ import annotations

import pytest
import torch
from testkit import layer_plan, load_tiny_base

from mistral_qlora.config import LoraSection


def test_partial_checkpointing_is_exact():
    from transformers import AutoModelForCausalLM

    from mistral_qlora.model.base import resolve_model_path
    from mistral_qlora.model.lora import add_lora

    path = resolve_model_path("tiny-random-mistral")
    ids = torch.randint(3, 32000, (1, 96), generator=torch.Generator().manual_seed(0))
    grads = {}
    for k in (0, 2, 4):
        torch.manual_seed(0)
        model = add_lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                         LoraSection(r=4, dropout=0.0), layer_plan(recompute=k))
        layers = model.get_base_model().model.layers
        assert [layer.gradient_checkpointing for layer in layers] == [i < k for i in range(4)]
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[k] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for k in (2, 4):
        for name, g in grads[0].items():
            assert torch.allclose(g, grads[k][name], atol=1e-6, rtol=1e-5), (k, name)


def _tiny_fused_model(plan):
    from mistral_qlora.model.lora import add_lora

    return add_lora(load_tiny_base(), LoraSection(r=4, dropout=0.0), plan)


def test_levers_switched_off_and_back_to_the_plan():
    """`bench --compare` applies the plan with a lever off, and the plan again, through the one
    function that configures the fused layers (model/lora.py)."""
    import dataclasses

    from mistral_qlora.bench.levers import LEVERS
    from mistral_qlora.kernels.fused_lora import FusedLoraLinear4bit
    from mistral_qlora.model.lora import configure_fused_layers

    plan = layer_plan(recompute=1, fused=True, kept_for_run=2)
    model = _tiny_fused_model(plan)
    fused = [m for m in model.modules() if isinstance(m, FusedLoraLinear4bit)]

    def grouping():  # which linears share an input-gradient buffer, as labels
        ids = {}
        return [ids.setdefault(id(m.input_group), len(ids)) if m.input_group else None for m in fused]

    def without(*levers):
        changes = {}
        for lever in levers:
            changes.update(LEVERS[lever][1])
        configure_fused_layers(model, dataclasses.replace(plan, **changes))

    keeps, groups = [m.keep for m in fused], grouping()
    assert keeps == ["backward"] * 7 + ["none"] * 7 + ["run"] * 14  # layer 0 recomputes, layers 2-3 keep for the run
    assert groups.count(None) == 2 * 4 and len(set(groups) - {None}) == 2 * 4  # q/k/v and gate/up of 4 layers
    cached = next(m for m in fused if m.keep == "run")
    cached.dequantized_weight(torch.float32)
    without("cached-weights")
    assert [m.keep for m in fused] == ["none" if k == "none" else "backward" for k in keeps]
    assert cached._dequantized is None  # the copy is freed
    assert all(m.product_first for m in fused) and grouping() == groups
    without("kept-weights", "shared-input-grad", "product-first")
    assert not any(m.keep != "none" or m.input_group or m.product_first for m in fused)
    configure_fused_layers(model, plan)
    assert [m.keep for m in fused] == keeps and grouping() == groups and all(m.product_first for m in fused)
    with pytest.raises(ValueError):
        fused[0].configure(keep="always")
