"""The fused-layer tests' pieces: a packed batch, the tiny 4-bit model with LoRA as a LayerPlan
says (B non-zero), and one forward and backward with fixed dropout draws."""

from __future__ import annotations

import torch

from mistral_qlora.config import LoraSection
from mistral_qlora.data.collator import PackedCollator
from mistral_qlora.model.lora import add_lora
from mistral_qlora.plan.layers import LayerPlan
from testkit import load_tiny_base


def packed_batch():
    """One packed row of three random records (200, 90 and 150 tokens, a third of each a prompt)."""
    gen = torch.Generator().manual_seed(0)
    examples = []
    for n in (200, 90, 150):
        ids = [1] + torch.randint(3, 32000, (n - 1,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return PackedCollator(with_cu_seqlens=False)([examples])


def lora_model(fused: bool, dropout: float, checkpoint_layers: int = 0, **levers):
    """The tiny 4-bit model with LoRA r=8: the first `checkpoint_layers` layers recompute; `levers`:
    LayerPlan fields (kept_for_run, keep_weights, shared_input_grad, ...)."""
    torch.manual_seed(0)
    base = load_tiny_base()
    plan = LayerPlan(lora_layer="fused" if fused else "peft", recompute=checkpoint_layers, **levers)
    model = add_lora(base, LoraSection(r=8, dropout=dropout), plan)
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():  # B starts at zero: give the adapter branch some weight
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def on(model, batch):
    device = next(model.parameters()).device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def loss_and_grads(model, batch):
    model.train()
    torch.manual_seed(5)  # the same dropout draws for both layers
    loss = model(**on(model, batch)).loss
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
