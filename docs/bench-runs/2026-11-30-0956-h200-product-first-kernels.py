"""The rank-16 LoRA product written first and the base GEMM accumulating onto it (cuBLAS beta=1),
against the GEMM first and the product kernel accumulating (main), 7B shapes, 8192 tokens."""
import statistics, torch
from torch.profiler import profile, ProfilerActivity
from mistral_qlora.modeling.lora_kernels import add_lora_product_

def kernel_us(fn, n=20):
    fn(); fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n): fn()
        torch.cuda.synchronize()
    tot = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            tot[e.name[:60]] = tot.get(e.name[:60], 0) + e.device_time_total
    return sum(tot.values()) / n, {k: round(v / n, 1) for k, v in tot.items()}

rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
T, R, s = 8192, 16, 2.0
fwd = {"q/o": (4096, 4096, 2), "k/v": (1024, 4096, 2), "gate/up": (14336, 4096, 2), "down": (4096, 14336, 1)}
bwd = {"q/o": (4096, 4096, 2), "k/v": (4096, 1024, 2), "gate/up": (4096, 14336, 2), "down": (14336, 4096, 1)}
for phase, shapes in (("forward", fwd), ("backward", bwd)):
    tot_main = tot_epi = 0.0
    for name, (N, K, count) in shapes.items():
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        W = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
        u = torch.randn(T, R, device="cuda", dtype=torch.bfloat16)
        if phase == "forward":
            v = (torch.randn(N, R, device="cuda") * 0.02).to(torch.bfloat16).t()  # B.t()
            mask, sc = None, s
        else:
            v = (torch.randn(R, N, device="cuda") * 0.02).to(torch.bfloat16)  # A
            mask, sc = torch.rand(T, N, device="cuda") > 0.05, 1 / 0.95
        # forward: x [T,K] @ W.T [K,N]; backward: g [T,K] @ W [K,N] with W stored [K,N]: use a [K,N] matrix
        Wm = W.t() if phase == "forward" else torch.randn(K, N, device="cuda").mul(0.02).to(torch.bfloat16)
        def main():
            out = x @ Wm
            add_lora_product_(out, u, v, sc, mask)
            return out
        def epi():
            out = torch.empty(T, N, device="cuda", dtype=torch.bfloat16)
            add_lora_product_(out, u, v, sc, mask, accumulate=False)
            return out.addmm_(x, Wm)
        exact = x.double() @ Wm.double() + sc * ((u.double() @ v.double()) * (mask if mask is not None else 1))
        tm, km = kernel_us(main); te, ke = kernel_us(epi)
        tot_main += count * tm; tot_epi += count * te
        print(f"{phase} {name} (N={N}, K={K}): main {tm:.1f} us {km}; product first + beta=1 {te:.1f} us {ke}; "
              f"errors {rel(main(), exact):.2e} / {rel(epi(), exact):.2e}", flush=True)
    print(f"{phase}: one layer {tot_main:.0f} -> {tot_epi:.0f} us; 32 layers {32 * tot_main / 1000:.2f} -> "
          f"{32 * tot_epi / 1000:.2f} ms", flush=True)
