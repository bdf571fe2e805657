"""The 4-bit base loaded straight into DeepSpeed ZeRO-3 partitions: no rank ever holds it whole.

transformers does not use `deepspeed.zero.Init` for quantized models (its loader tests
`is_deepspeed_zero3_enabled() and not is_quantized`): every rank would load the whole 4-bit model
and DeepSpeed would partition it only when the engine starts. This loader instead builds the model
on the meta device and then materialises one block at a time - the embeddings, each decoder
layer, the final norm, the lm_head: it reads the block's tensors from the safetensors files,
quantizes its linear weights with bitsandbytes (NF4/FP4, `bnb_4bit_quant_storage` = the model
dtype so DeepSpeed can partition and gather the packed bytes like any other weight), and
partitions the block with `deepspeed.zero.Init(module=block)` before reading the next. A rank
holds at most one whole block plus its share of the rest (`LoadStats` records both).

The model that comes out is what `from_pretrained(..., quantization_config=...)` returns, with its
parameters already ZeRO-3 parameters; the Trainer's DeepSpeed engine adopts them as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mistral_qlora.config import QuantizationSection
from mistral_qlora.errors import UserError
from mistral_qlora.model.attention import implementation
from mistral_qlora.model.base import bnb_config


@dataclass
class LoadStats:
    blocks: int = 0
    total_numel: int = 0  # elements of the whole base as stored (packed 4-bit bytes count as storage elements)
    largest_block_numel: int = 0  # the most any rank held unpartitioned at one time
    block_names: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"ZeRO-3: the base loaded block by block into partitions ({self.blocks} blocks); "
                f"the most this rank held whole at once: one block of {self.largest_block_numel:,} "
                f"of the base's {self.total_numel:,} elements")


def checkpoint_files(path: str, revision: str | None) -> dict[str, Path]:
    """Tensor name -> safetensors file, for a local folder or a hub id (from the local cache or the hub)."""
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise UserError(f"model.name_or_path={path!r}: ZeRO-3 loading reads safetensors weights, and the folder has none "
                    "(model.safetensors or model.safetensors.index.json)")


class _Reader:
    """Reads tensors by name, keeping one safetensors file open at a time."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._open = None
        self._open_path = None

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files.get(name)
        if path is None:
            raise UserError(f"the checkpoint has no tensor {name!r} (is it a Mistral-architecture checkpoint?)")
        if path != self._open_path:
            self._open = safe_open(str(path), framework="pt")
            self._open_path = path
        return self._open.get_tensor(name)


def _blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """The units loaded and partitioned one at a time: each decoder layer, and every other module
    that owns parameters directly (embeddings, final norm, lm_head)."""
    layers = model.get_decoder().layers
    layer_ids = {id(layer) for layer in layers}
    blocks, inside = [], set()
    for name, module in model.named_modules():
        if id(module) in layer_ids:
            blocks.append((name, module))
            inside.update(id(m) for m in module.modules())
        elif id(module) not in inside and any(True for _ in module.parameters(recurse=False)):
            blocks.append((name, module))
    return blocks


def _replace_linears_4bit(model, quant_cfg: QuantizationSection, dtype: torch.dtype, storage: torch.dtype) -> None:
    """Swap every decoder nn.Linear for a bitsandbytes Linear4bit on the meta device (lm_head stays)."""
    import bitsandbytes as bnb

    for layer in model.get_decoder().layers:
        for name, child in list(layer.named_modules()):
            for attr, sub in list(child.named_children()):
                if type(sub) is torch.nn.Linear:
                    new = bnb.nn.Linear4bit(
                        sub.in_features, sub.out_features, bias=sub.bias is not None, compute_dtype=dtype,
                        compress_statistics=quant_cfg.double_quant, quant_type=quant_cfg.quant_type,
                        quant_storage=storage, device="meta",
                    )
                    new.requires_grad_(False)
                    setattr(child, attr, new)


def _materialise(block, prefix: str, reader: _Reader, dtype: torch.dtype, device: torch.device) -> int:
    """Fill the block's parameters from the checkpoint on `device`; return the elements now held."""
    import bitsandbytes as bnb

    held = 0
    for module_name, module in block.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            key = ".".join(p for p in (prefix, module_name, pname) if p)
            value = reader.get(key).to(dtype)
            if isinstance(param, bnb.nn.Params4bit):
                # quantized on the move to `device`, as transformers' own bnb loader does
                new = bnb.nn.Params4bit(value, requires_grad=False, **param.__dict__).to(device)
            else:
                new = torch.nn.Parameter(value.to(device), requires_grad=False)
            setattr(module, pname, new)
            held += new.numel()
    return held


def _rebuild_meta_buffers(model, device: torch.device) -> None:
    """Non-persistent buffers (the rotary frequencies) are computed, not stored: recompute them."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            config = getattr(module, "config", None)
            if config is None:
                raise RuntimeError(f"cannot rebuild the buffers of {name} ({type(module).__name__}) after a meta-device build")
            fresh = type(module)(config).to(device)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh)


def fill_hidden_size_autos(hf_ds_config, hidden: int) -> None:
    """The DeepSpeed values the Trainer would fill from the hidden size when its engine starts,
    needed now by `deepspeed.zero.Init` (`hf_ds_config`: TrainingArguments.hf_deepspeed_config)."""
    hf_ds_config.fill_only("zero_optimization.reduce_bucket_size", hidden * hidden)
    hf_ds_config.fill_only("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
    hf_ds_config.fill_only("zero_optimization.stage3_param_persistence_threshold", 10 * hidden)


def load_base_model_zero3(path: str, model_config, revision: str | None, quant_cfg: QuantizationSection,
                          attention: str, dtype: torch.dtype, device: torch.device, hf_ds_config):
    """(model, LoadStats): the base model with every parameter already a ZeRO-3 partition.
    `hf_ds_config`: TrainingArguments.hf_deepspeed_config (its process group must exist)."""
    import copy

    import deepspeed
    from transformers import AutoModelForCausalLM, GenerationConfig

    fill_hidden_size_autos(hf_ds_config, model_config.hidden_size)
    ds_config = hf_ds_config.config
    config = copy.deepcopy(model_config)
    if getattr(config, "tie_word_embeddings", False):
        raise UserError("ZeRO-3 loading supports untied embeddings (as in every Mistral checkpoint); this one ties them")
    # The class itself, not from_config: that would wrap construction in its own zero.Init.
    config._attn_implementation = implementation(attention)
    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM._model_mapping[type(config)](config)
    # ZeRO-3 partitions and gathers the packed 4-bit bytes as tensors of the model dtype
    quantization = bnb_config(quant_cfg, dtype, storage=dtype)
    if quantization is not None:
        _replace_linears_4bit(model, quant_cfg, dtype, storage=dtype)
    _rebuild_meta_buffers(model, device)

    if not deepspeed.comm.is_initialized():
        # the process group exists (TrainingArguments started it); DeepSpeed adopts it
        deepspeed.init_distributed()
    reader = _Reader(checkpoint_files(path, revision))
    stats = LoadStats()
    for name, block in _blocks(model):
        held = _materialise(block, name, reader, dtype, device)
        deepspeed.zero.Init(module=block, config_dict_or_path=ds_config, mem_efficient_linear=False)
        stats.blocks += 1
        stats.total_numel += held
        stats.largest_block_numel = max(stats.largest_block_numel, held)
        stats.block_names.append(name)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"parameters left unloaded: {leftover[:5]}")

    if quantization is not None:
        from transformers.quantizers import AutoHfQuantizer

        model.config.quantization_config = quantization
        model.hf_quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=False)
        model.is_quantized = True
        model.is_loaded_in_4bit = True
        model.quantization_method = "bitsandbytes"
        model.config._is_quantized = True
    try:
        model.generation_config = GenerationConfig.from_pretrained(path, revision=revision)
    except OSError:
        pass
    model.eval()
    return model, stats

