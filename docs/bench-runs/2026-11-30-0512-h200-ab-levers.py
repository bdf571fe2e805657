# Measurement record (2026-11-30, H200, main at 135b0ca): the one-process A/B of docs/benchmarks.md.
# Run on the GPU machine from the project root: PYTHONPATH=src python docs/bench-runs/2026-11-30-0512-h200-ab-levers.py 4
# It switches the levers off by replacing internals (old_add emulates 3a8bb64's fused layer); not part of the package.
# A/B in one process on one model: each lever on/off, variants interleaved, 8 timed rows a pass.
import sys, time, statistics, itertools
import torch
from mistral_qlora import bench as Bm
from mistral_qlora.modeling import attention as A, fused_lora as F, lora_kernels as K
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
new_add = F._add_product
def old_add(out, u, v, scale, mask=None):
    if mask is None:
        out.addmm_(u, v, alpha=scale)
    else:
        K.BLOCK_T, K.BLOCK_N = 64, 128
        K.add_lora_product_(out, u, v, scale, mask)
        K.BLOCK_T, K.BLOCK_N = 32, 256
def setv(prod, gqa):
    F._add_product = new_add if prod else old_add
    A._kernel(); A._GQA = "direct" if gqa else "repeat"
variants = {"HEAD (addmm_ fwd, 64x128 bwd, repeat K/V)": (0, 0), "+ product kernel": (1, 0), "+ direct GQA": (0, 1), "+ both": (1, 1)}
real = sum(Bm._real_and_slots(b)[0] for b in timed)
for v in variants.values():
    setv(*v)
    for b in warm: Bm.train_step(model, b, opt, params, device, dtype)
torch.cuda.synchronize()
print("GQA mode after warm-up:", A._GQA)
res = {k: [] for k in variants}
for cycle in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    for name, v in variants.items():
        setv(*v)
        Bm.train_step(model, timed[-1], opt, params, device, dtype); torch.cuda.synchronize()
        t = time.perf_counter()
        for b in timed: Bm.train_step(model, b, opt, params, device, dtype)
        torch.cuda.synchronize()
        res[name].append(real / (time.perf_counter() - t))
for name, r in res.items():
    print(f"{name:45s} median {statistics.median(r):8,.0f} tok/s  passes " + " / ".join(f"{x:,.0f}" for x in r))
print(torch.cuda.get_device_name(), "peak GiB", torch.cuda.max_memory_allocated() / 2**30)
