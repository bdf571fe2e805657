"""Why the steady step (480 ms) is longer than the profiled step's kernel time (447 ms) when the host
is not what it waits on: the SM clock and power while steps run back to back, and one step profiled
after others back to back (no sync before it) against one profiled after an idle second."""
import subprocess, time, statistics, collections, torch
from transformers import AutoConfig
from mistral_qlora import bench as Bm
from mistral_qlora.bench_compare import compare_recipe
from mistral_qlora.modeling.attention import TAKES_CU_SEQLENS
from mistral_qlora.modeling.model import resolve_dtype
from torch.profiler import profile, ProfilerActivity

opts = Bm.BenchOptions(model="random:mistral-7b")
dtype = resolve_dtype(opts.dtype)
recipe = compare_recipe(opts, dtype)
path = Bm.resolve_bench_model(opts)
sample = Bm.build_sample(opts, path, AutoConfig.from_pretrained(path).vocab_size)
model = Bm.load_recipe_model(path, opts, recipe, dtype)
Bm.set_attention(model, recipe.attention)
device, params, optimizer, ac = Bm.training_setup(model, opts, dtype)
warm, timed = Bm.recipe_batches(sample, recipe, opts, 0, cu=recipe.attention in TAKES_CU_SEQLENS)
for b in warm:
    Bm.train_step(model, b, optimizer, params, device, ac)
Bm._sync(device)
smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active",
                        "--format=csv,noheader", "-lms", "100"], stdout=subprocess.PIPE, text=True)
time.sleep(1.0)
s = time.perf_counter()
for _ in range(4):
    for b in timed:
        Bm.train_step(model, b, optimizer, params, device, ac)
Bm._sync(device)
el = time.perf_counter() - s
time.sleep(0.5)
smi.terminate(); lines = smi.stdout.read().strip().splitlines()
print(f"32 steps back to back: {el*1000/32:.1f} ms a step", flush=True)
for l in lines: print("  smi", l)

def kernel_ms(prof):
    tot = collections.Counter(); n = 0
    for e in prof.events():
        if e.device_type.name == "CUDA":
            name = e.name.lower()
            kind = next((k for k, keys in Bm.PROFILE_CATEGORIES if any(w in name for w in keys)), "other")
            tot[kind] += (e.time_range.end - e.time_range.start) / 1000
    return tot

for label, idle in (("after 1 s idle", True), ("back to back", False)):
    if idle:
        Bm._sync(device); time.sleep(1.0)
    else:
        for b in timed[:6]:
            Bm.train_step(model, b, optimizer, params, device, ac)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        Bm.train_step(model, timed[7], optimizer, params, device, ac)
        Bm._sync(device)
    tot = kernel_ms(prof)
    print(f"profiled step {label}: kernels {sum(tot.values()):.1f} ms: " + ", ".join(f"{k} {v:.1f}" for k, v in tot.most_common()), flush=True)
    top = collections.Counter(); cnt = collections.Counter()
    for e in prof.events():
        if e.device_type.name == "CUDA":
            top[e.name[:100]] += (e.time_range.end - e.time_range.start) / 1000; cnt[e.name[:100]] += 1
    for n, v in top.most_common(40 if not idle else 0): print(f"  {v:7.2f} ms {cnt[n]:5d}x {n}")
