# Measurement record (2026-11-30, H200): unprofiled step times of the fast recipe, then one step traced
# with CPU activity (GPU busy time, gaps, what launched the kernel after each gap). Not part of the package.
# One model, the fast recipe: unprofiled step times, then one step traced with CPU activity:
# GPU busy vs wall, the gaps and which host op launched the kernel after each gap.
import sys, time, json, statistics, collections
import torch
from mistral_qlora import bench as Bm
from mistral_qlora.modeling.attention import TAKES_CU_SEQLENS
from mistral_qlora.modeling.model import resolve_dtype
opts = Bm.BenchOptions(model="random:mistral-7b", recipes=None)
dtype = resolve_dtype("auto")
recipe = Bm.Recipe.parse(sys.argv[1] if len(sys.argv) > 1 else "packed+varlen+liger+ckpt=auto")
from mistral_qlora.modeling.speed import select_kernels
select_kernels("liger")
path = Bm.resolve_bench_model(opts)
from transformers import AutoConfig
sample = Bm.build_sample(opts, path, AutoConfig.from_pretrained(path).vocab_size)
model = Bm.load_recipe_model(path, opts, recipe, dtype)
Bm.set_attention(model, recipe.attention)
warm, timed = Bm.recipe_batches(sample, recipe, opts, 0, cu=recipe.attention in TAKES_CU_SEQLENS)
device = torch.device("cuda")
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
model.train()
for b in warm + timed: Bm.train_step(model, b, opt, params, device, dtype)
torch.cuda.synchronize()
ms = []
for b in timed + timed:
    t = time.perf_counter(); Bm.train_step(model, b, opt, params, device, dtype); torch.cuda.synchronize(); ms.append((time.perf_counter() - t) * 1000)
print("unprofiled step ms:", [round(m, 1) for m in ms], "median", round(statistics.median(ms), 1))
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    t = time.perf_counter(); Bm.train_step(model, timed[0], opt, params, device, dtype); torch.cuda.synchronize(); wall = (time.perf_counter() - t) * 1000
ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
cpu = [e for e in prof.events() if e.device_type.name == "CPU"]
ker = sorted(((e.time_range.start, e.time_range.end, e.name) for e in ev), key=lambda k: k[0])
busy, last_end, gaps = 0.0, None, []
for s, e, n in ker:
    if last_end is not None and s > last_end:
        gaps.append((s - last_end, n, s))
    busy += max(0, e - max(s, last_end or s)) if last_end is None or e > last_end else 0
    last_end = max(last_end or e, e)
span = (ker[-1][1] - ker[0][0]) / 1000
print(f"profiled wall {wall:.1f} ms, kernel span {span:.1f} ms, busy {busy/1000:.1f} ms, {len(ker)} kernels, gaps>5us {sum(1 for g in gaps if g[0] > 5)} totalling {sum(g[0] for g in gaps)/1000:.1f} ms")
by = collections.Counter()
for g, n, s in gaps:
    by[n.split('<')[0][:60]] += g
for n, g in by.most_common(15): print(f"  gap before {n}: {g/1000:.2f} ms")
# kinds
tot = collections.Counter()
for e in ev:
    name = e.name.lower()
    kind = next((k for k, keys in Bm.PROFILE_CATEGORIES if any(w in name for w in keys)), "other")
    tot[kind] += e.time_range.end - e.time_range.start
for k, v in tot.most_common(): print(f"  {k}: {v/1000:.1f} ms")
top = collections.Counter(); cnt = collections.Counter()
for e in ev: top[e.name[:90]] += e.time_range.end - e.time_range.start; cnt[e.name[:90]] += 1
for n, v in top.most_common(30): print(f"  {v/1000:7.2f} ms {cnt[n]:5d}x {n}")
