"""Every CUDA attention backend on packed rows against the eager float32 reference (GPU only).

Run on the GPU machine:  PYTHONPATH=src python3 -m pytest tests/test_attention_gpu.py -q

Model level: a small random Mistral (GQA 16:4 heads, head_dim 128 as in the 7B) in bfloat16,
one packed row with position ids restarting per sequence (and, for varlen/flash_attention_2, the
collator's cu_seq_lens), against each sequence run alone through eager attention in float32.
Forward output and the gradient of the input embeddings must be within bf16 tolerance: no more
than twice the error of eager attention itself run in bfloat16 on the same sequences. Windows:
none, 4096 (sequences up to 5000 tokens), 256 on sequences of 1000-3000 tokens, and 7 (where an
off-by-one in the window would be a large error).

Kernel level: torch's varlen_attn and flash-attn's varlen function against
`reference_varlen_attn` (the semantics the CPU tests rely on), forward and backward, the three
GQA paths, and the window conversion W -> (W-1, 0) with its off-by-one control.
"""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

from mistral_qlora.model import attention as A
from mistral_qlora.plan.backends import usable_backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
CASES = {  # window -> sequence lengths of the packed row
    None: [1500, 3000, 700, 37],
    4096: [5000, 2600, 900],
    256: [1000, 3000, 1777, 64],
    7: [300, 150, 5, 40],
}
BACKENDS = [
    pytest.param("varlen", id="varlen"),
    pytest.param("varlen-repeat-kv", id="varlen-repeat-kv"),  # a varlen_attn that refuses fewer K/V heads
    pytest.param("flex", id="flex"),
    pytest.param("flash_attention_2", id="flash_attention_2",
                 marks=pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash-attn is not installed")),
]


def _config(window):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                         max_position_embeddings=16384, rope_theta=1e6, sliding_window=window, use_cache=False)


_STATE = {}


def _model(impl, window, dtype):
    from transformers import MistralModel

    if "state" not in _STATE:
        torch.manual_seed(0)
        _STATE["state"] = MistralModel(_config(None)).state_dict()
    if impl == "torch_varlen":
        A.register_varlen()
    model = MistralModel._from_config(_config(window), attn_implementation=impl, dtype=dtype)
    model.load_state_dict(_STATE["state"])
    return model.cuda().eval()


def _inputs(lengths, hidden=1024, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    embeds = [torch.randn(n, hidden, device="cuda", generator=g) for n in lengths]
    proj = torch.randn(hidden, device="cuda", generator=g)
    return embeds, proj


def _per_sequence(model, embeds, proj, dtype):
    """Each sequence alone: (outputs, gradients of the input embeddings), in float32."""
    outs, grads = [], []
    for e in embeds:
        x = e.to(dtype)[None].requires_grad_(True)
        out = model(inputs_embeds=x).last_hidden_state
        (out.float() @ proj).sum().backward()
        outs.append(out[0].detach().float())
        grads.append(x.grad[0].float())
    return torch.cat(outs), torch.cat(grads)


def _packed(model, embeds, proj, dtype, cu_seqlens):
    lengths = [len(e) for e in embeds]
    x = torch.cat(embeds).to(dtype)[None].requires_grad_(True)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    kwargs = {}
    if cu_seqlens:  # as PackedCollator computes them, on the CPU, moved like the Trainer moves a batch
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        cu = cu.cuda()
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    out = model(inputs_embeds=x, position_ids=position_ids, **kwargs).last_hidden_state
    (out.float() @ proj).sum().backward()
    return out[0].detach().float(), x.grad[0].float()


_REFERENCES = {}


def _references(window):
    """(fp32 eager per sequence, bf16 eager per sequence) for a case, computed once."""
    if window not in _REFERENCES:
        embeds, proj = _inputs(CASES[window])
        ref32 = _per_sequence(_model("eager", window, torch.float32), embeds, proj, torch.float32)
        ref16 = _per_sequence(_model("eager", window, torch.bfloat16), embeds, proj, torch.bfloat16)
        _REFERENCES[window] = (embeds, proj, ref32, ref16)
    return _REFERENCES[window]


def _err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("window", list(CASES), ids=lambda w: f"window={w}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_eager_fp32(backend, window, monkeypatch):
    embeds, proj, (out32, grad32), (out16, grad16) = _references(window)
    if backend == "varlen-repeat-kv":
        A._kernel()
        monkeypatch.setattr(A, "_GQA", "repeat")
    name = backend.removesuffix("-repeat-kv")
    why_not = usable_backends(torch.bfloat16)[name]
    if why_not:
        pytest.skip(why_not)
    model = _model(A.IMPLEMENTATION[name], window, torch.bfloat16)
    out, grad = _packed(model, embeds, proj, torch.bfloat16, cu_seqlens=name in A.TAKES_CU_SEQLENS)
    tol_out, tol_grad = 2 * _err(out16, out32) + 1e-4, 2 * _err(grad16, grad32) + 1e-4
    print(f"{backend} window={window}: out err {_err(out, out32):.3g} (tol {tol_out:.3g}), "
          f"grad err {_err(grad, grad32):.3g} (tol {tol_grad:.3g})")
    assert _err(out, out32) <= tol_out
    assert _err(grad, grad32) <= tol_grad


# ---------------------------------------------------------------------------------------------
# Kernel level: the window convention and GQA, forward and backward


def _bf16_math(q, k, v, cu, window):
    """Eager-style attention in bfloat16 (scores and products in bf16): the bf16 error yardstick."""
    out = torch.empty_like(q)
    g = q.shape[1] // k.shape[1]
    for s in range(len(cu) - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        qq, kk, vv = q[a:b].transpose(0, 1), k[a:b].repeat_interleave(g, 1).transpose(0, 1), \
            v[a:b].repeat_interleave(g, 1).transpose(0, 1)
        scores = (qq @ kk.transpose(1, 2)) * q.shape[-1] ** -0.5
        i, j = torch.arange(b - a, device=q.device)[:, None], torch.arange(b - a, device=q.device)[None, :]
        allowed = (j <= i) & ((j > i - window) if window else True)
        probs = scores.float().masked_fill(~allowed, float("-inf")).softmax(-1).to(q.dtype)
        out[a:b] = (probs @ vv).transpose(0, 1)
    return out


def _qkv(lengths, hq=16, hk=4, d=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for h in (hq, hk, hk))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return q, k, v, cu.cuda(), max(lengths)


def _with_grads(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


@pytest.mark.parametrize("window", [None, 1, 7, 64, 300])
@pytest.mark.parametrize("gqa", ["flag", "direct", "repeat"])
def test_torch_varlen_kernel_semantics(window, gqa, monkeypatch):
    """`flag`: torch 2.13's enable_gqa; `direct`: torch 2.11's varlen_attn given fewer K/V heads;
    `repeat`: K/V heads repeated."""
    if usable_backends(torch.bfloat16)["varlen"]:
        pytest.skip(usable_backends(torch.bfloat16)["varlen"])
    A._kernel()
    has_flag = "enable_gqa" in inspect.signature(A._VARLEN_KERNEL).parameters
    if gqa == "flag" and not has_flag:
        pytest.skip("this torch's varlen_attn has no enable_gqa")
    if gqa == "direct" and has_flag:
        pytest.skip("this torch's varlen_attn takes enable_gqa")
    monkeypatch.setattr(A, "_GQA", gqa)
    lengths = [700, 257, 3, 1024]
    q, k, v, cu, mx = _qkv(lengths)
    dout = torch.randn_like(q)
    flash = A.flash_window(window, mx)

    def kernel(q_, k_, v_, win=flash):
        return A._call_kernel(q_, k_, v_, cu, cu, mx, mx, None, win)

    def reference(q_, k_, v_, win=flash):
        return A.reference_varlen_attn(q_.float(), k_.float(), v_.float(), cu, cu, mx, mx, window_size=win,
                                       enable_gqa=True)

    got = _with_grads(kernel, q, k, v, dout)
    ref = _with_grads(reference, q.float(), k.float(), v.float(), dout.float())
    yard = _with_grads(lambda a, b, c: _bf16_math(a, b, c, cu, window), q, k, v, dout)
    for name, x, r, y in zip(("out", "dq", "dk", "dv"), got, ref, yard):
        tol = 2 * _err(y, r) + 1e-4
        assert _err(x, r) <= tol, f"{name}: {_err(x, r):.3g} > {tol:.3g}"
    if window is not None and window <= 7:
        # The control: one key more, (W, 0), is not transformers' window, and the test sees it.
        wrong = kernel(q, k, v, win=(window, 0)).float()
        assert _err(wrong, ref[0]) > 3 * (2 * _err(yard[0], ref[0]) + 1e-4)


@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash-attn is not installed")
@pytest.mark.parametrize("window", [None, 7, 300])
def test_flash_attn_varlen_window_as_transformers_passes_it(window):
    """transformers calls flash-attn with causal=True, window (W-1, W-1): the same W keys."""
    from flash_attn import flash_attn_varlen_func

    q, k, v, cu, mx = _qkv([700, 257, 3, 1024])
    win = (-1, -1) if window is None else (window - 1, window - 1)
    out = flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=True, window_size=win).float()
    ref = A.reference_varlen_attn(q.float(), k.float(), v.float(), cu, cu, mx, mx,
                                  window_size=A.flash_window(window, mx), enable_gqa=True)
    assert _err(out, ref) <= 2 * _err(_bf16_math(q, k, v, cu, window).float(), ref) + 1e-4
