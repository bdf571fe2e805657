"""LoRA dropout without the dropped copy: the keep mask drawn by bernoulli_, x read with the mask
inside the A-projection (Triton), the mask packed to bits there; backward's dA from x and the bits,
and the input-gradient product reading bits. Against what the fused layer runs now."""
import os, sys, time
import torch, triton, triton.language as tl

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def proj_pack_kernel(x_ptr, m_ptr, a_ptr, xa_ptr, bits_ptr, T, K, R, scale,
                     RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, KSPLIT: tl.constexpr,
                     DOT_F32: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    row_ok = rows < T
    rr = tl.arange(0, RP)
    kk = tl.arange(0, BK)
    k8 = tl.arange(0, BK // 8)
    KB = tl.cdiv(K, 8)
    acc = tl.zeros((BT, RP), tl.float32)
    k_per = tl.cdiv(K, KSPLIT * BK) * BK
    k_begin = pid_k * k_per
    for k0 in range(k_begin, k_begin + k_per, BK):
        cols = k0 + kk
        ok = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=ok, other=0.0)
        m = tl.load(m_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=ok, other=0)
        xd = tl.where(m != 0, x, 0.0)
        a = tl.load(a_ptr + rr[None, :] * K + cols[:, None], mask=(cols < K)[:, None] & (rr < R)[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(xd.to(tl.float32), a.to(tl.float32))
        else:
            acc += tl.dot(xd, a)
        bcol = k0 // 8 + k8
        bits = tl.zeros((BT, BK // 8), tl.int32)
        for b in tl.static_range(8):
            c = bcol * 8 + b
            mb = tl.load(m_ptr + rows[:, None].to(tl.int64) * K + c[None, :],
                         mask=row_ok[:, None] & (c < K)[None, :], other=0)
            bits |= (mb != 0).to(tl.int32) << b
        tl.store(bits_ptr + rows[:, None].to(tl.int64) * KB + bcol[None, :], bits.to(tl.uint8),
                 mask=row_ok[:, None] & (bcol < KB)[None, :])
    acc = acc * scale
    o = xa_ptr + rows[:, None] * R + rr[None, :]
    om = row_ok[:, None] & (rr < R)[None, :]
    if KSPLIT == 1:
        tl.store(o, acc, mask=om)
    else:
        tl.atomic_add(o, acc, mask=om)


def proj_pack(x, m, A, scale, BT=32, BK=256, KSPLIT=8, num_warps=4):
    T, K = x.shape
    R = A.shape[0]
    RP = max(16, triton.next_power_of_2(R))
    xa = torch.zeros(T, R, device=x.device, dtype=torch.float32)
    bits = torch.empty(T, (K + 7) // 8, device=x.device, dtype=torch.uint8)
    grid = (triton.cdiv(T, BT), KSPLIT)
    proj_pack_kernel[grid](x, m.view(torch.uint8), A, xa, bits, T, K, R, scale, RP=RP, BT=BT, BK=BK,
                           KSPLIT=KSPLIT, DOT_F32=INTERP, num_warps=num_warps)
    return xa, bits


@triton.jit
def grad_a_kernel(ga_ptr, x_ptr, bits_ptr, out_ptr, T, N, R, scale,
                  RP: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, TSPLIT: tl.constexpr,
                  DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    rr = tl.arange(0, RP)
    tt = tl.arange(0, BT)
    NB = tl.cdiv(N, 8)
    acc = tl.zeros((RP, BN), tl.float32)
    t_per = tl.cdiv(T, TSPLIT * BT) * BT
    t_begin = pid_t * t_per
    for t0 in range(t_begin, t_begin + t_per, BT):
        rows = t0 + tt
        row_ok = rows < T
        g = tl.load(ga_ptr + rows[None, :].to(tl.int64) * R + rr[:, None], mask=row_ok[None, :] & (rr < R)[:, None],
                    other=0.0)
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], mask=ok, other=0.0)
        byte = tl.load(bits_ptr + rows[:, None].to(tl.int64) * NB + (cols // 8)[None, :], mask=ok, other=0)
        keep = (byte.to(tl.int32) >> (cols % 8)[None, :]) & 1
        xd = tl.where(keep != 0, x, 0.0)
        if DOT_F32:
            acc += tl.dot(g.to(tl.float32), xd.to(tl.float32))
        else:
            acc += tl.dot(g, xd)
    acc = acc * scale
    o = out_ptr + rr[:, None] * N + cols[None, :]
    om = (rr < R)[:, None] & col_ok[None, :]
    if TSPLIT == 1:
        tl.store(o, acc, mask=om)
    else:
        tl.atomic_add(o, acc, mask=om)


def grad_a(ga, x, bits, scale, BT=64, BN=128, TSPLIT=8, num_warps=4):
    T, N = x.shape
    R = ga.shape[1]
    RP = max(16, triton.next_power_of_2(R))
    out = torch.zeros(R, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(N, BN), TSPLIT)
    grad_a_kernel[grid](ga, x, bits, out, T, N, R, scale, RP=RP, BT=BT, BN=BN, TSPLIT=TSPLIT, DOT_F32=INTERP,
                        num_warps=num_warps)
    return out


@triton.jit
def product_kernel(out_ptr, u_ptr, v_ptr, mask_ptr, T, N, R, scale, s_out, s_u, s_vr, s_vn, s_m,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BITS: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < T
    col_ok = cols < N
    acc = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        u = tl.load(u_ptr + rows[:, None].to(tl.int64) * s_u + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        v = tl.load(v_ptr + ranks[:, None] * s_vr + cols[None, :].to(tl.int64) * s_vn, mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(u.to(tl.float32), v.to(tl.float32))
    tile = row_ok[:, None] & col_ok[None, :]
    acc = acc * scale
    if BITS:
        byte = tl.load(mask_ptr + rows[:, None].to(tl.int64) * s_m + (cols // 8)[None, :], mask=tile, other=0)
        keep = (byte.to(tl.int32) >> (cols % 8)[None, :]) & 1
    else:
        keep = tl.load(mask_ptr + rows[:, None].to(tl.int64) * s_m + cols[None, :], mask=tile, other=0)
    acc = tl.where(keep != 0, acc, 0.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * s_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile)


def product(out, u, v, scale, mask, bits):
    T, N = out.shape
    R = u.shape[1]
    m = mask.view(torch.uint8)
    grid = (triton.cdiv(T, 32), triton.cdiv(N, 256))
    product_kernel[grid](out, u, v, m, T, N, R, scale, out.stride(0), u.stride(0), v.stride(0), v.stride(1), m.stride(0),
                         BLOCK_T=32, BLOCK_N=256, BLOCK_R=16, BITS=bits, num_warps=4)
    return out


@triton.jit
def pack_kernel(m_ptr, bits_ptr, T, K, BT: tl.constexpr, BKB: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    bcol = pid_k * BKB + tl.arange(0, BKB)
    KB = tl.cdiv(K, 8)
    row_ok = rows < T
    bits = tl.zeros((BT, BKB), tl.int32)
    for b in tl.static_range(8):
        c = bcol * 8 + b
        mb = tl.load(m_ptr + rows[:, None].to(tl.int64) * K + c[None, :], mask=row_ok[:, None] & (c < K)[None, :], other=0)
        bits |= (mb != 0).to(tl.int32) << b
    tl.store(bits_ptr + rows[:, None].to(tl.int64) * KB + bcol[None, :], bits.to(tl.uint8), mask=row_ok[:, None] & (bcol < KB)[None, :])


def pack(m):
    T, K = m.shape
    bits = torch.empty(T, (K + 7) // 8, device=m.device, dtype=torch.uint8)
    pack_kernel[(triton.cdiv(T, 16), triton.cdiv((K + 7) // 8, 128))](m.view(torch.uint8), bits, T, K, BT=16, BKB=128)
    return bits


def unpack_ref(bits, K):
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits[:, :, None] >> shifts) & 1).reshape(bits.shape[0], -1)[:, :K].bool()


def bench(fn, iters=50):
    for _ in range(5):
        fn()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters * 1000


def check(T, K, R, dev, dtype):
    torch.manual_seed(0)
    p = 0.05
    ks = 1 / (1 - p)
    x = torch.randn(T, K, device=dev, dtype=dtype)
    A = torch.randn(R, K, device=dev, dtype=dtype) / K ** 0.5
    m = torch.empty(T, K, device=dev, dtype=torch.bool).bernoulli_(1 - p)
    xa, bits = proj_pack(x, m, A, ks)
    ref = (x.float() * m * ks) @ A.float().t()
    e1 = ((xa - ref).abs().max() / ref.abs().max()).item()
    ok_bits = torch.equal(unpack_ref(bits, K), m)
    bits2 = pack(m)
    ok_pack = torch.equal(bits, bits2)
    ga = torch.randn(T, R, device=dev, dtype=dtype)
    dA = grad_a(ga, x, bits, ks)
    refA = ga.float().t() @ (x.float() * m * ks)
    e2 = ((dA - refA).abs().max() / refA.abs().max()).item()
    out1 = torch.empty(T, K, device=dev, dtype=dtype)
    out2 = torch.empty(T, K, device=dev, dtype=dtype)
    product(out1, ga, A, ks, m, False)
    product(out2, ga, A, ks, bits, True)
    print(f"check T={T} K={K} R={R} {dtype}: xa rel {e1:.2e}, bits ok {ok_bits}, pack==proj {ok_pack}, dA rel {e2:.2e}, "
          f"product bits==bool {torch.equal(out1, out2)}", flush=True)
    assert e1 < 1e-2 and ok_bits and ok_pack and e2 < 1e-2 and torch.equal(out1, out2)


def main():
    if INTERP:
        for T, K, R in [(40, 72, 8), (64, 256, 16), (33, 100, 16)]:
            check(T, K, R, "cpu", torch.float32)
        return
    dev = "cuda"
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for T, K, R in [(8192, 4096, 16), (8192, 14336, 16), (1000, 1000, 8), (8192, 4096, 64)]:
        check(T, K, R, dev, torch.bfloat16)
    p = 0.05
    ks = 1 / (1 - p)
    for K in (4096, 14336):
        T, R = 8192, 16
        x = torch.randn(T, K, device=dev, dtype=torch.bfloat16)
        A = torch.randn(R, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
        ga = torch.randn(T, R, device=dev, dtype=torch.bfloat16)
        dx, mask = torch.native_dropout(x, p, True)
        m = torch.empty(T, K, device=dev, dtype=torch.bool).bernoulli_(1 - p)
        xa, bits = proj_pack(x, m, A, ks)
        out = torch.empty_like(x)
        res = {}
        res["fwd now: native_dropout + cuBLAS xa"] = bench(lambda: torch.native_dropout(x, p, True)[0] @ A.t())
        res["  native_dropout alone"] = bench(lambda: torch.native_dropout(x, p, True))
        res["  cuBLAS xa alone"] = bench(lambda: dx @ A.t())
        res["fwd packed-1: now + pack kernel"] = bench(lambda: (torch.native_dropout(x, p, True)[1], pack(mask), dx @ A.t()))
        res["  pack kernel alone"] = bench(lambda: pack(mask))
        res["  bernoulli_ bool alone"] = bench(lambda: torch.empty(T, K, device=dev, dtype=torch.bool).bernoulli_(1 - p))
        res["  bernoulli_ uint8 alone"] = bench(lambda: torch.empty(T, K, device=dev, dtype=torch.uint8).bernoulli_(1 - p))
        res["  rand < keep alone"] = bench(lambda: torch.rand(T, K, device=dev) < (1 - p))
        for cfg in [(32, 256, 8, 4), (32, 128, 8, 4), (64, 256, 4, 4), (64, 128, 8, 4), (32, 256, 4, 4), (16, 256, 8, 4), (64, 256, 8, 8)]:
            BT, BK, KS, nw = cfg
            res[f"  proj_pack alone {cfg}"] = bench(lambda: proj_pack(x, m, A, ks, BT, BK, KS, nw))
        best = min((v, k) for k, v in res.items() if k.startswith("  proj_pack"))
        cfg = eval(best[1].split("alone ")[1])
        res[f"fwd packed-2: bernoulli_ + proj_pack {cfg}"] = bench(
            lambda: proj_pack(x, torch.empty(T, K, device=dev, dtype=torch.bool).bernoulli_(1 - p), A, ks, *cfg))
        res["bwd dA now: cuBLAS ga.T @ dropped"] = bench(lambda: ga.t() @ dx)
        for cfg in [(64, 128, 8, 4), (64, 64, 8, 4), (128, 128, 4, 8), (64, 128, 16, 4), (32, 128, 8, 4), (64, 256, 8, 8)]:
            res[f"  grad_a {cfg}"] = bench(lambda: grad_a(ga, x, bits, ks, *cfg))
        res["bwd product, bool mask"] = bench(lambda: product(out, ga, A, ks, mask, False))
        res["bwd product, bits"] = bench(lambda: product(out, ga, A, ks, bits, True))
        print(f"\n8192 x {K}, r=16, p=0.05 (us):", flush=True)
        for k, v in res.items():
            print(f"  {k:60s} {v:8.1f}", flush=True)


main()
