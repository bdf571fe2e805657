"""The model a run trains, built from its plan: what `train` and `bench` both call.

The base in 4-bit (or straight into ZeRO-3 partitions), the chosen attention backend and
kernels, then LoRA as the plan's `LayerPlan` says, from the same seed on every rank and rerun.
"""

from __future__ import annotations

import torch

from mistral_qlora.config import RunConfig
from mistral_qlora.model.base import keep_4bit_layout, load_base_model
from mistral_qlora.model.liger import apply_kernels
from mistral_qlora.model.lora import add_lora
from mistral_qlora.plan import Plan
from mistral_qlora.runtime import Runtime


def build_model(cfg: RunConfig, plan: Plan, rt: Runtime, model_path: str, model_config, pad_token_id: int,
                hf_ds_config=None):
    """(PeftModel, ZeRO-3 LoadStats or None). `hf_ds_config`: TrainingArguments'
    hf_deepspeed_config, which a ZeRO-3 plan loads into (created before the model: it starts the
    process group the partitions live in)."""
    from transformers import set_seed

    load_stats = None
    if plan.zero3:
        from mistral_qlora.model.zero3 import load_base_model_zero3

        model, load_stats = load_base_model_zero3(model_path, model_config, cfg.model.revision, cfg.quantization,
                                                  plan.attention, rt.dtype, rt.torch_device, hf_ds_config)
    else:
        device_map = {"": rt.local_rank} if rt.device == "cuda" else None
        model = load_base_model(model_path, model_config, cfg.model.revision, cfg.quantization, plan.attention,
                                rt.dtype, device_map=device_map)
    if rt.device == "cpu" and cfg.quantization.bits == 4:
        keep_4bit_layout(model)
    apply_kernels(model, plan.kernels, plan.fused_loss)  # before LoRA wraps the linears
    set_seed(cfg.train.seed)  # every rank, strategy and rerun starts from the same adapter
    model = add_lora(model, cfg.lora, plan.layers)
    # Mistral ships no pad token; the tokenizer's stand-in (<unk>) is told to the model up front.
    model.config.pad_token_id = model.generation_config.pad_token_id = pad_token_id
    if plan.zero3 and rt.dtype != torch.float32:
        # DeepSpeed keeps fp32 master weights and casts the module to bf16 itself, except for a model
        # ZeRO-3 built (ours): do it for the adapter, which PEFT created in fp32.
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(rt.dtype)
    return model, load_stats
