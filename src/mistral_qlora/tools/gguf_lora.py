"""A LoRA adapter alone as a GGUF file in llama.cpp's adapter format, applied over a base GGUF at
load time (`llama-cli -m BASE.gguf --lora A.gguf`, Ollama's `ADAPTER` line).

llama.cpp adds `scale * B (A x)` to each adapted matrix product, with scale = alpha / rank, alpha
from `adapter.lora.alpha` and the rank from the tensors. The tensors are PEFT's `lora_A`
(rank x in) as `blk.N.<name>.weight.lora_a` and `lora_B` (out x rank) as `...lora_b`, in F32.
Q and K are stored in the GGUF with their rows reordered for llama.cpp's rotary layout
(gguf_file.permute_rotary, a row permutation P): P (W + s B A) = P W + s (P B) A, so B's rows take
the same permutation and A stays as it is.

rsLoRA's scale alpha / sqrt(rank) is written as the alpha that gives it under llama.cpp's rule
(alpha * sqrt(rank)). What the format cannot carry is refused: modules trained in full
(`modules_to_save`), DoRA's magnitudes, trained biases, embedding LoRA, per-module ranks or
alphas (one alpha for the whole file), and a LoRA on an output matrix the base GGUF does not
have (tied embeddings).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from mistral_qlora.errors import UserError
from mistral_qlora.tools.gguf_file import Hyper, gguf_name, permute_rotary

_PREFIX = "base_model.model."


def _refuse(adapter: str, what: str) -> UserError:
    return UserError(f"export --format gguf-lora: adapter {adapter} has {what}, which llama.cpp's LoRA format cannot "
                     "carry; export the merged model with --format gguf instead")


def lora_alpha(adapter: str, config: dict) -> float:
    """The file's adapter.lora.alpha: llama.cpp scales by alpha / rank."""
    if config.get("use_dora"):
        raise _refuse(adapter, "DoRA magnitudes (use_dora)")
    if config.get("modules_to_save"):
        raise _refuse(adapter, f"modules trained in full (modules_to_save: {config['modules_to_save']})")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise _refuse(adapter, "per-module ranks or alphas (rank_pattern/alpha_pattern)")
    if config.get("bias", "none") != "none":
        raise _refuse(adapter, f"trained biases (bias: {config['bias']})")
    alpha, rank = float(config["lora_alpha"]), int(config["r"])
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def lora_tensors(adapter: str, tensors: dict, hyper: Hyper) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, F32 array) of every LoRA tensor, in llama.cpp's names and row order."""
    out = []
    for key in sorted(tensors):
        if ".lora_A." not in key and ".lora_B." not in key:
            what = "DoRA magnitudes" if "lora_magnitude" in key else "embedding LoRA" if "lora_embedding" in key \
                else f"a tensor {key} that is not a LoRA matrix"
            raise _refuse(adapter, what)
        module, which = key.removeprefix(_PREFIX).rsplit(".lora_", 1)
        hf_name = module + ".weight"
        if hf_name == "lm_head.weight" and hyper.tied:
            raise _refuse(adapter, "a LoRA on lm_head while the base ties it to the embeddings")
        try:
            name = gguf_name(hf_name)
        except UserError:
            raise _refuse(adapter, f"a LoRA on {module}, a module with no llama.cpp tensor") from None
        weight = tensors[key]
        if which.startswith("B"):
            if hf_name.endswith("q_proj.weight"):
                weight = permute_rotary(weight, hyper.heads)
            elif hf_name.endswith("k_proj.weight"):
                weight = permute_rotary(weight, hyper.kv_heads)
        suffix = "lora_a" if which.startswith("A") else "lora_b"
        out.append((f"{name}.{suffix}", weight.detach().float().cpu().numpy()))
    return out


def write_lora_gguf(path: Path, name: str, adapter: str, hyper: Hyper) -> None:
    """Write the adapter's GGUF at `path` (the caller renames it into place)."""
    import gguf

    from mistral_qlora.model.adapter import adapter_tensors

    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    alpha = lora_alpha(adapter, config)
    arrays = lora_tensors(adapter, adapter_tensors(Path(adapter)), hyper)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for tensor_name, array in arrays:
        writer.add_tensor(tensor_name, array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.fout[0].flush()
        os.fsync(writer.fout[0].fileno())
    finally:
        writer.close()
