"""Model FLOPs per token and model FLOPs utilisation (MFU), as the benchmark and the Trainer log it.

What a QLoRA step must compute for one token, recompute not counted (that would be hardware FLOPs):
- every frozen linear (the 4-bit base and the lm_head): forward and the gradient of its input,
  2 + 2 = 4 FLOPs per weight; no weight gradient;
- every LoRA weight: forward, input gradient and weight gradient, 6 FLOPs per weight;
- causal attention: QK^T and AV forward are 2 * 2 * ctx * (heads x head_dim) FLOPs for a token
  seeing ctx earlier tokens (ctx <= the sliding window), backward twice that. A token at position
  t of its sequence sees t + 1 tokens, so the mean over a set of sequences is taken from their
  lengths.
MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak (the table below, or
`train.peak_tflops`).
"""

from __future__ import annotations

# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s, from the vendors' data sheets. The
# first name found in the device name wins, so the more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("RTX A6000", 155.0),
)


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """FLOP/s of one GPU in bf16: the override, else the table's entry for this device, else None."""
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return tflops * 1e12
    return None


def decoder_linear_shapes(model_config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of one Mistral decoder layer."""
    c = model_config
    H, I = c.hidden_size, c.intermediate_size
    nh = c.num_attention_heads
    nkv = getattr(c, "num_key_value_heads", None) or nh
    hd = getattr(c, "head_dim", None) or H // nh
    return {
        "q_proj": (H, nh * hd), "k_proj": (H, nkv * hd), "v_proj": (H, nkv * hd), "o_proj": (nh * hd, H),
        "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H),
    }


# The decoder's linear layers: what bitsandbytes quantizes and what LoRA's all-linear targets
# (lm_head stays in 16-bit).
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_names(target_modules) -> set[str]:
    """The decoder linears `lora.target_modules` selects."""
    if target_modules == "all-linear":
        return set(DECODER_LINEARS)
    return {name for name in DECODER_LINEARS if any(t == name or t.endswith("." + name) for t in target_modules)}


def _mean_context(lengths: list[int], window: int | None) -> float:
    """Mean number of tokens a token attends to (itself included), over all tokens of the sequences."""
    total = tokens = 0
    for n in lengths:
        w = n if not window else min(window, n)
        # positions 0..w-1 see 1..w tokens, the remaining n - w see w each
        total += w * (w + 1) // 2 + (n - w) * w
        tokens += n
    return total / tokens if tokens else 0.0


def flops_per_token(model_config, lora_r: int, lora_targets: set[str], lengths: list[int],
                    trained_head: bool = False) -> float:
    """Model FLOPs for one trained token (see the module docstring). `trained_head`: lm_head trains
    in full (lora.modules_to_save), 6 FLOPs a weight instead of 4."""
    c = model_config
    H, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    nh = c.num_attention_heads
    hd = getattr(c, "head_dim", None) or H // nh
    shapes = decoder_linear_shapes(c)
    frozen = L * sum(i * o for i, o in shapes.values()) + V * H  # the lm_head too
    lora = L * sum(lora_r * (i + o) for name, (i, o) in shapes.items() if name in lora_targets)
    window = getattr(c, "sliding_window", None)
    attention = L * 3 * 4 * _mean_context(lengths, window) * nh * hd
    return 4 * frozen + 6 * lora + attention + (2 * V * H if trained_head else 0)


def mfu(tokens_per_second: float | None, per_token: float, peak: float | None, gpus: int = 1) -> float | None:
    if not tokens_per_second or not peak:
        return None
    return tokens_per_second * per_token / (peak * gpus)
