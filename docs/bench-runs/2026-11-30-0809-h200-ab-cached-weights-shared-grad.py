# One-process A/B on one model: kept dequantized weights (HEAD: dequantized in every forward,
# kept for backward) against the same weights cached across steps; variants interleaved, 8 timed
# rows a pass; then which aten ops launch the small elementwise/reduce/copy kernels.
import sys, time, statistics, collections
import torch
from mistral_qlora import bench as Bm
from mistral_qlora.modeling import fused_lora as F
from mistral_qlora.modeling.attention import TAKES_CU_SEQLENS
from mistral_qlora.modeling.model import resolve_dtype
from mistral_qlora.modeling.speed import select_kernels
from transformers import AutoConfig
opts = Bm.BenchOptions(model="random:mistral-7b")
dtype = resolve_dtype("auto")
recipe = Bm.Recipe.parse("packed+varlen+liger+ckpt=auto")
select_kernels("liger")
path = Bm.resolve_bench_model(opts)
sample = Bm.build_sample(opts, path, AutoConfig.from_pretrained(path).vocab_size)
model = Bm.load_recipe_model(path, opts, recipe, dtype)
Bm.set_attention(model, recipe.attention)
warm, timed = Bm.recipe_batches(sample, recipe, opts, 0, cu=recipe.attention in TAKES_CU_SEQLENS)
device = torch.device("cuda")
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
model.train()
fused = [m for m in model.modules() if isinstance(m, F.FusedLoraLinear4bit)]
planned = [m for m in fused if m.cache_dequantized_weight]
groups = {m: m.input_group for m in fused}
print("fused layers", len(fused), "keep", sum(m.keep_dequantized_weight for m in fused), "cache", len(planned),
      "grouped", sum(g is not None for g in groups.values()))
def setv(cache, grouped=1):
    for m in planned:
        m.cache_dequantized_weight = bool(cache)
        if not cache:
            m._dequantized = None; m._dequantized_key = None
    for m in fused:
        m.input_group = groups[m] if grouped else None
    torch.cuda.empty_cache()
variants = {"kept for backward, dequantized every forward (HEAD)": (0, 0), "+ cached across steps": (1, 0),
            "+ cached + one input-gradient buffer for q/k/v, gate/up": (1, 1)}
real = sum(Bm._real_and_slots(b)[0] for b in timed)
peak = {}
for name, v in variants.items():
    setv(*v)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    for b in warm: Bm.train_step(model, b, opt, params, device, dtype)
    torch.cuda.synchronize(); peak[name] = torch.cuda.max_memory_allocated() / 2**30
    print(name, "at rest", round(torch.cuda.memory_allocated() / 2**30, 1), "GiB", flush=True)
res = {k: [] for k in variants}
cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 4
for cycle in range(cycles):
    for name, v in variants.items():
        setv(*v)
        Bm.train_step(model, timed[-1], opt, params, device, dtype); torch.cuda.synchronize()
        t = time.perf_counter()
        for b in timed: Bm.train_step(model, b, opt, params, device, dtype)
        torch.cuda.synchronize()
        res[name].append(real / (time.perf_counter() - t))
base = statistics.median(res[next(iter(res))])
for name, r in res.items():
    m = statistics.median(r)
    print(f"{name:52s} median {m:8,.0f} tok/s ({m / base - 1:+.1%})  peak {peak[name]:5.1f} GiB  passes " + " / ".join(f"{x:,.0f}" for x in r), flush=True)

# Which ops launch the small kernels (both).
setv(1, 1)
from torch.profiler import ProfilerActivity, profile
Bm.train_step(model, timed[0], opt, params, device, dtype); torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
    Bm.train_step(model, timed[0], opt, params, device, dtype); torch.cuda.synchronize()
agg = collections.defaultdict(lambda: [0, 0.0])
for ev in prof.events():
    if ev.device_type != torch.autograd.DeviceType.CPU or not ev.kernels:
        continue
    chain, p = [], ev.cpu_parent
    while p is not None and len(chain) < 5:
        chain.append(p.name); p = p.cpu_parent
    for k in ev.kernels:
        kn = k.name
        if any(w in kn for w in ("elementwise", "reduce_kernel", "direct_copy", "Memset", "fill", "gather")) and "dropout" not in kn:
            key = (kn[:70], ev.name, str(ev.input_shapes)[:90], " < ".join(chain)[:160])
            agg[key][0] += 1; agg[key][1] += k.duration / 1000
for key, (n, ms) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:25]:
    print(f"{ms:7.2f} ms {n:4d}x {key[0]} | {key[1]} {key[2]} | {key[3]}")
print(torch.cuda.get_device_name(), torch.__version__)
