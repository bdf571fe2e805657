"""What one GPU needs for a run, estimated from the shapes alone (pure arithmetic, no torch).

The estimate behind every memory decision of the plan: `train.strategy=auto` (does the model fit
one GPU?), how many layers recompute in backward, and how many keep their dequantized weights.

Per token and decoder layer, a layer that recomputes in backward keeps only its input (H values)
and brings, while it recomputes, one layer's worth of activations. A layer that does not recompute
keeps, until its backward:
- on the fast path (the fused LoRA layer, Liger's RMSNorm and SwiGLU, a flash-style attention),
  what each op saves (`fast_path_layer_bytes`): each RMSNorm's input; attention's q, k, v and
  output; SwiGLU's gate and up outputs; each adapted linear's dropped input and dropout mask
  (dtype + 1 bytes a value) or, without dropout, its input, which q/k/v share, gate/up share and
  o_proj shares with attention's output. This counting matches measured peaks closely;
- with PEFT's layers, 16H + 4I values, a coarser rule (docs/benchmarks.md compares both with
  measured peaks).
Logits cost V values in the model dtype plus an fp32 copy and its gradient, unless the loss is
fused with the lm_head (Liger), which never materialises them whole: Liger's fused linear
cross-entropy computes, at the end of forward, the logits a chunk of next_pow2(ceil(T / ceil(V/H)))
tokens at a time (an eighth to a quarter of the row for Mistral-7B), turns each chunk into its
gradient in place and writes the input's gradient (T x H) for backward. That is a peak of its own
(`fused_loss_bytes`), counted against the recomputing layer's backward: the larger of the two.

With the MLP computed in sequence tiles in the recomputing layers (model/tiling.py, `mlp_tile`),
such a layer's recompute holds, instead of the MLP's saved set over the row (`mlp_token_bytes` a
token), the MLP's input and its gradient (T x H each) and one tile's saved set and gradients
(`tiled_layer_bytes`).

With activation offloading (model/offload.py) the recomputing layers' inputs wait in host memory:
the GPU holds at most two of them at a time (the one a layer recomputes from and the one fetched
ahead), the host holds all of them (`host_activations`).

A preference step (train.method dpo or orpo) holds no reference model (DPO's reference log-probs
are computed once before training, run/preference.py) and its row budget already holds both
records of each pair. Its head never goes through Liger's fused cross-entropy (that needs labels,
which the log-prob path does not pass): the head runs on the scored positions only and keeps their
logits in the model dtype for backward (forward keeps one log-sum-exp a token; backward writes the
logits' gradient a chunk at a time), so it costs in backward the kept logits and their gradient,
each K x V in the model dtype (K scored tokens, at most the row's T), plus one chunk's float32
buffers (`preference_logits_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mistral_qlora.config import PREFERENCE_METHODS, RunConfig
from mistral_qlora.flops import decoder_linear_shapes, lora_target_names

GIB = 2**30
ZERO3 = ("zero3", "zero3_offload")
LOGSOFTMAX_CHUNK = 1024  # tokens per float32 log-softmax of the preference log-prob path


@dataclass
class MemoryEstimate:
    """Bytes one GPU needs, by part, for the whole (unpartitioned) run."""

    base: int  # the 4-bit linears plus the 16-bit embeddings, lm_head and norms
    largest_layer: int  # one decoder layer's weights (what ZeRO-3 gathers at a time)
    lora: int  # adapter weights (fp32)
    lora_grads_and_optimizer: int  # their gradients and AdamW moments (fp32)
    activations: int  # saved activations, one layer's recompute, logits and their gradient
    tokens_per_micro_batch: int
    host_activations: int = 0  # the recomputing layers' inputs held in host memory (offload)

    def per_gpu(self, strategy: str, world_size: int = 1) -> int:
        n = max(1, world_size)
        trainable = self.lora + self.lora_grads_and_optimizer
        if strategy in ("single", "ddp"):
            return self.base + trainable + self.activations
        if strategy == "zero2":
            return self.base + self.lora + self.lora_grads_and_optimizer // n + self.activations
        if strategy == "zero3":
            return (self.base + trainable) // n + 2 * self.largest_layer + self.activations
        if strategy == "zero3_offload":
            return 2 * self.largest_layer + self.activations
        raise ValueError(strategy)


def recompute_layers_for(setting, num_layers: int) -> int | None:
    """Layers that recompute for an explicit `train.gradient_checkpointing`; None for `auto`."""
    if setting == "auto":
        return None
    if setting is True:
        return num_layers
    if setting is False:
        return 0
    return max(1, min(num_layers, math.ceil(setting * num_layers)))


def fused_lora(cfg: RunConfig, strategy: str = "single") -> bool:
    """Whether the run's LoRA linears are the fused 4-bit layer (see plan/layers.py for why not)."""
    return cfg.lora.fused and not cfg.lora.dora and cfg.quantization.bits == 4 and strategy not in ZERO3


def counts_fast_path(cfg: RunConfig, fused_loss: bool, strategy: str = "single") -> bool:
    """Whether `estimate_memory` counts the fast path op by op (`fast_path_layer_bytes`) rather
    than by the 16H + 4I rule of PEFT's layers. Under ZeRO-3 the fused layer is not used."""
    return fused_loss and fused_lora(cfg, strategy)


@dataclass(frozen=True)
class LayerShapes:
    """One decoder layer's linears as the estimate reads them, worked out once per estimate."""

    linears: dict[str, tuple[int, int]]  # name -> (in, out) features (flops.decoder_linear_shapes)
    targets: set[str]  # the names that carry LoRA (`lora.target_modules`)
    adapted: tuple[tuple[int, int], ...]  # (in, out) of those adapted linears, in the decoder's order


def layer_shapes(model_config, target_modules) -> LayerShapes:
    """The shapes of one decoder layer's linears, and of those LoRA adapts for `target_modules`."""
    linears = decoder_linear_shapes(model_config)
    targets = lora_target_names(target_modules)
    return LayerShapes(linears, targets, tuple(shape for name, shape in linears.items() if name in targets))


MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def mlp_token_bytes(shapes: LayerShapes, dtype_bytes: int, dropout: bool, fast_path: bool) -> int:
    """The MLP's share of one decoder layer's saved bytes per token (`fast_path_layer_bytes` on
    the fast path, the 16H + 4I rule on PEFT's layers): the gate and up outputs; the adapted
    linears' dropped inputs and masks, or without dropout their inputs (gate and up share one),
    on PEFT's layers every MLP linear's input."""
    linears, targets = shapes.linears, shapes.targets
    I, H = linears["down_proj"]
    kept = dtype_bytes * 2 * I
    if not fast_path:
        kept += dtype_bytes * (2 * H + I)
    elif not dropout:
        kept += dtype_bytes * ((H if {"gate_proj", "up_proj"} & targets else 0) + (I if "down_proj" in targets else 0))
    if dropout:
        kept += (dtype_bytes + 1) * sum(linears[n][0] for n in MLP_LINEARS if n in targets)
    return kept


def tiled_layer_bytes(one_layer: int, mlp_bytes: int, tokens: int, hidden: int, dtype_bytes: int, tile: int) -> int:
    """What a recomputing layer holds in its backward with its MLP in tiles of `tile` tokens
    (model/tiling.py), from `one_layer`, its bytes untiled, and `mlp_bytes`, the MLP's share a
    token: the MLP's share over the row replaced by the MLP's input the tiled function keeps and
    the input gradient it writes tile by tile (T x H each), and one tile's saved set and the
    gradients of its intermediates (twice the MLP's share, for `tile` tokens)."""
    return (one_layer - tokens * mlp_bytes + 2 * tokens * hidden * dtype_bytes
            + 2 * min(tile, tokens) * mlp_bytes)


def fused_loss_bytes(tokens: int, hidden: int, vocab: int, dtype_bytes: int) -> int:
    """Liger's fused linear cross-entropy at its peak, at the end of forward (module docstring): the
    last layer's output (the final norm keeps it), the norm's output, the input gradient it
    computes in forward (T x H each) and one chunk's logits, turned into their gradient in place."""
    chunk = 1 << (math.ceil(tokens / math.ceil(vocab / hidden)) - 1).bit_length()
    return 3 * tokens * hidden * dtype_bytes + min(chunk, tokens) * vocab * dtype_bytes


def fast_path_layer_bytes(shapes: LayerShapes, dtype_bytes: int, dropout: bool) -> int:
    """Bytes one decoder layer keeps for backward per token on the fast path (module docstring)."""
    linears, targets = shapes.linears, shapes.targets
    I, H = linears["down_proj"]  # down_proj maps the intermediate size back to the hidden size
    q, kv = linears["q_proj"][1], linears["k_proj"][1]
    kept = dtype_bytes * (2 * H + 2 * q + 2 * kv + 2 * I)
    if dropout:
        return kept + (dtype_bytes + 1) * sum(i for i, o in shapes.adapted)
    read = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"down_proj"})
    return kept + dtype_bytes * sum(linears[min(group)][0] for group in read if group & targets)


def kept_weight_bytes(shapes: LayerShapes, cfg: RunConfig, dtype_bytes: int) -> int:
    """What keeping one decoder layer's dequantized weights costs (kernels/fused_lora.py): its
    adapted linears in 16 bits, or under `quantization.compute=fp8` in e4m3 in the two layouts the
    forward and the input gradient read (1 byte a weight each) with a float32 scale per output
    channel."""
    if cfg.quantization.compute == "fp8":
        return sum(2 * i * o + 4 * o for i, o in shapes.adapted)
    return dtype_bytes * sum(i * o for i, o in shapes.adapted)


def fused_loss_for(cfg: RunConfig, kernels: str) -> bool:
    """Whether the loss is fused with the lm_head (Liger's fused linear cross-entropy): with Liger's
    kernels, for SFT only. A preference step scores each record's answer from its own logits
    (run/preference.py), so Liger's fused cross-entropy is neither applied nor counted on."""
    return kernels == "liger" and cfg.train.method not in PREFERENCE_METHODS


def preference_logits_bytes(tokens: int, vocab: int, dtype_bytes: int) -> int:
    """What the preference log-prob path holds for its head in backward (module docstring), with
    every token of the micro-batch counted as scored (an upper bound: prompts are not scored): the
    kept logits and their gradient, each in the model dtype, plus one chunk's float32 logits and
    softmax (2 x 4 bytes) and that chunk's gradient before it is written back in the model dtype."""
    return 2 * tokens * vocab * dtype_bytes + min(tokens, LOGSOFTMAX_CHUNK) * vocab * (8 + dtype_bytes)


def fp8_transient_bytes(shapes: LayerShapes, tokens: int) -> int:
    """Under FP8, the largest buffers one fused linear adds while it runs: its input or output
    gradient quantized by row (1 byte a value) and, in backward, its e4m3 weight transposed."""
    linears = shapes.linears.values()
    return tokens * max(max(i, o) for i, o in linears) + max(i * o for i, o in linears)


def dora_layer_bytes(shapes: LayerShapes, cfg: RunConfig, tokens: int, dtype_bytes: int,
                     lora_layer_bytes: int) -> int:
    """What one decoder layer of PEFT's DoRA layers keeps for backward, from `lora_layer_bytes`,
    the same layer's bytes with plain LoRA on PEFT's layers:
    - each adapted linear's output is scaled by the magnitude over the column norms, a float32
      parameter (PEFT keeps adapters in float32), so the output, the residual stream and every
      activation after it are float32: the layer's activations count at 4 bytes a value, not
      `dtype_bytes`;
    - each adapted linear keeps two more [tokens x out] tensors for the magnitude's products: its
      base output and its adapter output (`dtype_bytes` each);
    - under LoRA dropout DoRA computes the base output again from the dropped input with the
      dequantized weight (`F.linear(dropout(x), W)`), which keeps that weight until backward."""
    kept = lora_layer_bytes * 4 // dtype_bytes + 2 * tokens * dtype_bytes * sum(o for i, o in shapes.adapted)
    if cfg.lora.dropout > 0:
        kept += dtype_bytes * sum(i * o for i, o in shapes.adapted)
    return kept


def estimate_memory(model_config, cfg: RunConfig, dtype_bytes: int, recompute_layers: int | None = None,
                    fused_loss: bool = False, kept_weight_layers: int = 0, offload: bool = False,
                    mlp_tile: int = 0) -> MemoryEstimate:
    """The estimate for `recompute_layers` recomputing layers (default: what
    train.gradient_checkpointing says, auto counting as every layer) and `kept_weight_layers`
    layers that keep their dequantized weights for the whole run. A run that recomputes any layer
    on the fused path also keeps one layer's weights from its recompute to its backward. With
    `offload` the recomputing layers' inputs count on the host, two of them on the GPU. With
    `mlp_tile` the recomputing layers' MLPs run in tiles of that many tokens (not counted under
    DoRA, whose float32 activations the tiled count does not follow)."""
    c = model_config
    H, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    shapes = layer_shapes(c, cfg.lora.target_modules)
    linear_per_layer = sum(i * o for i, o in shapes.linears.values())
    if cfg.quantization.bits == 4:
        # 4 bits a weight, one absmax per 64 (uint8 with double quantization, else fp32)
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if cfg.quantization.double_quant else 4 / 64)
        if cfg.quantization.double_quant and cfg.lora.fused:
            per_weight += 4 / 64  # the fused LoRA layer keeps the block scales in float32 too
    else:
        per_weight = dtype_bytes
    layer_bytes = int(linear_per_layer * per_weight) + 2 * H * dtype_bytes
    embeddings = V * H * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    base = L * layer_bytes + (embeddings + H) * dtype_bytes

    lora_params = L * sum(cfg.lora.r * (i + o) for i, o in shapes.adapted)
    if cfg.lora.dora:  # one magnitude per output feature of each adapted linear
        lora_params += L * sum(o for i, o in shapes.adapted)
    # lm_head / embed_tokens trained in full (lora.modules_to_save): a trainable copy of V x H each
    lora_params += V * H * sum(1 for m in cfg.lora.modules_to_save if m.rpartition(".")[2] in ("lm_head",
                                                                                              "embed_tokens"))

    row = cfg.data.tokens_per_row if cfg.data.packing else cfg.data.max_seq_len
    T = cfg.train.micro_batch_size * row
    fast_path = counts_fast_path(cfg, fused_loss)
    if fast_path:
        one_layer = T * fast_path_layer_bytes(shapes, dtype_bytes, cfg.lora.dropout > 0)
    else:
        # (16H + 4I) values a token with LoRA dropout on every linear: the inputs of the seven
        # linears (6H + I values) each kept once more as a dropped copy plus a one-byte mask.
        one_layer = T * ((16 * H + 4 * c.intermediate_size) * dtype_bytes
                         - (6 * H + c.intermediate_size) * (dtype_bytes + 1))
        if cfg.lora.dropout > 0:
            one_layer += T * (dtype_bytes + 1) * sum(i for i, o in shapes.adapted)
        if cfg.lora.dora:
            one_layer = dora_layer_bytes(shapes, cfg, T, dtype_bytes, one_layer)
    k = recompute_layers
    if k is None:
        k = recompute_layers_for(cfg.train.gradient_checkpointing, L)
        k = L if k is None else k
    # a recomputing layer keeps its input; under DoRA the hidden states are float32 (dora_layer_bytes)
    checkpoint_bytes = 4 if cfg.lora.dora else dtype_bytes
    boundary = T * H * checkpoint_bytes  # one recomputing layer's input
    on_gpu = min(k, 2) if offload else k
    recomputing = one_layer
    if mlp_tile and not cfg.lora.dora:
        recomputing = tiled_layer_bytes(one_layer, mlp_token_bytes(shapes, dtype_bytes, cfg.lora.dropout > 0, fast_path),
                                        T, H, dtype_bytes, mlp_tile)
    kept_layers = on_gpu * boundary + (L - k) * one_layer
    activations = kept_layers + (recomputing if k else 0)
    if fused_loss and cfg.train.method not in PREFERENCE_METHODS:
        activations = max(activations, kept_layers + fused_loss_bytes(T, H, V, dtype_bytes))
    recomputing_keeps = k > 0 and cfg.lora.fused and cfg.quantization.bits == 4
    activations += (kept_weight_layers + recomputing_keeps) * kept_weight_bytes(shapes, cfg, dtype_bytes)
    if cfg.quantization.compute == "fp8":
        activations += fp8_transient_bytes(shapes, T)
    if cfg.train.method in PREFERENCE_METHODS:
        activations += preference_logits_bytes(T, V, dtype_bytes)
    elif not fused_loss:
        activations += T * V * (dtype_bytes + 8)
    return MemoryEstimate(base, layer_bytes, 4 * lora_params, 12 * lora_params, activations, T,
                          k * boundary if offload else 0)
