"""The base checkpoint: where it comes from, its config, and its weights in 4-bit NF4 (bitsandbytes).

`model.name_or_path` is the embedded tiny model, `random:mistral-7b`, a local folder, a GGUF file or
a hub id (model/builtin.py builds the first two once into the cache folder, model/from_gguf.py
converts a GGUF file there once; a hub id is left for transformers, which reads it from the local
cache or the hub).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mistral_qlora.config import TINY_MODEL, ModelSection, QuantizationSection
from mistral_qlora.errors import UserError
from mistral_qlora.model import builtin
from mistral_qlora.model.attention import implementation
from mistral_qlora.runtime import log


def resolve_model_path(name_or_path: str, random_dir: str | None = None) -> str:
    """A local folder, a built-in model's cache folder (`random_dir`: where random:mistral-7b is
    built instead), a GGUF file's converted folder, or a hub id left for transformers."""
    if name_or_path == TINY_MODEL:
        return str(builtin.ensure_tiny_model())
    if name_or_path == builtin.TINY_TEKKEN:
        return str(builtin.ensure_tiny_tekken_model())
    if name_or_path.startswith("random:"):
        if name_or_path != builtin.RANDOM_7B:
            raise UserError(f"model.name_or_path={name_or_path!r}: the random architecture known here is "
                            f"{builtin.RANDOM_7B!r}")
        return str(builtin.ensure_random_7b(random_dir))
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        from mistral_qlora.model.from_gguf import ensure_gguf_checkpoint

        return str(ensure_gguf_checkpoint(p))
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


def apply_rope_scaling(config, rope_scaling: dict, where: str = "model.rope_scaling") -> str:
    """Write `rope_scaling` ({type|rope_type, factor, ...}) into the checkpoint's config, on top of
    its own RoPE parameters (rope_theta kept), as transformers' config reads it (`rope_parameters`,
    `rope_scaling` in older versions), validated by transformers; returns the line to log."""
    scaling = {("rope_type" if k == "type" else k): v for k, v in rope_scaling.items()}
    field = "rope_parameters" if hasattr(config, "rope_parameters") else "rope_scaling"
    own = dict(getattr(config, field, None) or {})
    if field == "rope_parameters":
        for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                    "mscale", "mscale_all_dim", "truncate"):
            own.pop(key, None)  # the checkpoint's own scaling, replaced whole
    params = {**own, **scaling}
    setattr(config, field, params)
    try:
        if hasattr(config, "standardize_rope_params"):
            config.standardize_rope_params()
        if hasattr(config, "validate_rope"):
            config.validate_rope()
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{where}={rope_scaling}: transformers refuses it: {str(exc).splitlines()[0]}") from None
    return (f"{where}: {params['rope_type']} x{params['factor']:g} RoPE scaling over the checkpoint's "
            f"{getattr(config, 'max_position_embeddings', '?')} positions ({field}={getattr(config, field)})")


def load_model_config(path: str, model_cfg: ModelSection):
    """The checkpoint's config with the run's overrides (sliding window, RoPE scaling) applied."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, revision=model_cfg.revision)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.name_or_path={path!r}: cannot load its config: {str(exc).splitlines()[0]}") from None
    if model_cfg.sliding_window != "auto":
        # An architecture without a window (Llama's config has no sliding_window) attends to
        # everything: a window asked of it could not be kept, "none" already is.
        if not hasattr(config, "sliding_window"):
            if model_cfg.sliding_window is not None:
                raise UserError(f"model.sliding_window={model_cfg.sliding_window}: {path} ({config.model_type}) has "
                                "no sliding window; set model.sliding_window to auto or null")
        else:
            config.sliding_window = model_cfg.sliding_window
    if model_cfg.rope_scaling is not None:
        log(apply_rope_scaling(config, model_cfg.rope_scaling))
    config.use_cache = False
    return config


def bnb_config(quant_cfg: QuantizationSection, dtype: torch.dtype, storage: torch.dtype = torch.uint8):
    """transformers' BitsAndBytesConfig for `quantization` (None for a 16-bit base). `storage`:
    the dtype the packed 4-bit bytes are held in (ZeRO-3 partitions them as the model dtype)."""
    from transformers import BitsAndBytesConfig

    if quant_cfg.bits != 4:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.quant_type,
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=storage,
    )


def load_base_model(path: str, model_config, revision: str | None, quant_cfg: QuantizationSection, attention: str,
                    dtype: torch.dtype, device_map=None):
    """The checkpoint's weights, quantized to 4-bit while they load (a 16-bit base with bits: 16)."""
    from transformers import AutoModelForCausalLM

    quantization = bnb_config(quant_cfg, dtype)
    return AutoModelForCausalLM.from_pretrained(
        path,
        config=copy.deepcopy(model_config),  # transformers writes into the config it is given
        revision=revision,
        dtype=dtype,
        attn_implementation=implementation(attention),
        device_map=device_map,
        **({"quantization_config": quantization} if quantization is not None else {}),
    )


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
