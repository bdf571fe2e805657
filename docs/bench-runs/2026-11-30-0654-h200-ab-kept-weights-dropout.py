# Record of the 06:35-06:54 A/B runs (docs/benchmarks.md). `K.dropout_kernel_usable` existed only in the
# tried dropout kernels (2026-11-30-0654-h200-dropout-kernels.diff); main has the kept-weights switch alone.
# One-process A/B on one model: redrawn dropout mask and kept dequantized weights, each on/off,
# variants interleaved, 8 timed rows a pass; peak memory per variant.
import sys, time, statistics
import torch
from mistral_qlora import bench as Bm
from mistral_qlora.modeling import fused_lora as F, lora_kernels as K, speed as S
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
usable = K.dropout_kernel_usable
fused = [m for m in model.modules() if isinstance(m, F.FusedLoraLinear4bit)]
print("fused layers", len(fused), "planned keep", sum(m.keep_dequantized_weight for m in fused))
def setv(redraw, keep):
    K.dropout_kernel_usable = usable if redraw else (lambda x: False)
    for m in fused:
        m.keep_dequantized_weight = bool(keep)
variants = {"HEAD (native dropout, dequantize again)": (0, 0), "+ packed dropout mask": (1, 0),
            "+ kept dequantized weights": (0, 1), "+ both": (1, 1)}
real = sum(Bm._real_and_slots(b)[0] for b in timed)
peak = {}
for name, v in variants.items():
    setv(*v)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    for b in warm: Bm.train_step(model, b, opt, params, device, dtype)
    torch.cuda.synchronize(); peak[name] = torch.cuda.max_memory_allocated() / 2**30
res = {k: [] for k in variants}
for cycle in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
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
    print(f"{name:42s} median {m:8,.0f} tok/s ({m / base - 1:+.1%})  peak {peak[name]:5.1f} GiB  passes " + " / ".join(f"{x:,.0f}" for x in r))
print(torch.cuda.get_device_name(), torch.__version__)
