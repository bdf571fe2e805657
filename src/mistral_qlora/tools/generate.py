"""`mistral-qlora generate`: greedy answers from a trained adapter (its base from
adapter_config.json) or from a plain or merged model."""

from __future__ import annotations

from pathlib import Path

import torch

from mistral_qlora.config import ModelSection, QuantizationSection
from mistral_qlora.errors import UserError
from mistral_qlora.model.adapter import adapter_base, attach_adapter
from mistral_qlora.model.base import load_base_model, load_model_config, resolve_model_path
from mistral_qlora.model.tokenizer import load_tokenizer
from mistral_qlora.runtime import resolve_dtype


def run_template(adapter: str | None) -> str:
    """The data.template of the run an adapter came from (its run folder's config.yaml), else auto."""
    import yaml

    config = Path(adapter).parent / "config.yaml" if adapter else None
    if config is None or not config.is_file():
        return "auto"
    try:
        raw = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError:
        return "auto"
    data = raw.get("data") if isinstance(raw, dict) else None
    return data.get("template", "auto") if isinstance(data, dict) else "auto"


def load_for_generation(adapter: str | None, model: str | None, bits: int = 4):
    """(model, tokenizer): the base in 4 or 16 bits, with the adapter attached if one is given."""
    if adapter is None and model is None:
        raise UserError("generate: give --adapter DIR (a trained adapter) or --model NAME_OR_PATH")
    base = model or adapter_base(adapter)
    path = resolve_model_path(base)
    has_tokenizer = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter if has_tokenizer else path)
    device_map = {"": 0} if torch.cuda.is_available() else None
    model_cfg = ModelSection(name_or_path=base)
    net = load_base_model(path, load_model_config(path, model_cfg), None, QuantizationSection(bits=bits), "sdpa",
                          resolve_dtype("auto"), device_map=device_map)
    if adapter is not None:
        net = attach_adapter(net, adapter, base)
    net.config.use_cache = True
    return net, tokenizer
