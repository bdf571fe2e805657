"""The adapter on disk: saved from any strategy, checked, published whole, and attached to a base.

- Save (`save_adapter`): under ZeRO-3 every rank holds only a slice of each LoRA tensor, and a
  plain `save_pretrained` writes empty (shape 0) tensors. Here the adapter tensors alone (not the
  4-bit base) are gathered for the save.
- Check (`check_adapter`): the file written is read back against the shapes the model says it
  has; a missing, empty or misshapen tensor stops the run instead of leaving a useless adapter.
- Publish (`publish_adapter`): saved and checked in a staging folder, then renamed to `adapter/`,
  so that folder is always whole; the base is recorded as the user named it.
- Attach (`attach_adapter`, `adapter_base`): a saved adapter onto its base, or one line saying why
  it does not fit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mistral_qlora.errors import UserError
from mistral_qlora.files import set_usual_modes, write_json
from mistral_qlora.runtime import barrier

ADAPTER_FILE = "adapter_model.safetensors"
BASE_OVERRIDES = "base_overrides.json"  # what the run changed in the base's config (model.rope_scaling)


def _adapter_key(param_name: str, adapter_name: str = "default") -> str:
    """A PeftModel parameter name as PEFT writes it: the adapter name dropped, a module trained in
    full (lora.modules_to_save) under its own name, DoRA's magnitude without `.weight`."""
    key = param_name.replace(f".modules_to_save.{adapter_name}.", ".").replace(f".{adapter_name}.", ".")
    return key.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")


def expected_adapter_shapes(model) -> dict[str, tuple[int, ...]]:
    """Saved tensor name -> full shape, for every trainable (LoRA) parameter of a PeftModel."""
    shapes = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            shapes[_adapter_key(name)] = shape
    return shapes


def check_adapter(folder: Path, expected: dict[str, tuple[int, ...]] | None = None) -> int:
    """Raise RuntimeError unless folder's adapter holds every expected tensor, non-empty and of
    its full shape (without `expected`: at least one tensor, none empty). Returns the tensor count."""
    from safetensors import safe_open

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise RuntimeError(f"adapter not saved: {path} is missing")
    with safe_open(str(path), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problems = [f"{k} is empty {v}" for k, v in saved.items() if 0 in v or len(v) == 0]
    if expected is not None:
        problems += [f"{k} is missing" for k in expected if k not in saved]
        problems += [f"{k} has shape {saved[k]}, expected {v}" for k, v in expected.items()
                     if k in saved and saved[k] != v]
    if not saved:
        problems.append("it holds no tensors")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RuntimeError(f"incomplete adapter in {folder}: " + "; ".join(problems[:3]) + more)
    return len(saved)


def save_adapter(model, tokenizer, folder: Path, zero3: bool, is_main: bool) -> None:
    """Called on every rank (ZeRO-3 gathers collectively); rank 0 writes. Checked after writing."""
    state_dict = None
    if zero3:
        import deepspeed

        lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in lora], modifier_rank=None):
            if is_main:
                state_dict = {n: p.detach().to("cpu", copy=True) for n, p in lora}
    if is_main:
        model.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
        check_adapter(folder, expected_adapter_shapes(model))


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / ADAPTER_FILE))


def record_base_model(adapter_dir: Path, name: str, rope_scaling: dict | None = None) -> None:
    """Name the base as the user did (tiny-random-mistral, a hub id), not by a cache path, so the
    adapter loads anywhere. Done after saving: PEFT looks the base up while it saves. The RoPE
    scaling the adapter was trained under (`model.rope_scaling`) goes into BASE_OVERRIDES beside
    it (PEFT's own config file takes no keys of ours), for merge and export to apply."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = name
    write_json(path, config)
    if rope_scaling is not None:
        write_json(Path(adapter_dir) / BASE_OVERRIDES, {"rope_scaling": rope_scaling})


def adapter_rope_scaling(adapter: str | Path) -> dict | None:
    """The `model.rope_scaling` an adapter was trained under, from its BASE_OVERRIDES (None: none)."""
    path = Path(adapter) / BASE_OVERRIDES
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["rope_scaling"]
    except (json.JSONDecodeError, KeyError):
        raise UserError(f"{path}: damaged (no rope_scaling); delete it if the adapter was trained without "
                        "RoPE scaling") from None


def publish_adapter(model, tokenizer, out: Path, base_name: str, zero3: bool, is_main: bool,
                    rope_scaling: dict | None = None) -> Path:
    """Save (every rank joins: ZeRO-3 gathers) and check the adapter in a staging folder, then
    rename it to `out/adapter`, so that folder is always whole."""
    staging, final = out / ".adapter-staging", out / "adapter"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    save_adapter(model, tokenizer, staging, zero3=zero3, is_main=is_main)
    if is_main:
        record_base_model(staging, base_name, rope_scaling)
        set_usual_modes(staging)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
    barrier()
    return final


def adapter_base(adapter: str | Path) -> str:
    """The base an adapter was trained on, as its adapter_config.json names it."""
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
