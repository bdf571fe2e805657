"""LoRA dropout's kernel: torch.native_dropout (curand Philox4x32-10, four values a call) against
Triton kernels that write the same two outputs (the dropped bf16 copy, a bool mask): Philox with
10 and 7 rounds, four 32-bit or eight 16-bit values a call, and a floor with no random numbers
(mask = x > 0) that moves the same bytes."""
import torch, triton, triton.language as tl

@triton.jit
def drop_kernel(x_ptr, y_ptr, m_ptr, n, p16, p32, scale, seed, BLOCK: tl.constexpr, ROUNDS: tl.constexpr,
                MODE: tl.constexpr):
    pid = tl.program_id(0)
    Q: tl.constexpr = BLOCK // 4
    i = tl.arange(0, Q)
    base = pid.to(tl.int64) * BLOCK
    if MODE == 2:  # floor: no RNG
        for k in tl.static_range(4):
            o = base + k * Q + i
            ok = o < n
            x = tl.load(x_ptr + o, mask=ok, other=0.0)
            keep = x > 0
            tl.store(y_ptr + o, tl.where(keep, x.to(tl.float32) * scale, 0.0).to(y_ptr.dtype.element_ty), mask=ok)
            tl.store(m_ptr + o, keep.to(tl.int8), mask=ok)
    elif MODE == 0:  # four 32-bit values a call
        r0, r1, r2, r3 = tl.randint4x(seed, (pid * Q + i).to(tl.uint32), ROUNDS)
        for k in tl.static_range(4):
            r = r0 if k == 0 else (r1 if k == 1 else (r2 if k == 2 else r3))
            o = base + k * Q + i
            ok = o < n
            x = tl.load(x_ptr + o, mask=ok, other=0.0)
            keep = r >= p32
            tl.store(y_ptr + o, tl.where(keep, x.to(tl.float32) * scale, 0.0).to(y_ptr.dtype.element_ty), mask=ok)
            tl.store(m_ptr + o, keep.to(tl.int8), mask=ok)
    else:  # eight 16-bit values a call: BLOCK covers 8 sub-blocks of Q/2
        H: tl.constexpr = Q // 2
        j = tl.arange(0, H)
        r0, r1, r2, r3 = tl.randint4x(seed, (pid * H + j).to(tl.uint32), ROUNDS)
        for k in tl.static_range(8):
            rr = r0 if k // 2 == 0 else (r1 if k // 2 == 1 else (r2 if k // 2 == 2 else r3))
            r = (rr >> 16) if k % 2 == 1 else (rr & 0xFFFF)
            o = base + k * H + j
            ok = o < n
            x = tl.load(x_ptr + o, mask=ok, other=0.0)
            keep = r >= p16
            tl.store(y_ptr + o, tl.where(keep, x.to(tl.float32) * scale, 0.0).to(y_ptr.dtype.element_ty), mask=ok)
            tl.store(m_ptr + o, keep.to(tl.int8), mask=ok)

def triton_dropout(x, p, rounds, mode, block):
    y = torch.empty_like(x); m = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    n = x.numel()
    per = block if mode != 1 else block // 2  # mode 1: a program covers 8 * (block/8)... keep block elements
    grid = (triton.cdiv(n, block),)
    drop_kernel[grid](x, y, m.view(torch.int8), n, int(p * 65536), int(p * 2**32), 1 / (1 - p), 1234,
                      BLOCK=block, ROUNDS=rounds, MODE=mode, num_warps=4)
    return y, m

def bench(fn, iters=50):
    for _ in range(5): fn()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    torch.cuda.synchronize(); s.record()
    for _ in range(iters): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / iters * 1000

p = 0.05
for N in (4096, 14336):
    x = torch.randn(8192, N, device="cuda", dtype=torch.bfloat16)
    gb = x.numel() * 5 / 1e9
    t = bench(lambda: torch.native_dropout(x, p, True))
    print(f"[8192 x {N}] torch native_dropout: {t:6.1f} us ({gb / t * 1e6 / 1e3:.2f} TB/s)", flush=True)
    for mode, name in ((2, "floor (no RNG)"), (0, "4x32-bit"), (1, "8x16-bit")):
        for rounds in ((10,) if mode == 2 else (10, 7)):
            for block in (1024, 2048, 4096):
                try:
                    t = bench(lambda: triton_dropout(x, p, rounds, mode, block))
                except Exception as exc:
                    print(f"  {name} rounds {rounds} block {block}: failed {type(exc).__name__}: {str(exc)[:100]}"); continue
                print(f"  triton {name:14s} rounds {rounds:2d} block {block}: {t:6.1f} us ({gb / t * 1e6 / 1e3:.2f} TB/s)", flush=True)
    y, m = triton_dropout(x, p, 7, 1, 2048)
    keep = m.float().mean().item()
    ok = torch.equal(y[m], (x[m].float() * (1 / (1 - p))).to(torch.bfloat16)) and bool((y[~m] == 0).all())
    print(f"  8x16-bit rounds 7: kept {keep:.5f} (expect {1 - p}), values right: {ok}", flush=True)
    y, m = triton_dropout(x, p, 10, 0, 2048)
    print(f"  4x32-bit rounds 10: kept {m.float().mean().item():.5f}", flush=True)
