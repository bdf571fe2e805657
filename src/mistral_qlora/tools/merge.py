"""`mistral-qlora merge`: fold a LoRA adapter into a 16-bit copy of its base and save it.

The base is loaded in 16-bit (never merged into 4-bit weights, which would round the merge back
onto the 4-bit grid), merged with PEFT's `merge_and_unload`, and saved as safetensors shards with
the tokenizer and a model card (README.md, from the adapter's run folder when it sits in one:
run/model_card.py). The result is written into a staging folder and renamed into place. `load_merged` is the step
`export` shares (tools/export.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from mistral_qlora.errors import UserError
from mistral_qlora.files import set_usual_modes
from mistral_qlora.model.adapter import adapter_base, adapter_rope_scaling, attach_adapter
from mistral_qlora.model.base import apply_rope_scaling, resolve_model_path
from mistral_qlora.model.tokenizer import load_tokenizer
from mistral_qlora.run.model_card import write_model_card
from mistral_qlora.runtime import log

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_base(adapter: str, model: str | None = None) -> tuple[str, str]:
    """(base name, local path or hub id) of the base an adapter is merged into: `model`, else the
    one its adapter_config.json names; one line when that base is not here."""
    base_name = model or adapter_base(adapter)
    try:
        path = resolve_model_path(base_name)
    except UserError as exc:
        reason = str(exc).split(": ", 1)[-1]  # without resolve_model_path's "model.name_or_path=...:"
        raise UserError(f"adapter {adapter}: its base model {base_name!r} is not here: {reason}; pass --model "
                        "with the base it was trained on") from None
    return base_name, path


def load_merged(adapter: str, dtype: str = "bf16", model: str | None = None):
    """The base in 16 bits (or fp32) with the adapter folded in, and the folder (or hub id) of the
    base: (merged model, base path)."""
    from transformers import AutoModelForCausalLM

    base_name, path = resolve_base(adapter, model)
    extra = {}
    rope_scaling = adapter_rope_scaling(adapter)
    if rope_scaling is not None:  # the scaling it was trained under: in the merged config.json too
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        log(apply_rope_scaling(config, rope_scaling, where=f"adapter {adapter}: rope_scaling"))
        extra["config"] = config
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **extra)
    except OSError as exc:
        raise UserError(f"adapter {adapter}: cannot load its base model {base_name!r}: "
                        f"{str(exc).splitlines()[0]}; pass --model with the base it was trained on") from None
    return attach_adapter(base, adapter, base_name).merge_and_unload(), path


def merge_adapter(adapter: str, output: str, dtype: str = "bf16", model: str | None = None,
                  max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    """Write the merged model to the folder `output`. An existing non-empty folder is refused
    unless `overwrite`; then it is replaced whole, and only once the new model is complete beside it
    (a failure before that leaves it as it was)."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {output}: exists and is not a folder; choose a new folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--output {output}: folder exists and is not empty; choose a new folder or pass "
                        "--overwrite to replace it")
    merged, path = load_merged(adapter, dtype, model)
    tokenizer_src = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else path
    tokenizer = load_tokenizer(str(tokenizer_src))

    staging = out.parent / f".{out.name}.staging"
    old = out.parent / f".{out.name}.replaced"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.save_pretrained(str(staging), safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(staging))
        write_model_card(staging, "merged", Path(adapter), model or adapter_base(adapter), path)
        set_usual_modes(staging)
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)  # moved aside, not yet deleted: the rename below is the switch
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out
