"""`mistral-qlora merge`: fold a LoRA adapter into a 16-bit copy of its base and save it.

The base is loaded in 16-bit (never merged into 4-bit weights, which would round the merge back
onto the 4-bit grid), merged with PEFT's `merge_and_unload`, and saved as safetensors shards with
the tokenizer. The result is written into a staging folder and renamed into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from mistral_qlora.errors import UserError
from mistral_qlora.model.adapter import adapter_base, attach_adapter
from mistral_qlora.model.base import resolve_model_path
from mistral_qlora.model.tokenizer import load_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def merge_adapter(adapter: str, output: str, dtype: str = "bf16", model: str | None = None,
                  max_shard_size: str = "5GB") -> Path:
    from transformers import AutoModelForCausalLM

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
