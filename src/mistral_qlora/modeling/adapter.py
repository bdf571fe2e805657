"""Saving the LoRA adapter from any strategy, and refusing to call an incomplete one saved.

Under ZeRO-3 every rank holds only a slice of each LoRA tensor; a plain `save_pretrained` writes
empty (shape 0) tensors, which is how the anchors' users ended up with "empty adapters". Here the
adapter tensors alone (not the 4-bit base) are gathered for the save, and the file written is read
back and checked against the shapes the model says it has: a missing, empty or misshapen tensor
stops the run with an error instead of leaving a useless adapter behind.
"""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTER_FILE = "adapter_model.safetensors"


def _adapter_key(param_name: str, adapter_name: str = "default") -> str:
    """A PeftModel parameter name as PEFT writes it (the adapter name dropped)."""
    return param_name.replace(f".{adapter_name}.", ".")


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
