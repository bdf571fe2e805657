"""Faster bit packing and unpacking for the dropout mask: 3-D tiles (8 consecutive mask bytes of a
packed byte on the last axis, loaded contiguously) instead of strided or gathered byte loads."""
import os
import torch, triton, triton.language as tl
INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def pack3_kernel(m_ptr, bits_ptr, T, K, BT: tl.constexpr, BKB: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    bcol = pid_k * BKB + tl.arange(0, BKB)
    b = tl.arange(0, 8)
    KB = tl.cdiv(K, 8)
    row_ok = rows < T
    c = bcol[None, :, None] * 8 + b[None, None, :]
    m = tl.load(m_ptr + rows[:, None, None].to(tl.int64) * K + c, mask=row_ok[:, None, None] & (c < K), other=0)
    bits = tl.sum((m != 0).to(tl.int32) << b[None, None, :], axis=2)
    tl.store(bits_ptr + rows[:, None].to(tl.int64) * KB + bcol[None, :], bits.to(tl.uint8),
             mask=row_ok[:, None] & (bcol < KB)[None, :])


@triton.jit
def pack64_kernel(w_ptr, bits_ptr, T, KB, BT: tl.constexpr, BKB: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    bcol = pid_k * BKB + tl.arange(0, BKB)
    ok = (rows < T)[:, None] & (bcol < KB)[None, :]
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * KB + bcol[None, :], mask=ok, other=0)
    bits = tl.zeros((BT, BKB), tl.int64)
    for i in tl.static_range(8):
        bits |= ((w >> (8 * i)) & 1) << i
    tl.store(bits_ptr + rows[:, None].to(tl.int64) * KB + bcol[None, :], bits.to(tl.uint8), mask=ok)


def pack3(m, BT=32, BKB=64, nw=4):
    T, K = m.shape
    bits = torch.empty(T, (K + 7) // 8, device=m.device, dtype=torch.uint8)
    pack3_kernel[(triton.cdiv(T, BT), triton.cdiv((K + 7) // 8, BKB))](m.view(torch.uint8), bits, T, K, BT=BT, BKB=BKB, num_warps=nw)
    return bits


def pack64(m, BT=32, BKB=64, nw=4):
    T, K = m.shape
    KB = K // 8
    bits = torch.empty(T, KB, device=m.device, dtype=torch.uint8)
    pack64_kernel[(triton.cdiv(T, BT), triton.cdiv(KB, BKB))](m.view(torch.uint8).view(torch.int64), bits, T, KB, BT=BT, BKB=BKB, num_warps=nw)
    return bits


@triton.jit
def product_kernel(out_ptr, u_ptr, v_ptr, mask_ptr, T, N, R, scale, s_out, s_u, s_vr, s_vn, s_m,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, MODE: tl.constexpr):
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
    if MODE == 0:  # bool mask
        keep = tl.load(mask_ptr + rows[:, None].to(tl.int64) * s_m + cols[None, :], mask=tile, other=0)
        acc = tl.where(keep != 0, acc, 0.0)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * s_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile)
    elif MODE == 1:  # bits, gathered
        byte = tl.load(mask_ptr + rows[:, None].to(tl.int64) * s_m + (cols // 8)[None, :], mask=tile, other=0)
        keep = (byte.to(tl.int32) >> (cols % 8)[None, :]) & 1
        acc = tl.where(keep != 0, acc, 0.0)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * s_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile)
    elif MODE == 2:  # bits: bytes loaded contiguously, expanded to 3-D, keep reshaped to 2-D
        bc = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        byte = tl.load(mask_ptr + rows[:, None].to(tl.int64) * s_m + bc[None, :],
                       mask=row_ok[:, None] & (bc < tl.cdiv(N, 8))[None, :], other=0)
        keep3 = (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
        keep = tl.reshape(keep3, (BLOCK_T, BLOCK_N))
        acc = tl.where(keep != 0, acc, 0.0)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * s_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile)
    else:  # bits: acc reshaped to 3-D, stored with 3-D pointers
        bc = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        b = tl.arange(0, 8)
        byte = tl.load(mask_ptr + rows[:, None].to(tl.int64) * s_m + bc[None, :],
                       mask=row_ok[:, None] & (bc < tl.cdiv(N, 8))[None, :], other=0)
        keep3 = (byte.to(tl.int32)[:, :, None] >> b[None, None, :]) & 1
        acc3 = tl.reshape(acc, (BLOCK_T, BLOCK_N // 8, 8))
        acc3 = tl.where(keep3 != 0, acc3, 0.0)
        c3 = bc[None, :, None] * 8 + b[None, None, :]
        tl.store(out_ptr + rows[:, None, None].to(tl.int64) * s_out + c3, acc3.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None, None] & (c3 < N))


def product(out, u, v, scale, mask, mode, BT=32, BN=256, nw=4):
    T, N = out.shape
    R = u.shape[1]
    m = mask.view(torch.uint8)
    grid = (triton.cdiv(T, BT), triton.cdiv(N, BN))
    product_kernel[grid](out, u, v, m, T, N, R, scale, out.stride(0), u.stride(0), v.stride(0), v.stride(1), m.stride(0),
                         BLOCK_T=BT, BLOCK_N=BN, BLOCK_R=16, MODE=mode, num_warps=nw)
    return out


def unpack_ref(bits, K):
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits[:, :, None] >> shifts) & 1).reshape(bits.shape[0], -1)[:, :K].bool()


def bench(fn, iters=50):
    for _ in range(5):
        fn()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    torch.cuda.synchronize(); s.record()
    for _ in range(iters):
        fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / iters * 1000


def check(T, K, R, dev, dt):
    torch.manual_seed(0)
    m = torch.rand(T, K, device=dev) < 0.95
    b3 = pack3(m)
    ok = torch.equal(unpack_ref(b3, K), m)
    ok64 = torch.equal(pack64(m), b3) if K % 8 == 0 else True
    u = torch.randn(T, R, device=dev, dtype=dt)
    v = torch.randn(R, K, device=dev, dtype=dt)
    outs = [product(torch.empty(T, K, device=dev, dtype=dt), u, v, 1.3, m if mode == 0 else b3, mode) for mode in range(4)]
    same = [torch.equal(outs[0], o) for o in outs[1:]]
    print(f"check {T}x{K} r{R}: pack3 {ok}, pack64 {ok64}, product modes equal {same}", flush=True)
    assert ok and ok64 and all(same)


def main():
    if INTERP:
        for T, K, R in [(40, 72, 8), (33, 264, 16), (32, 512, 16)]:
            check(T, K, R, "cpu", torch.float32)
        return
    dev = "cuda"
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for T, K, R in [(8192, 4096, 16), (8192, 14336, 16), (1000, 1000, 8)]:
        check(T, K, R, dev, torch.bfloat16)
    for K in (4096, 14336):
        T = 8192
        x = torch.randn(T, K, device=dev, dtype=torch.bfloat16)
        A = torch.randn(16, K, device=dev, dtype=torch.bfloat16)
        ga = torch.randn(T, 16, device=dev, dtype=torch.bfloat16)
        _, mask = torch.native_dropout(x, 0.05, True)
        bits = pack3(mask)
        out = torch.empty_like(x)
        res = {"native_dropout": bench(lambda: torch.native_dropout(x, 0.05, True)),
               "copy of the bool mask (floor for reading it)": bench(lambda: mask.view(torch.uint8).clone())}
        for cfg in [(32, 64, 4), (16, 128, 4), (64, 64, 4), (32, 128, 4), (64, 128, 8), (128, 64, 8)]:
            res[f"pack3 {cfg}"] = bench(lambda: pack3(mask, *cfg))
            res[f"pack64 {cfg}"] = bench(lambda: pack64(mask, *cfg))
        for mode in range(4):
            for cfg in [(32, 256, 4), (64, 128, 4), (32, 128, 4), (64, 256, 8)]:
                m = mask if mode == 0 else bits
                res[f"product mode {mode} {cfg}"] = bench(lambda: product(out, ga, A, 1.0, m, mode, *cfg))
        print(f"\n8192 x {K} (us):", flush=True)
        for k, v in res.items():
            print(f"  {k:50s} {v:8.1f}", flush=True)


main()
