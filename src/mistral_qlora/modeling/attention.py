"""Attention backend selection: `model.attention` -> the `attn_implementation` transformers uses.

`auto` takes the fastest usable backend: flash-attn's `flash_attention_2` where the package
imports and a GPU is present, else FlexAttention on CUDA, else SDPA. Every backend sees packed
rows through `position_ids` (block-diagonal masks) or `cu_seq_lens_*` (flash-style kernels).
"""

from __future__ import annotations

import importlib.util

from mistral_qlora.errors import UserError

# config name -> transformers attn_implementation
IMPLEMENTATION = {
    "flash_attention_2": "flash_attention_2",
    "flex": "flex_attention",
    "sdpa": "sdpa",
    "eager": "eager",
}
# Backends that read cu_seq_lens_* from the batch instead of building a mask.
TAKES_CU_SEQLENS = {"flash_attention_2"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def usable_backends() -> dict[str, str | None]:
    """Each backend -> None when usable here, else why not."""
    cuda = _cuda()
    return {
        "flash_attention_2": None if cuda and importlib.util.find_spec("flash_attn") else
        ("needs the flash-attn package (pip install mistral-qlora[flash])" if cuda else "needs a CUDA GPU"),
        "flex": None if cuda else "needs a CUDA GPU (FlexAttention is compiled with Triton)",
        "sdpa": None,
        "eager": None,
    }


def select_attention(requested: str) -> str:
    """The config name of the backend to use; `auto` resolves to the fastest usable one."""
    usable = usable_backends()
    if requested == "auto":
        return next(name for name in ("flash_attention_2", "flex", "sdpa") if usable[name] is None)
    if requested not in usable:
        raise UserError(f"model.attention={requested!r} is not implemented here (choose from {', '.join(usable)})")
    if usable[requested] is not None:
        raise UserError(f"model.attention={requested}: {usable[requested]}; use model.attention=auto")
    return requested
