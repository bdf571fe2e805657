"""LoRA dropout drawn inside the rank-r A-projection: xa = (x * keep / (1-p)) @ A.T in one Triton
kernel, the keep mask from Philox four values a call (four column sub-blocks, one tl.dot each, so
no tensor is interleaved), stored as uint8 or not at all; against what the fused layer runs now:
torch.native_dropout (dropped copy + mask written) then cuBLAS's GEMM."""
import torch, triton, triton.language as tl

@triton.jit
def drop_proj_kernel(x_ptr, a_ptr, out_ptr, m_ptr, T, K, p32, scale, seed,
                     R: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, KSPLIT: tl.constexpr,
                     STORE_MASK: tl.constexpr, DOT_F32: tl.constexpr = False):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    Q: tl.constexpr = BK // 4
    rows = pid_t * BT + tl.arange(0, BT)
    row_ok = rows < T
    j = tl.arange(0, Q)
    rr = tl.arange(0, R)
    acc = tl.zeros((BT, R), tl.float32)
    k_per = tl.cdiv(K, KSPLIT * BK) * BK
    k_begin = pid_k * k_per
    for k0 in range(k_begin, k_begin + k_per, BK):
        # one Philox call for four columns: (row, k0/4 + j) -> columns k0 + s*Q + j, s = 0..3
        offs = (rows[:, None] * (K // 4) + (k0 // 4 + j)[None, :]).to(tl.uint32)
        r0, r1, r2, r3 = tl.randint4x(seed, offs, 10)
        for s in tl.static_range(4):
            r = r0 if s == 0 else (r1 if s == 1 else (r2 if s == 2 else r3))
            cols = k0 + s * Q + j
            ok = row_ok[:, None] & (cols < K)[None, :]
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=ok, other=0.0)
            keep = r >= p32
            xd = tl.where(keep, x.to(tl.float32) * scale, 0.0)
            if STORE_MASK:
                tl.store(m_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], keep.to(tl.int8), mask=ok)
            a = tl.load(a_ptr + rr[None, :] * K + cols[:, None], mask=(cols < K)[:, None], other=0.0)
            if DOT_F32:  # Triton's CPU interpreter mis-reads bf16 in tl.dot
                acc += tl.dot(xd, a.to(tl.float32))
            else:
                acc += tl.dot(xd.to(tl.bfloat16), a.to(tl.bfloat16))
    o = out_ptr + rows[:, None] * R + rr[None, :]
    if KSPLIT == 1:
        tl.store(o, acc, mask=row_ok[:, None])
    else:
        tl.atomic_add(o, acc, mask=row_ok[:, None])

def drop_proj(x, A, p, BT=64, BK=256, KSPLIT=4, store_mask=True, num_warps=4, seed=1234, dot_f32=False):
    T, K = x.shape
    R = A.shape[0]
    out = torch.zeros(T, R, device=x.device, dtype=torch.float32)
    m = torch.empty(T, K, device=x.device, dtype=torch.bool) if store_mask else out
    grid = (triton.cdiv(T, BT), KSPLIT)
    drop_proj_kernel[grid](x, A, out, m.view(torch.int8) if store_mask else out, T, K, int(p * 2**32),
                           1 / (1 - p), seed, R=R, BT=BT, BK=BK, KSPLIT=KSPLIT, STORE_MASK=store_mask, DOT_F32=dot_f32,
                           num_warps=num_warps)
    return out, (m if store_mask else None)

def bench(fn, iters=40):
    for _ in range(5): fn()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    torch.cuda.synchronize(); s.record()
    for _ in range(iters): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / iters * 1000

if __name__ == "__main__":
    p = 0.05
    for K in (4096, 14336):
        x = torch.randn(8192, K, device="cuda", dtype=torch.bfloat16)
        A = (torch.randn(16, K, device="cuda") / K ** 0.5).to(torch.bfloat16)
        def now():
            dx, mask = torch.native_dropout(x, p, True)
            return dx @ A.t()
        t0 = bench(now)
        td = bench(lambda: torch.native_dropout(x, p, True))
        print(f"[8192 x {K}] now: native_dropout + cuBLAS {t0:6.1f} us (dropout alone {td:6.1f})", flush=True)
        y, m = drop_proj(x, A, p)
        ref = ((x.float() * m / (1 - p)) @ A.float().t())
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        print(f"  check: keep {m.float().mean().item():.5f}, rel err against the same mask {err:.2e}", flush=True)
        for BT, BK, KS, nw in ((64, 256, 4, 4), (64, 256, 8, 4), (128, 256, 4, 8), (64, 512, 4, 8), (32, 256, 8, 4), (128, 128, 8, 4)):
            for sm in (True, False):
                try:
                    t = bench(lambda: drop_proj(x, A, p, BT, BK, KS, sm, nw))
                    print(f"  fused BT={BT:3d} BK={BK} split={KS} warps={nw} mask={'u8 ' if sm else 'no '}: {t:6.1f} us", flush=True)
                except Exception as exc:
                    print(f"  fused BT={BT} BK={BK} split={KS}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
