# Microbench: varlen flash (FA2, torch.nn.attention.varlen) against cuDNN's ragged SDPA
# (torch.ops.aten._cudnn_attention_forward/backward with cum_seq_q/k) on packed 8192-token rows
# of the bench's length distribution; Mistral-7B heads (32 q, 8 kv, d128), causal, bf16.
import math, sys, time
import numpy as np
import torch
from mistral_qlora.modeling import attention as A

print(torch.__version__, torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version())
for op in ("_cudnn_attention_forward", "_cudnn_attention_backward"):
    print(getattr(torch.ops.aten, op).default._schema)
rng = np.random.default_rng(0)
def row(T=8192):
    lens, total = [], 0
    while True:
        n = int(min(4096, max(16, rng.lognormal(math.log(256), 1.0))))
        if total + n > T:
            lens.append(T - total); break
        lens.append(n); total += n
    lens = [l for l in lens if l > 0]
    return lens
dev = "cuda"
Hq, Hk, D, T = 32, 8, 128, 8192
scale = 1 / math.sqrt(D)
def bench(fn, iters=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / iters * 1000
fs = torch.ops.aten._cudnn_attention_forward.default
bs = torch.ops.aten._cudnn_attention_backward.default
fnames = [a.name for a in fs._schema.arguments]
bnames = [a.name for a in bs._schema.arguments]
print(fnames); print(bnames)
tot = {}
for r in range(6):
    lens = row() if r < 5 else [4096, 4096]
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32, device=dev)
    mx = max(lens)
    torch.manual_seed(r)
    q = torch.randn(T, Hq, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(T, Hk, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(T, Hk, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(T, Hq, D, device=dev, dtype=torch.bfloat16)
    def fa2():
        return A._call_kernel(q, k, v, cu, cu, mx, mx, scale, (-1, 0))
    o_ref = fa2(); o_ref.backward(go)
    dq_ref, dk_ref, dv_ref = q.grad.clone(), k.grad.clone(), v.grad.clone()
    q.grad = k.grad = v.grad = None
    t_f = bench(lambda: fa2().detach())
    def fa2fb():
        o = fa2(); torch.autograd.grad(o, (q, k, v), go)
    t_fb = bench(fa2fb)
    res = {"fa2": (t_f, t_fb)}
    for mode in ("gqa", "repeat"):
        try:
            kk = k.detach() if mode == "gqa" else k.detach().repeat_interleave(Hq // Hk, 1)
            vv = v.detach() if mode == "gqa" else v.detach().repeat_interleave(Hq // Hk, 1)
            qq = q.detach()
            fkw = dict(query=qq, key=kk, value=vv, attn_bias=None, cum_seq_q=cu, cum_seq_k=cu, max_q=mx, max_k=mx,
                       compute_log_sumexp=True, dropout_p=0.0, is_causal=True, return_debug_mask=False, scale=scale)
            fkw = {n: fkw[n] for n in fnames if n in fkw}
            out = fs(**fkw)
            o, lse, seed, off = out[0], out[1], out[6], out[7]
            bkw = dict(grad_out=go, query=qq, key=kk, value=vv, out=o, logsumexp=lse, philox_seed=seed,
                       philox_offset=off, attn_bias=None, cum_seq_q=cu, cum_seq_k=cu, max_q=mx, max_k=mx,
                       dropout_p=0.0, is_causal=True, scale=scale)
            bkw = {n: bkw[n] for n in bnames if n in bkw}
            dq, dk, dv = bs(**bkw)[:3]
            if mode == "repeat":
                dk = dk.view(T, Hk, Hq // Hk, D).sum(2); dv = dv.view(T, Hk, Hq // Hk, D).sum(2)
            err = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max())
            print(f"row {r} {mode}: rel max err out {err(o, o_ref):.2e} dq {err(dq, dq_ref):.2e} dk {err(dk, dk_ref):.2e} dv {err(dv, dv_ref):.2e}",
                  "lse", tuple(lse.shape))
            tf = bench(lambda: fs(**fkw))
            def fb():
                out = fs(**fkw); bs(**bkw)
            tfb = bench(fb)
            if mode == "repeat":
                def fbr():
                    k2 = k.detach().repeat_interleave(Hq // Hk, 1); v2 = v.detach().repeat_interleave(Hq // Hk, 1)
                    out = fs(**fkw); g = bs(**bkw); g[1].view(T, Hk, Hq // Hk, D).sum(2); g[2].view(T, Hk, Hq // Hk, D).sum(2)
                tfb = bench(fbr)
            res[mode] = (tf, tfb)
        except Exception as e:
            print(f"row {r} {mode}: FAILED {type(e).__name__}: {str(e)[:300]}")
    print(f"row {r} docs {len(lens)} max {mx}: " + ", ".join(f"{m} fwd {a:.0f} us fwd+bwd {b:.0f} us" for m, (a, b) in res.items()), flush=True)
    for m, (a, b) in res.items():
        tot.setdefault(m, [0, 0]); tot[m][0] += a; tot[m][1] += b
print("sum over rows 0-5:", {m: (round(a), round(b)) for m, (a, b) in tot.items()})
