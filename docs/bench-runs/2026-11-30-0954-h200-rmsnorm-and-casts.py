import statistics, torch
from torch.profiler import profile, ProfilerActivity
from liger_kernel.transformers.rms_norm import LigerRMSNorm

def kernel_us(fn, n=20):
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n): fn()
        torch.cuda.synchronize()
    tot = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            tot[e.name[:50]] = tot.get(e.name[:50], 0) + e.device_time_total
    return sum(tot.values()) / n, {k: round(v / n, 1) for k, v in tot.items()}

T, H = 8192, 4096
x0 = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
w = (1 + 0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16)
g = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
liger = LigerRMSNorm(H, eps=1e-5).cuda().to(torch.bfloat16); liger.weight.data.copy_(w); liger.weight.requires_grad_(False)
def hf(x):
    xf = x.float(); v = xf.pow(2).mean(-1, keepdim=True); return w * (xf * torch.rsqrt(v + 1e-5)).to(x.dtype)
for name, f in [("liger", liger), ("torch F.rms_norm", lambda x: torch.nn.functional.rms_norm(x, (H,), w, 1e-5)), ("hf eager", hf)]:
    x = x0.clone().requires_grad_(True)
    def fwd(): return f(x)
    def fwdbwd():
        y = f(x); y.backward(g); x.grad = None
    tf, kf = kernel_us(fwd); tb, kb = kernel_us(fwdbwd)
    x = x0.clone().requires_grad_(True); y = f(x); y.backward(g)
    xr = x0.double().requires_grad_(True); vr = xr.pow(2).mean(-1, keepdim=True); yr = w.double() * xr * torch.rsqrt(vr + 1e-5); yr.backward(g.double())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    print(f"{name}: fwd {tf:.1f} us, fwd+bwd {tb:.1f} us; y err {rel(y, yr):.2e}, dx err {rel(x.grad, xr.grad):.2e}; {kb}", flush=True)

# LoRA weights: 448 separate casts a step against one foreach copy
shapes = [(16, 4096)] * 6 * 32 + [(16, 14336)] * 32 + [(4096, 16)] * 4 * 32 + [(1024, 16)] * 2 * 32 + [(14336, 16)] * 2 * 32 + [(4096, 16)] * 32
src = [torch.randn(*s, device="cuda") for s in shapes]
dst = [torch.empty(*s, device="cuda", dtype=torch.bfloat16) for s in shapes]
import time
def casts(): return [t.to(torch.bfloat16) for t in src]
def foreach(): torch._foreach_copy_(dst, src)
for name, fn in [("448 casts", casts), ("one _foreach_copy_", foreach)]:
    t, k = kernel_us(fn, n=10)
    torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(10): fn()
    host = (time.perf_counter() - s) / 10 * 1e6
    torch.cuda.synchronize()
    print(f"{name}: GPU {t:.1f} us, host {host:.1f} us, {len(k)} kernel kinds", flush=True)
