"""Greedy answers from a model in memory, each prompt rendered by the chat template the data used."""

from __future__ import annotations

from typing import Sequence

import torch

from mistral_qlora.data.formats import Turn
from mistral_qlora.data.templates import ChatTemplate, resolve_template


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str | Sequence[Turn]], max_new_tokens: int = 48,
                     template: ChatTemplate | None = None) -> list[str]:
    """One answer per prompt: a string (one user message) or a Conversation (its system prompt and
    earlier turns as context; its last turn's prompt is the one answered). `template`: the run's
    (TrainingData.template); None resolves `auto` for the tokenizer. The answers are the decoded
    text of the new tokens, special tokens left out and whitespace kept."""
    if not prompts:
        return []
    template = template or resolve_template("auto", tokenizer)
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    answers = []
    for prompt in prompts:
        ids = template.generation_ids(prompt)
        input_ids = torch.tensor([ids], device=device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=template.stop_token_ids(),
        )
        # as decoded, whitespace kept: an answer of newlines alone is an answer, and readers show it
        answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    model.train(was_training)
    return answers
