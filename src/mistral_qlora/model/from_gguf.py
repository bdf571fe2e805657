"""A GGUF file (llama.cpp's format) as the base checkpoint: `model.name_or_path: path/to/model.gguf`.

transformers reads GGUF's quantized tensors and dequantizes them (`gguf_file=`); the result is
saved once as a transformers folder in the cache (model/builtin.py's `build_once`: built under a
temporary name and renamed, so ranks may race) and then loads like any local checkpoint, in 4-bit
NF4 for training like every other base. The folder's name carries the file's size and modification
time, so a replaced file is converted again.

The GGUF loader marks the model as quantized with "gguf", which `save_pretrained` refuses; the
tensors in hand are already dequantized, so the marker is dropped before saving. The weights are
saved in bfloat16: what a 4-bit base is made from, at half the disk of float32.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mistral_qlora.errors import UserError
from mistral_qlora.model import builtin


def gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return builtin.cache_root() / f"gguf-{path.stem}-{key}"


def convert_gguf(path: Path, directory: Path) -> None:
    """The GGUF file at `path`, dequantized, as a transformers folder (config, bf16 safetensors,
    tokenizer with its chat template) in `directory`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise UserError(f"model.name_or_path={str(path)!r}: transformers cannot read this GGUF file "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def ensure_gguf_checkpoint(path: Path) -> Path:
    """The transformers folder of the GGUF file at `path`, converted on first use."""
    return builtin.build_once(gguf_cache_dir(path), lambda directory: convert_gguf(path, directory))
