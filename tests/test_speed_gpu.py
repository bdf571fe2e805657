"""On a GPU: the fast path (varlen + Liger kernels + partial checkpointing) gives the reference
path's loss and gradients on the same packed batch, within bf16 tolerance. Runs in a fresh
process: Liger patches some of transformers' Mistral classes for the whole process."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

SCRIPT = r"""
import json, torch
from mistral_qlora.config import LoraSection, ModelSection, QuantizationSection
from mistral_qlora.data.collator import PackedCollator
from mistral_qlora.modeling.model import add_lora, load_base_model, resolve_model_path
from mistral_qlora.modeling.speed import apply_kernels

path = resolve_model_path("tiny-random-mistral")
gen = torch.Generator().manual_seed(0)
examples = []
for n in (300, 120, 500, 77):
    ids = [1] + torch.randint(3, 32000, (n - 1,), generator=gen).tolist()
    examples.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})

def run(attention, kernels, ckpt):
    torch.manual_seed(0)
    base = load_base_model(path, ModelSection(), QuantizationSection(), attention, torch.bfloat16, device_map={"": 0})
    apply_kernels(base, kernels)
    model = add_lora(base, LoraSection(r=8, dropout=0.0), checkpoint_layers=ckpt)
    model.train()
    batch = {k: v.cuda() if torch.is_tensor(v) else v
             for k, v in PackedCollator(with_cu_seqlens=attention == "varlen")([examples]).items()}
    n = (batch["labels"][..., 1:] != -100).sum()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch, num_items_in_batch=n).loss
    loss.backward()
    grads = {k: p.grad.float() for k, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads

ref_loss, ref_grads = run("sdpa", "none", 4)        # the reference path first (Liger patches classes)
fast_loss, fast_grads = run("varlen", "liger", 2)   # varlen + Liger + half the layers checkpointed
worst = max(((fast_grads[k] - g).norm() / (g.norm() + 1e-12)).item() for k, g in ref_grads.items())
print(json.dumps({"ref_loss": ref_loss, "fast_loss": fast_loss, "worst_relative_grad_error": worst}))
"""


def test_fast_path_matches_the_reference_loss_and_gradients():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert abs(result["fast_loss"] - result["ref_loss"]) < 0.02 * abs(result["ref_loss"])
    assert result["worst_relative_grad_error"] < 0.05
