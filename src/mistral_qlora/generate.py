"""Greedy generation with the Mistral instruct template, from a model in memory or an adapter on disk."""

from __future__ import annotations

from pathlib import Path

import torch

from mistral_qlora.errors import UserError


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


def load_for_generation(adapter: str | None, model: str | None, bits: int = 4):
    """(model, tokenizer) from an adapter folder (its base from adapter_config.json) or a plain model."""
    from mistral_qlora.config import ModelSection, QuantizationSection
    from mistral_qlora.export import adapter_base, attach_adapter
    from mistral_qlora.modeling.model import load_base_model, resolve_dtype, resolve_model_path
    from mistral_qlora.modeling.tokenizer import load_tokenizer

    if adapter is None and model is None:
        raise UserError("generate: give --adapter DIR (a trained adapter) or --model NAME_OR_PATH")
    base = model or adapter_base(adapter)
    path = resolve_model_path(base)
    has_tokenizer = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter if has_tokenizer else path)
    device_map = {"": 0} if torch.cuda.is_available() else None
    net = load_base_model(path, ModelSection(name_or_path=base), QuantizationSection(bits=bits), "sdpa",
                          resolve_dtype("auto"), device_map=device_map)
    if adapter is not None:
        net = attach_adapter(net, adapter, base)
    net.config.use_cache = True
    return net, tokenizer
