"""A Mistral- or Llama-architecture model as one GGUF file for llama.cpp (and Ollama, LM Studio), written with
the `gguf` package that the llama.cpp project keeps.

Mistral v0.x is llama.cpp's `llama` architecture: the same blocks (RMSNorm, rotary attention with
grouped K/V heads, SwiGLU). What differs from a transformers checkpoint:
- tensor names: `model.layers.N.self_attn.q_proj.weight` -> `blk.N.attn_q.weight`, and so on;
- the rows of Q and K: transformers' rotary embedding rotates the two halves of each head
  (`rotate_half`: dimension i pairs with i + d/2), llama.cpp's `llama` rope rotates adjacent pairs
  (2i with 2i+1). `permute_rotary` reorders each head's rows from the first layout to the second,
  as llama.cpp's own converter does, so both compute the same attention scores;
- no sliding window: llama.cpp's `llama` architecture reads none and attends to the whole context
  (Mistral-7B v0.2 has none; v0.1's 4096-token window only matters past 4096 tokens).
Llama checkpoints (SmolLM, Llama-2, Llama-3.x) take the same path: `head_dim` other than
hidden/heads is written as the key/value lengths, and tied embeddings leave out `output.weight`
(llama.cpp then reads `token_embd` for the output). The file also carries the vocabulary
(tools/gguf_vocab.py) and the chat template the run trained with (tools/chat_format.py), so
llama.cpp needs nothing else.

Rope scaling (the config's `rope_parameters`, `rope_scaling` before transformers 5), as llama.cpp's
converter writes it for the `llama` architecture:
- `linear`: scaling type linear and the factor (llama.cpp divides positions by it);
- `yarn`: scaling type yarn, the factor, the original context length and whichever of the
  extrapolation factor, attention factor and beta fast/slow the config sets (llama.cpp's defaults
  are transformers' for the rest);
- `llama3`: no scaling keys but a `rope_freqs` tensor, one factor per rotary frequency that
  llama.cpp divides that frequency by: 1 above the high-frequency cutoff, `factor` below the
  low-frequency one, and between them the inverse of transformers' smooth interpolation
  (1 / ((1 - s) / factor + s)), so llama.cpp rotates by exactly transformers' frequencies.
  The original context length is the rope parameters' own, as transformers reads it.

Tensors are converted and written one at a time (header and tensor table first), so a 7B model
never holds a second full copy in memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mistral_qlora.errors import UserError
from mistral_qlora.tools.gguf_vocab import Vocab, header_bytes, write_vocab

# --type -> (GGML tensor type of the 2-D weights, GGUF general.file_type)
TYPES = {"f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}

# HF name (after "model.layers.N.") -> GGUF name (after "blk.N.")
_BLOCK_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}

@dataclass(frozen=True)
class Hyper:
    """The architecture numbers the GGUF header carries, from a transformers config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    rms_eps: float
    rope_theta: float
    vocab: int
    tied: bool
    # rope scaling: "default", "linear", "yarn" or "llama3", and its parameters (name, value), sorted
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_config(cls, config) -> Hyper:
        if config.model_type not in ("mistral", "llama"):
            raise UserError(f"export --format gguf: model type {config.model_type!r} is not supported "
                            "(Mistral/Llama-architecture checkpoints only)")
        if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "attention_bias", False):
            raise UserError("export --format gguf: only the plain Mistral block (SiLU, no attention bias) is supported")
        if getattr(config, "mlp_bias", False):
            raise UserError("export --format gguf: only the plain Llama/Mistral MLP (no bias) is supported")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope = rope.get("full_attention", rope)  # per-layer-type parameters: the full-attention layers'
        scaling = rope.get("rope_type", rope.get("type", "default"))
        if scaling not in ROPE_SCALING:
            raise UserError(f"export --format gguf: rope scaling {scaling!r} is not supported (supported: "
                            f"{', '.join(ROPE_SCALING)})")
        params = {k: float(rope[k]) for k in ROPE_SCALING[scaling] if rope.get(k) is not None}
        if scaling in ("yarn", "llama3") and "original_max_position_embeddings" not in params:
            params["original_max_position_embeddings"] = float(
                getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
        if scaling != "default" and "factor" not in params:
            raise UserError(f"export --format gguf: rope scaling {scaling!r} without a factor in the config's "
                            "rope_parameters; add it")
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
            heads=heads, kv_heads=config.num_key_value_heads or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            context=config.max_position_embeddings, rms_eps=config.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            vocab=config.vocab_size, tied=bool(config.tie_word_embeddings),
            rope_type=scaling, rope_scaling=tuple(sorted(params.items())),
        )

    def rope(self, name: str, default: float | None = None) -> float | None:
        return dict(self.rope_scaling).get(name, default)


# rope type -> the parameters the GGUF carries for it (llama.cpp's defaults stand for the others)
ROPE_SCALING = {
    "default": (),
    "linear": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "extrapolation_factor", "attention_factor",
             "beta_fast", "beta_slow"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
ROPE_FREQS = "rope_freqs.weight"


def llama3_rope_factors(hyper: Hyper) -> np.ndarray:
    """The `rope_freqs` tensor for llama3 rope scaling: per rotary frequency (head_dim / 2 of
    them), the factor llama.cpp divides it by to get the frequency transformers rotates by.
    Frequencies and wavelengths in float32, as transformers computes them."""
    factor = hyper.rope("factor")
    low, high = hyper.rope("low_freq_factor", 1.0), hyper.rope("high_freq_factor", 4.0)
    old_context = hyper.rope("original_max_position_embeddings")
    exponents = torch.arange(0, hyper.head_dim, 2, dtype=torch.int64).float() / hyper.head_dim
    wavelen = (2 * math.pi / (1.0 / (hyper.rope_theta ** exponents))).tolist()
    factors = []
    for w in wavelen:
        if w < old_context / high:  # high frequencies: kept
            factors.append(1.0)
        elif w > old_context / low:  # low frequencies: divided by factor
            factors.append(factor)
        else:  # between: transformers' smooth interpolation, as a divisor
            smooth = (old_context / w - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _BLOCK_NAMES:
        return f"blk.{parts[2]}.{_BLOCK_NAMES[parts[3]]}"
    raise UserError(f"export --format gguf: tensor {hf_name} has no GGUF name (not a plain Mistral checkpoint)")


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a Q or K projection (heads * head_dim, in) from transformers' rotate-half order to
    llama.cpp's adjacent pairs: within each head, row j of the first half and row j of the second
    half become rows 2j and 2j+1."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def ggml_type(qtype: str, shape: tuple[int, ...]):
    """The GGML type a tensor is stored as: 1-D tensors (norms) in F32, as llama.cpp keeps them;
    matrices in the chosen type (Q8_0 blocks run along rows of 32: a row length that does not
    divide falls back to F16)."""
    import gguf

    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    t = gguf.GGMLQuantizationType[TYPES[qtype][0]]
    block, _ = gguf.GGML_QUANT_SIZES[t]
    return t if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def tensor_nbytes(qtype: str, shape: tuple[int, ...]) -> int:
    import gguf

    t = ggml_type(qtype, shape)
    block, size = gguf.GGML_QUANT_SIZES[t]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def tensor_plan(state_shapes: dict[str, tuple[int, ...]], hyper: Hyper) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, GGUF name, shape) of every tensor the file holds, in writing order; llama3 rope
    scaling adds `rope_freqs` (computed, not the checkpoint's: ROPE_FREQS names it on both sides)."""
    plan = [(ROPE_FREQS, ROPE_FREQS, (hyper.head_dim // 2,))] if hyper.rope_type == "llama3" else []
    for name, shape in state_shapes.items():
        if name == "lm_head.weight" and hyper.tied:
            continue  # llama.cpp reuses token_embd when the file has no output.weight
        plan.append((name, gguf_name(name), tuple(shape)))
    return plan


def estimate_bytes(plan, qtype: str, vocab: Vocab) -> int:
    """The file's size: every tensor in its type, padded to the 32-byte alignment, plus the header
    (the vocabulary dominates it) with room to spare."""
    tensors = sum(tensor_nbytes(qtype, shape) + 32 for _, _, shape in plan)
    header = header_bytes(vocab) + 256 * len(plan) + (1 << 20)
    return tensors + header


def _as_array(weight: torch.Tensor, t) -> np.ndarray:
    import gguf

    data = weight.detach().to("cpu", torch.float32).numpy()
    if t == gguf.GGMLQuantizationType.F32:
        return data
    return gguf.quants.quantize(data, t)


def write_gguf(path: Path, name: str, hyper: Hyper, vocab: Vocab, tensors, plan, qtype: str,
               chat_template: str) -> None:
    """Write the file at `path` (the caller renames it into place). `tensors`: HF name -> tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType[TYPES[qtype][1]]))
    if qtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(hyper.vocab)
    writer.add_context_length(hyper.context)
    writer.add_embedding_length(hyper.hidden)
    writer.add_block_count(hyper.layers)
    writer.add_feed_forward_length(hyper.intermediate)
    writer.add_rope_dimension_count(hyper.head_dim)
    writer.add_head_count(hyper.heads)
    writer.add_head_count_kv(hyper.kv_heads)
    if hyper.head_dim * hyper.heads != hyper.hidden:
        writer.add_key_length(hyper.head_dim)
        writer.add_value_length(hyper.head_dim)
    writer.add_layer_norm_rms_eps(hyper.rms_eps)
    writer.add_rope_freq_base(hyper.rope_theta)
    if hyper.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hyper.rope("factor"))
    elif hyper.rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(hyper.rope("factor"))
        writer.add_rope_scaling_orig_ctx_len(int(hyper.rope("original_max_position_embeddings")))
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if hyper.rope(key) is not None:
                add(hyper.rope(key))

    write_vocab(writer, vocab)
    writer.add_chat_template(chat_template)

    for hf_name, out_name, shape in plan:
        t = ggml_type(qtype, shape)
        if t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if t == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(out_name, shape, np.dtype(dtype), tensor_nbytes(qtype, shape))
        else:  # stored as bytes: the writer takes the byte shape and turns it back into elements
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, t)
            writer.add_tensor_info(out_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=t)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf_name, _, shape in plan:
            if hf_name == ROPE_FREQS:
                writer.write_tensor_data(llama3_rope_factors(hyper))
                continue
            weight = tensors[hf_name]
            if hf_name.endswith("q_proj.weight"):
                weight = permute_rotary(weight, hyper.heads)
            elif hf_name.endswith("k_proj.weight"):
                weight = permute_rotary(weight, hyper.kv_heads)
            writer.write_tensor_data(_as_array(weight, ggml_type(qtype, shape)))
        writer.fout[0].flush()
        os.fsync(writer.fout[0].fileno())
    finally:
        writer.close()
