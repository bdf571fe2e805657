"""The attention backends as transformers runs them: `model.attention` (chosen by
plan/backends.py) -> `attn_implementation`, and `varlen`, PyTorch's own varlen flash kernel,
registered through transformers' `AttentionInterface`.

Every backend sees packed rows through `position_ids` (transformers builds block-diagonal,
windowed masks for eager/SDPA/flex) or through the `cu_seq_lens_*`/`max_length_*` the collator
computes on the CPU (flash-style kernels).

Sliding window, one definition for all backends: a query at position i sees the keys at positions
i-W+1 .. i (W keys, itself included), as transformers' mask does (`kv_idx > q_idx - W`). The
flash-style kernels count the window without the query itself, so W becomes `(W - 1, 0)`.
"""

from __future__ import annotations

import inspect

import torch

# config name -> transformers attn_implementation
IMPLEMENTATION = {
    "flash_attention_2": "flash_attention_2",
    "varlen": "torch_varlen",
    "flex": "flex_attention",
    "sdpa": "sdpa",
    "eager": "eager",
}
# Backends that read cu_seq_lens_* from the batch instead of building a mask.
TAKES_CU_SEQLENS = {"flash_attention_2", "varlen"}
def implementation(backend: str) -> str:
    """The transformers attn_implementation for a backend, registering ours first where needed."""
    if backend == "varlen":
        register_varlen()
    return IMPLEMENTATION[backend]


def set_attention(model, backend: str) -> None:
    """Switch a loaded (LoRA-wrapped) model to another backend."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(implementation(backend))


# ---------------------------------------------------------------------------------------------
# `varlen`: torch.nn.attention.varlen.varlen_attn behind transformers' AttentionInterface


def flash_window(sliding_window: int | None, max_len: int | None = None) -> tuple[int, int]:
    """transformers' window W (keys i-W+1..i) as the flash-style (left, right) pair: (W-1, 0).

    (-1, 0) is plain causal attention: no window, or one no sequence is longer than.
    """
    if sliding_window is None or (max_len is not None and sliding_window >= max_len):
        return (-1, 0)
    return (int(sliding_window) - 1, 0)


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                          window_size=(-1, -1), enable_gqa=False):
    """The semantics of `varlen_attn` (flash-attn's varlen kernel) in plain PyTorch, any device/dtype.

    Sequence s holds query rows cu_seq_q[s]:cu_seq_q[s+1] and key rows cu_seq_k[s]:cu_seq_k[s+1];
    queries are aligned to the end of the keys; query i sees key j when
    i' - left <= j <= i' + right, with i' = i + len_k - len_q and -1 meaning unbounded.
    Used by the CPU tests in place of the CUDA kernel and, on the GPU, to check the kernel.
    """
    left, right = window_size
    hq, hk = query.shape[1], key.shape[1]
    if hq != hk:
        if not enable_gqa:
            raise ValueError(f"query has {hq} heads, key {hk}; pass enable_gqa=True")
        key = key.repeat_interleave(hq // hk, dim=1)
        value = value.repeat_interleave(hq // hk, dim=1)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(query)
    for s in range(len(cu_seq_q) - 1):
        q0, q1, k0, k1 = int(cu_seq_q[s]), int(cu_seq_q[s + 1]), int(cu_seq_k[s]), int(cu_seq_k[s + 1])
        q, k, v = query[q0:q1].float(), key[k0:k1].float(), value[k0:k1].float()
        i = torch.arange(q1 - q0, device=query.device)[:, None] + (k1 - k0) - (q1 - q0)
        j = torch.arange(k1 - k0, device=query.device)[None, :]
        allowed = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool, device=query.device)
        if right >= 0:
            allowed &= j <= i + right
        if left >= 0:
            allowed &= j >= i - left
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out


_VARLEN_KERNEL = None  # resolved on first use; the CPU tests put reference_varlen_attn here
# How K/V with fewer heads than the query (GQA: Mistral has 8 K/V heads for 32 query heads) reach
# the kernel: "flag": torch 2.13's varlen_attn takes enable_gqa=True; "direct": torch 2.11's has no
# such flag and no check, and hands K/V to the flash kernel, which shares each K/V head among its
# query heads itself ("probe" until the first call shows it); "repeat": the K/V heads are repeated
# to the query's, a copy in forward and a sum in backward (a [tokens x heads x head_dim] tensor
# each for K and V), for a torch whose varlen_attn refuses fewer heads without a flag.
_GQA: str | None = None


def _kernel():
    global _VARLEN_KERNEL, _GQA
    if _VARLEN_KERNEL is None:
        from torch.nn.attention.varlen import varlen_attn

        _VARLEN_KERNEL = varlen_attn
    if _GQA is None:
        _GQA = "flag" if "enable_gqa" in inspect.signature(_VARLEN_KERNEL).parameters else "probe"
    return _VARLEN_KERNEL


def _call_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, window):
    """q (Tq, Hq, D), k/v (Tk, Hkv, D) -> (Tq, Hq, D), with K/V heads shared by groups of query heads."""
    global _GQA
    kernel = _kernel()
    kwargs = {"scale": scale, "window_size": window}
    if q.shape[1] != k.shape[1]:
        if _GQA == "flag":
            kwargs["enable_gqa"] = True
        elif _GQA == "probe":
            try:
                out = kernel(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **kwargs)
            except (RuntimeError, ValueError):  # this torch checks the heads: repeat them from now on
                _GQA = "repeat"
            else:
                _GQA = "direct"
                return out
        if _GQA == "repeat":
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return kernel(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **kwargs)


def _cu_seq_lens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence boundaries of one packed row from its position ids (reads the device: fallback only)."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(torch.diff(pos) != 1).reshape(-1) + 1
    zero = torch.zeros(1, dtype=starts.dtype, device=pos.device)
    end = torch.full((1,), pos.numel(), dtype=starts.dtype, device=pos.device)
    cu = torch.cat([zero, starts, end]).to(torch.int32)
    return cu, int(torch.diff(cu).max())


def _masked_sdpa(query, key, value, padding_mask, scaling, sliding_window):
    """Fallback for a padded batch or a cached decoding step: dense mask, causal aligned to the end."""
    b, hq, lq, _ = query.shape
    hk, lk = key.shape[1], key.shape[2]
    if hq != hk:
        key = key.repeat_interleave(hq // hk, dim=1)
        value = value.repeat_interleave(hq // hk, dim=1)
    i = torch.arange(lq, device=query.device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=query.device)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed = allowed & (j > i - sliding_window)
    allowed = allowed[None, None].expand(b, 1, lq, lk)
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, -lk:].bool()
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # a padded query row sees everything: no NaN
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2).contiguous()


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (B, H, L, D) tensors in, (B, L, H, D) out.

    Packed rows come with cu_seq_lens/max_length from the collator (no device read here). Without
    them: a padded batch or a decoding step with a cache goes to SDPA with a dense mask; otherwise
    each batch row is one sequence, or (batch of one) the sequences its position ids restart at.
    """
    if dropout:
        raise ValueError("model.attention=varlen has no attention dropout (Mistral uses none)")
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    if attention_mask is not None or lq != lk:
        return _masked_sdpa(query, key, value, attention_mask, scaling, sliding_window), None

    if cu_seq_lens_q is not None and max_length_q is not None:
        cu_q, max_q = cu_seq_lens_q, max_length_q
        cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu_q
        max_k = max_length_k if max_length_k is not None else max_q
    elif b == 1 and position_ids is not None and position_ids.shape[-1] == lq:
        cu_q, max_q = _cu_seq_lens_from_position_ids(position_ids)
        cu_k, max_k = cu_q, max_q
    else:
        cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=query.device)
        cu_k, max_q, max_k = cu_q, lq, lk
    cu_q = cu_q.to(device=query.device, dtype=torch.int32)
    cu_k = cu_k.to(device=query.device, dtype=torch.int32)

    # (B, H, L, D) -> (B*L, H, D): the packed layout the kernel takes.
    q = query.transpose(1, 2).reshape(b * lq, hq, d)
    k = key.transpose(1, 2).reshape(b * lk, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * lk, value.shape[1], d)
    dtype = q.dtype
    if q.is_cuda and dtype not in (torch.bfloat16, torch.float16):
        # The kernel runs in half precision only (PEFT may hand over float32 activations).
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = q.to(half), k.to(half), v.to(half)
    out = _call_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scaling, flash_window(sliding_window, max_k))
    return out.to(dtype).reshape(b, lq, hq, d), None


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """Mask function for `varlen`: the 2D padding mask where there is padding, else None.

    Causality, the window and the packed-sequence boundaries are the kernel's business, as with
    transformers' flash_attention_2.
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


_REGISTERED = False


def register_varlen() -> None:
    """Make `attn_implementation="torch_varlen"` known to transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION["varlen"], varlen_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION["varlen"], _padding_mask)
    _REGISTERED = True
