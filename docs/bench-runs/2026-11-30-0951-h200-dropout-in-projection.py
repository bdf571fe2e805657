"""Microbenchmark: LoRA dropout drawn in the A-projection kernel vs native_dropout + cuBLAS, 7B shapes."""
import itertools, statistics, torch
from torch.profiler import profile, ProfilerActivity
from mistral_qlora.modeling import lora_dropout as L

def loop_us(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        for _ in range(n): fn()
        b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1000 / n)
    return statistics.median(ts)

def kernel_us(fn, n=10):
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n): fn()
        torch.cuda.synchronize()
    tot = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            tot[e.name[:40]] = tot.get(e.name[:40], 0) + e.device_time_total
    return sum(tot.values()) / n, {k: round(v / n, 1) for k, v in tot.items()}

T, R, p = 8192, 16, 0.05
rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
for K in (4096, 14336):
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    A = (torch.randn(R, K, device="cuda") * 0.02).to(torch.bfloat16)
    ga = torch.randn(T, R, device="cuda", dtype=torch.bfloat16)
    dx, m = torch.native_dropout(x, p, True)
    for name, fn in [("native_dropout", lambda: torch.native_dropout(x, p, True)), ("xa GEMM", lambda: dx @ A.t()),
                     ("dA GEMM", lambda: ga.t() @ dx),
                     ("bernoulli_ bool", lambda: torch.empty(T, K, dtype=torch.bool, device="cuda").bernoulli_(1 - p))]:
        print(f"K={K} {name}: loop {loop_us(fn):.1f} us, kernels {kernel_us(fn)[0]:.1f} us", flush=True)
    torch.manual_seed(0)
    xa, mask = L.dropout_project(x, A, p)
    dropped = (x.float() * mask * (1 / (1 - p))).to(torch.bfloat16)
    refd = dropped.double() @ A.double().t()
    gA = L.dropout_grad_a(ga, x, mask, 1 / (1 - p))
    refA = ga.t().double() @ dropped.double()
    print(f"  keep {mask.float().mean().item():.5f}; xa rel err {rel(xa, refd):.2e} (cuBLAS {rel(dx @ A.t(), (dx.double() @ A.double().t())):.2e}); "
          f"dA rel err {rel(gA, refA):.2e}; failed {L._failed}", flush=True)
    best = None
    for bt, nw, bk in itertools.product((16, 32, 64), (2, 4, 8), (128, 256)):
        L.PROJECT.update(BLOCK_T=bt, num_warps=nw); L.BLOCK_K = bk
        try:
            t, ks = kernel_us(lambda: L.dropout_project(x, A, p)); tl_ = loop_us(lambda: L.dropout_project(x, A, p))
        except Exception as e:
            print("  project", bt, nw, bk, "failed", type(e).__name__, str(e)[:100]); continue
        print(f"  project BLOCK_T={bt} warps={nw} BLOCK_K={bk}: kernels {t:.1f} us, loop {tl_:.1f} us", flush=True)
        if best is None or t < best[0]: best = (t, bt, nw, bk)
    print("  best project", best, flush=True)
    L.PROJECT.update(BLOCK_T=32, num_warps=4); L.BLOCK_K = 128
    best = None
    for bt, bn, nw, st, progs in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3, 4), (512, 1024)):
        L.GRAD_A.update(BLOCK_T=bt, BLOCK_N=bn, num_warps=nw, NUM_STAGES=st); L.GRAD_A_PROGRAMS = progs
        try:
            t, ks = kernel_us(lambda: L.dropout_grad_a(ga, x, mask, 1 / (1 - p)), n=5)
        except Exception as e:
            print("  grad_a", bt, bn, nw, st, progs, "failed", type(e).__name__, str(e)[:100]); continue
        if best is None or t < best[0]: best = (t, bt, bn, nw, st, progs, ks)
        print(f"  grad_a BLOCK_T={bt} BLOCK_N={bn} warps={nw} stages={st} programs={progs}: kernels {t:.1f} us", flush=True)
    print("  best grad_a", best, flush=True)
    L.GRAD_A.update(BLOCK_T=64, BLOCK_N=128, num_warps=4, NUM_STAGES=3); L.GRAD_A_PROGRAMS = 512
print("failed:", L._failed)
