"""Training pieces the packing, eval and distributed tests share: the tiny model with non-zero LoRA,
random examples, and one SGD step through the Trainer with the run's TrainingArguments."""

from __future__ import annotations

import torch

from mistral_qlora.data.tokenize import IGNORE_INDEX
from testkit import layer_plan


def tiny_lora_model():
    """The tiny model in float32 with LoRA (no dropout) whose B matrices are non-zero."""
    from transformers import AutoModelForCausalLM

    from mistral_qlora.config import LoraSection
    from mistral_qlora.model.base import resolve_model_path
    from mistral_qlora.model.lora import add_lora

    path = resolve_model_path("tiny-random-mistral")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    torch.manual_seed(0)  # LoRA's A matrices come from the global generator
    model = add_lora(model, LoraSection(r=4, alpha=8, dropout=0.0), layer_plan())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def random_examples(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = [1] + torch.randint(3, 32000, (n - 1,), generator=gen).tolist()
        n_prompt = max(1, n // 3)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return out


def one_sgd_step(model, dataset, collator, micro_batch, grad_accum, out_dir, per_batch_means=False, **overrides):
    """One optimizer step with the TrainingArguments train.py builds, made SGD (lr 1, no clipping)
    so that the update is the gradient itself."""
    import dataclasses
    import os

    from transformers import Trainer

    from mistral_qlora.config import load_config
    from mistral_qlora.run.trainer import training_arguments
    from mistral_qlora.runtime import Runtime

    cfg = load_config(None, [f"output_dir={out_dir}", "train.max_steps=1", f"train.micro_batch_size={micro_batch}",
                             f"train.grad_accum={grad_accum}", "train.seed=0"])
    rt = Runtime("cpu", torch.float32, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                 int(os.environ.get("LOCAL_RANK", "0")))
    args = dataclasses.replace(
        training_arguments(cfg, rt, has_eval=False), optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, save_strategy="no",
        disable_tqdm=True, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    if per_batch_means:  # the control: each micro-batch's own mean, averaged over the accumulation
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss, weights
