"""Is the fast step host-bound? (1) back-to-back passes of 8 rows with a busy-wait of d us added to
the host's work in every fused LoRA forward and backward (448 calls a step): the slope of step time
against the added host time is the share of the step the GPU waits on the host; (2) the same model
on 1024-token rows: the GPU work shrinks 8x, the host work per step stays, so that step time is
close to the host's time per step."""
import sys, time, statistics, torch
from transformers import AutoConfig
from mistral_qlora import bench as Bm
from mistral_qlora.bench_compare import compare_recipe
from mistral_qlora.modeling.attention import TAKES_CU_SEQLENS
from mistral_qlora.modeling.model import resolve_dtype
from mistral_qlora.modeling import fused_lora as F

DELAY_NS = [0]
def spin():
    d = DELAY_NS[0]
    if d:
        t = time.perf_counter_ns()
        while time.perf_counter_ns() - t < d:
            pass
fwd, bwd = F.FusedLoraLinear4bit.forward, F.LoraLinear4bitFunction.backward
def fwd2(self, x, *a, **k):
    spin(); return fwd(self, x, *a, **k)
def bwd2(ctx, g):
    spin(); return bwd(ctx, g)
F.FusedLoraLinear4bit.forward = fwd2
F.LoraLinear4bitFunction.backward = staticmethod(bwd2)

opts = Bm.BenchOptions(model="random:mistral-7b")
dtype = resolve_dtype(opts.dtype)
recipe = compare_recipe(opts, dtype)
path = Bm.resolve_bench_model(opts)
vocab = AutoConfig.from_pretrained(path).vocab_size
sample = Bm.build_sample(opts, path, vocab)
model = Bm.load_recipe_model(path, opts, recipe, dtype)
Bm.set_attention(model, recipe.attention)
device, params, optimizer, ac = Bm.training_setup(model, opts, dtype)
cu = recipe.attention in TAKES_CU_SEQLENS

def passes(batches, n=3):
    out = []
    for _ in range(n):
        Bm._sync(device); s = time.perf_counter()
        for b in batches:
            Bm.train_step(model, b, optimizer, params, device, ac)
        Bm._sync(device)
        out.append((time.perf_counter() - s) * 1000 / len(batches))
    return out

warm, timed = Bm.recipe_batches(sample, recipe, opts, 0, cu=cu)
for b in warm:
    Bm.train_step(model, b, optimizer, params, device, ac)
passes(timed, 1)
for rnd in range(2):
    for d in (0, 25, 50, 100):
        DELAY_NS[0] = d * 1000
        ms = passes(timed)
        print(f"8192-token rows, +{d:3d} us a fused call (+{d*448/1000:5.1f} ms host a step): step {statistics.median(ms):6.1f} ms  {[round(m,1) for m in ms]}", flush=True)
DELAY_NS[0] = 0
for T in (2048, 1024, 512):
    o2 = Bm.BenchOptions(model="random:mistral-7b", tokens_per_row=T, max_len=min(T, opts.max_len), timed_rows=16)
    s2 = Bm.build_sample(o2, path, vocab)
    w2, t2 = Bm.recipe_batches(s2, recipe, o2, 0, cu=cu)
    for b in w2:
        Bm.train_step(model, b, optimizer, params, device, ac)
    ms = passes(t2)
    print(f"{T}-token rows: step {statistics.median(ms):6.1f} ms  {[round(m,1) for m in ms]}", flush=True)
    for d in (50,):
        DELAY_NS[0] = d * 1000
        ms = passes(t2)
        print(f"{T}-token rows +{d} us a call: step {statistics.median(ms):6.1f} ms", flush=True)
    DELAY_NS[0] = 0
