"""Where one step of the fast recipe synchronises with the GPU, and the host's share: the step's
wall time against the GPU's busy time, and the host time to issue the step with the GPU ahead."""
import collections, time, traceback, warnings, torch
from transformers import AutoConfig
from mistral_qlora.bench import (BenchOptions, build_sample, load_recipe_model, recipe_batches, resolve_bench_model,
                                 set_attention, training_setup, train_step, _sync)
from mistral_qlora.bench_compare import compare_recipe
from mistral_qlora.modeling.attention import TAKES_CU_SEQLENS
from mistral_qlora.modeling.model import resolve_dtype

opts = BenchOptions(model="random:mistral-7b")
dtype = resolve_dtype(opts.dtype)
recipe = compare_recipe(opts, dtype)
path = resolve_bench_model(opts)
sample = build_sample(opts, path, AutoConfig.from_pretrained(path).vocab_size)
model = load_recipe_model(path, opts, recipe, dtype)
set_attention(model, recipe.attention)
warm, timed = recipe_batches(sample, recipe, opts, 0, cu=recipe.attention in TAKES_CU_SEQLENS)
device, params, optimizer, autocast_dtype = training_setup(model, opts, dtype)
for b in warm:
    train_step(model, b, optimizer, params, device, autocast_dtype)
_sync(device)
seen = collections.Counter()
def show(message, category, filename, lineno, file=None, line=None):
    stack = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-2]
             if "warnings" not in f.filename]
    seen[(str(message)[:60], " <- ".join(reversed(stack[-6:])))] += 1
warnings.showwarning = show
torch.cuda.set_sync_debug_mode("warn")
train_step(model, timed[0], optimizer, params, device, autocast_dtype)
torch.cuda.set_sync_debug_mode("default")
_sync(device)
for (msg, where), n in seen.items():
    print(f"{n}x {msg}\n    {where}", flush=True)
# pinned batches: does the host-to-device copy of a pageable batch stall the step?
for pin in (False, True):
    batches = [{k: (v.pin_memory() if pin and torch.is_tensor(v) else v) for k, v in b.items()} for b in timed]
    for rep in range(2):
        _sync(device); s = time.perf_counter()
        for b in batches:
            train_step(model, b, optimizer, params, device, autocast_dtype)
        _sync(device)
        print(f"pinned={pin}: {sum(b['input_ids'].numel() for b in timed) / (time.perf_counter() - s):,.0f} tok/s", flush=True)
