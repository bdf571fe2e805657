# Measurement record (2026-11-30, H200): the Triton NF4 dequantization of
# 2026-11-30-0509-h200-nf4-dequant.diff (tried, not landed) against bitsandbytes', and torch 2.11's
# varlen_attn given 8 K/V heads for 32 query heads. Needs that diff applied. Not part of the package.
import torch, bitsandbytes as bnb, statistics, inspect
from mistral_qlora.modeling import lora_kernels as K, fused_lora as F
def timeit(fn, n=30):
    for _ in range(3): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(n):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts) * 1000
tot = {}
for (o, i, n) in [(4096, 4096, 2), (1024, 4096, 2), (14336, 4096, 3)]:
    w = bnb.nn.Params4bit((torch.randn(o, i) * 0.02).to(torch.bfloat16), requires_grad=False, quant_type="nf4").to("cuda")
    st = w.quant_state; absmax = F.dequantized_absmax(w)
    ref = torch.ops.bitsandbytes.dequantize_4bit.default(w, absmax, st.blocksize, st.quant_type, st.shape, st.dtype)
    out = K.dequantize_nf4(w, absmax, st.code, st.blocksize, st.shape, st.dtype)
    line = [f"{o}x{i}: equal {torch.equal(out, ref)}", f"bnb {timeit(lambda: torch.ops.bitsandbytes.dequantize_4bit.default(w, absmax, st.blocksize, st.quant_type, st.shape, st.dtype)):.1f}us"]
    tot["bnb"] = tot.get("bnb", 0) + float(line[1].split()[1][:-2]) * n * 64 / 1000
    for blk, nw in [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (512, 4)]:
        K.DEQUANT_BLOCK, K.DEQUANT_WARPS = blk, nw
        us = timeit(lambda: K.dequantize_nf4(w, absmax, st.code, st.blocksize, st.shape, st.dtype))
        line.append(f"{blk}/{nw} {us:.1f}us ({(w.numel() + o * i * 2) / us / 1e3:.0f} GB/s)")
        tot[(blk, nw)] = tot.get((blk, nw), 0) + us * n * 64 / 1000
    print(" | ".join(line), flush=True)
print("per step (224 weights x fwd+bwd), ms:", {str(k): round(v, 1) for k, v in tot.items()})
# GQA through torch's varlen_attn without repeating K/V heads
from torch.nn.attention.varlen import varlen_attn
print("varlen_attn signature:", inspect.signature(varlen_attn))
src = inspect.getsource(inspect.getmodule(varlen_attn))
print("mentions heads check:", "num_heads_k" in src, "enable_gqa" in src)
print(torch.ops.aten._flash_attention_forward.default._schema)
T, H, Hk, D = 4096, 32, 8, 128
cu = torch.tensor([0, 1000, 3000, 4096], dtype=torch.int32, device="cuda")
q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(T, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(T, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
ref = varlen_attn(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), cu, cu, 2000, 2000, window_size=(4095, 0))
ref.sum().backward(); gr = [t.grad.clone() for t in (q, k, v)]
for t in (q, k, v): t.grad = None
try:
    out = varlen_attn(q, k, v, cu, cu, 2000, 2000, window_size=(4095, 0))
    out.sum().backward()
    print("GQA direct: out equal", torch.equal(out, ref), "grads max diff", [ (a - t.grad).abs().max().item() for a, t in zip(gr, (q, k, v))])
except Exception as e:
    print("GQA direct failed:", type(e).__name__, str(e)[:300])
