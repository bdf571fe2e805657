"""The base model in 4-bit (bitsandbytes NF4) with LoRA adapters (PEFT) and activation checkpointing."""

from __future__ import annotations

from pathlib import Path

import torch

from mistral_qlora.config import TINY_MODEL, LoraSection, ModelSection, QuantizationSection
from mistral_qlora.errors import UserError
from mistral_qlora.modeling.attention import implementation


def resolve_model_path(name_or_path: str) -> str:
    """A local folder, the embedded tiny model's cache folder, or a hub id left for transformers."""
    if name_or_path == TINY_MODEL:
        from mistral_qlora.modeling.tiny import ensure_tiny_model

        return str(ensure_tiny_model())
    if name_or_path.startswith("random:"):
        from mistral_qlora.modeling.random7b import RANDOM_7B, ensure_random_7b

        if name_or_path != RANDOM_7B:
            raise UserError(f"model.name_or_path={name_or_path!r}: the random architecture known here is {RANDOM_7B!r}")
        return str(ensure_random_7b())
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"model.name_or_path={name_or_path!r}: folder has no config.json (not a transformers checkpoint)")
        return str(p)
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") != 1:
        raise UserError(
            f"model.name_or_path={name_or_path!r}: no such folder, and not a hub id like "
            f"'mistralai/Mistral-7B-Instruct-v0.2' (or use {TINY_MODEL!r})"
        )
    return name_or_path


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def load_model_config(path: str, model_cfg: ModelSection):
    """The checkpoint's config with the run's overrides (sliding window) applied."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, revision=model_cfg.revision)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path={path!r}: cannot load its config: {str(exc).splitlines()[0]}") from None
    if model_cfg.sliding_window != "auto":
        config.sliding_window = model_cfg.sliding_window
    config.use_cache = False
    return config


def load_base_model(
    path: str,
    model_cfg: ModelSection,
    quant_cfg: QuantizationSection,
    attention: str,
    dtype: torch.dtype,
    device_map=None,
    quant_storage: torch.dtype = torch.uint8,
):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quant_cfg.bits == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_cfg.quant_type,
            bnb_4bit_use_double_quant=quant_cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=quant_storage,
        )
    return AutoModelForCausalLM.from_pretrained(
        path,
        config=load_model_config(path, model_cfg),
        revision=model_cfg.revision,
        dtype=dtype,
        attn_implementation=implementation(attention),
        device_map=device_map,
        **kwargs,
    )


def add_lora(model, lora_cfg: LoraSection, gradient_checkpointing: bool = True, reentrant: bool = False,
             checkpoint_layers: int | None = None, fused: bool = False):
    """Freeze the base, enable activation checkpointing (every layer, or the first
    `checkpoint_layers`), wrap with LoRA adapters: PEFT's layers, or with `fused` our
    `FusedLoraLinear4bit` on the 4-bit linears (see `fused_lora_plan`)."""
    from peft import LoraConfig, get_peft_model

    from mistral_qlora.modeling.speed import set_checkpointed_layers

    for p in model.parameters():
        p.requires_grad_(False)
    if checkpoint_layers is None:
        checkpoint_layers = model.config.num_hidden_layers if gradient_checkpointing else 0
    if checkpoint_layers > 0:
        set_checkpointed_layers(model, checkpoint_layers, reentrant)
        # Reentrant checkpointing only back-propagates into a block whose input requires grad.
        model.enable_input_require_grads()
    peft_config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if not fused:
        return get_peft_model(model, peft_config)
    from mistral_qlora.modeling.fused_lora import group_shared_inputs, register_fused_lora

    register_fused_lora(peft_config)
    model = get_peft_model(model, peft_config)
    group_shared_inputs(model)
    return model


def fused_lora_plan(lora_cfg: LoraSection, bits: int, zero3: bool) -> tuple[bool, str]:
    """(use the fused 4-bit LoRA layer, why) for this run."""
    if not lora_cfg.fused:
        return False, "lora.fused=false: PEFT's LoRA layers"
    if bits != 4:
        return False, "a 16-bit base: PEFT's LoRA layers (the fused layer is for 4-bit linears)"
    if zero3:
        return False, ("ZeRO-3: PEFT's LoRA layers (DeepSpeed gathers the partitioned 4-bit weights through "
                       "module hooks the fused layer would bypass)")
    return True, "the fused 4-bit LoRA layer (modeling/fused_lora.py)"


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, Linear4bit's first forward in eval mode without grad replaces
    `weight.data` by a differently shaped uint8 tensor and flags the quant state. Under ZeRO-3 that
    tensor is a gathered buffer DeepSpeed owns, so the swap corrupts the partition (and the save
    asserts); elsewhere it makes training numerics depend on whether an evaluation ran first.
    No effect on GPUs.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
