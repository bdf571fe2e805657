"""Greedy answers to prompts in the Mistral instruct template, from a model in memory."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    answers = []
    for prompt in prompts:
        ids = [tokenizer.bos_token_id] + tokenizer(f"[INST] {prompt} [/INST]", add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([ids], device=device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers
