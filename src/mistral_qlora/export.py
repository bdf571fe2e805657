"""`mistral-qlora merge`: fold a LoRA adapter into a 16-bit copy of its base and save it.

The base is loaded in 16-bit (never merged into 4-bit weights, which would round the merge back
onto the 4-bit grid), merged with PEFT's `merge_and_unload`, and saved as safetensors shards with
the tokenizer. The result is written into a staging folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mistral_qlora.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def adapter_base(adapter: str | Path) -> str:
    cfg_file = Path(adapter) / "adapter_config.json"
    if not cfg_file.is_file():
        raise UserError(f"{adapter}: no adapter_config.json (point --adapter at a run's adapter/ folder)")
    try:
        return json.loads(cfg_file.read_text())["base_model_name_or_path"]
    except (json.JSONDecodeError, KeyError):
        raise UserError(f"{cfg_file}: damaged adapter config (no base_model_name_or_path)") from None


def attach_adapter(base_model, adapter: str | Path, base_name: str):
    """PeftModel over `base_model`, or one line saying why the adapter does not fit this base."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base_model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()
        reason = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise UserError(
            f"adapter {adapter} does not fit base model {base_name!r}: {reason}; "
            "pass --model with the base it was trained on"
        ) from None


def merge_adapter(adapter: str, output: str, dtype: str = "bf16", model: str | None = None,
                  max_shard_size: str = "5GB") -> Path:
    from transformers import AutoModelForCausalLM

    from mistral_qlora.modeling.model import resolve_model_path
    from mistral_qlora.modeling.tokenizer import load_tokenizer

    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {output}: folder exists and is not empty; choose a new folder")
    base_name = model or adapter_base(adapter)
    path = resolve_model_path(base_name)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    merged = attach_adapter(base, adapter, base_name).merge_and_unload()
    tokenizer_src = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else path
    tokenizer = load_tokenizer(str(tokenizer_src))

    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(str(staging), safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(staging))
    if out.exists():
        out.rmdir()
    os.rename(staging, out)
    return out
