"""The fused 4-bit LoRA layer computes what PEFT's layer computes: same loss, same gradients,
same dropout draws, same saved adapter; and it hands anything it does not cover back to PEFT."""

import pytest
import torch

from mistral_qlora.config import RunConfig
from mistral_qlora.kernels.fused_lora import FusedLoraLinear4bit
from mistral_qlora.plan.layers import lora_layer

from testkit import load_tiny_base
from testkit.lora import loss_and_grads, lora_model, on


@pytest.mark.parametrize("dropout,checkpoint_layers", [(0.0, 0), (0.1, 0), (0.1, 2)])
def test_fused_layer_matches_peft(batch, dropout, checkpoint_layers):
    if dropout and torch.cuda.is_available():
        pytest.skip("on CUDA PEFT's dropout draws its masks from another point of the random stream")
    ref = lora_model(False, dropout, checkpoint_layers)
    fused = lora_model(True, dropout, checkpoint_layers)
    q_proj = fused.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, FusedLoraLinear4bit)
    assert type(ref.get_base_model().model.layers[0].self_attn.q_proj) is not FusedLoraLinear4bit
    assert fused.state_dict().keys() == ref.state_dict().keys()
    ref_loss, ref_grads = loss_and_grads(ref, batch)
    fused_loss, fused_grads = loss_and_grads(fused, batch)
    assert fused_loss == pytest.approx(ref_loss, rel=1e-5)
    layers = fused.config.num_hidden_layers
    assert ref_grads.keys() == fused_grads.keys() and len(ref_grads) == 2 * 7 * layers  # A and B of 7 linears
    for name, g in ref_grads.items():
        assert g.norm() > 0, name
        err = ((fused_grads[name] - g).norm() / g.norm()).item()
        assert err < 1e-4, (name, err)


def test_fused_layer_hands_other_cases_to_peft(batch):
    model = lora_model(True, 0.0)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, q_proj.in_features, device=q_proj.lora_A["default"].weight.device)
    assert q_proj.fused_plan((), {}) == ("default", 0.0)
    with model.disable_adapter():
        assert q_proj.fused_plan((), {}) is None
        torch.testing.assert_close(q_proj(x), q_proj.get_base_layer()(x))
    assert q_proj.fused_plan((), {"adapter_names": ["default"] * 3}) is None
    dropped = lora_model(True, 0.3).train()
    q_dropped = dropped.get_base_model().model.layers[0].self_attn.q_proj
    assert q_dropped.fused_plan((), {}) == ("default", 0.3)
    dropped.eval()  # dropout off in eval
    assert q_dropped.fused_plan((), {}) == ("default", 0.0)


def test_fused_adapter_loads_into_stock_peft(batch, tmp_path):
    from peft import PeftModel

    fused = lora_model(True, 0.0)
    fused.save_pretrained(tmp_path / "adapter")
    fused.eval()
    with torch.no_grad():
        want = fused(**on(fused, batch)).logits
    base = load_tiny_base()
    stock = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert type(stock.get_base_model().model.layers[0].self_attn.q_proj) is not FusedLoraLinear4bit
    with torch.no_grad():
        torch.testing.assert_close(stock(**on(stock, batch)).logits, want, rtol=1e-4, atol=1e-4)


def test_fused_lora_plan_says_when_and_why():
    def cfg(fused=True, bits=4):
        return RunConfig.model_validate({"lora": {"fused": fused}, "quantization": {"bits": bits}})

    layer, why = lora_layer(cfg(), "single")
    assert layer == "fused" and "fused" in why
    layer, why = lora_layer(cfg(fused=False), "single")
    assert layer == "peft" and "lora.fused=false" in why
    layer, why = lora_layer(cfg(bits=16), "ddp")
    assert layer == "peft" and "16-bit" in why
    for zero3 in ("zero3", "zero3_offload"):
        layer, why = lora_layer(cfg(), zero3)
        assert layer == "peft" and "ZeRO-3" in why


@pytest.mark.gpu
@pytest.mark.parametrize("rslora", [False, True])
def test_fused_layer_matches_peft_on_the_gpu_in_bf16(rslora):
    """One 7B-shaped linear (4096 -> 14336) on CUDA in bf16 under autocast, no dropout: the same
    output and gradients as PEFT's layer within bf16 rounding; with rsLoRA (scale alpha/sqrt(r)) too."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from mistral_qlora.kernels.fused_lora import register_fused_lora

    def build(fused):
        torch.manual_seed(0)
        lin = torch.nn.Sequential()
        lin.add_module("up", bnb.nn.Linear4bit(4096, 14336, bias=False, compute_dtype=torch.bfloat16,
                                               quant_type="nf4"))
        w = torch.randn(14336, 4096) * 0.02
        lin.up.weight = bnb.nn.Params4bit(w.to(torch.bfloat16), requires_grad=False, quant_type="nf4")
        lin = lin.cuda()
        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["up"], use_rslora=rslora)
        if fused:
            register_fused_lora(cfg)
        model = get_peft_model(lin, cfg)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
        return model

    x0 = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    results = []
    for fused in (False, True):
        model = build(fused).train()
        assert isinstance(model.base_model.model.up, FusedLoraLinear4bit) == fused
        assert model.base_model.model.up.scaling["default"] == (32 / 4 if rslora else 32 / 16)
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x)
        y.float().pow(2).mean().backward()
        grads = {k: p.grad.float() for k, p in model.named_parameters() if p.requires_grad}
        results.append((y.float(), x.grad.float(), grads))
    (y_ref, gx_ref, g_ref), (y, gx, g) = results
    errors = {"y": rel(y, y_ref), "grad x": rel(gx, gx_ref), **{k: rel(g[k], g_ref[k]) for k in g_ref}}
    print(errors)
    assert max(errors.values()) < 1e-2, errors


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_block_scales_are_kept_and_dequantize_as_bitsandbytes_does():
    import bitsandbytes as bnb

    from mistral_qlora.kernels.lora_autograd import dequantize

    model = lora_model(True, 0.0)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    weight = q_proj.get_base_layer().weight
    assert weight.quant_state.nested  # double quantization: 8-bit block scales
    scales = q_proj.block_scales()
    assert scales.dtype == torch.float32 and q_proj.block_scales() is scales  # computed once
    want = bnb.functional.dequantize_4bit(weight, weight.quant_state)
    assert torch.equal(dequantize(weight, scales, want.dtype), want)


@pytest.mark.parametrize("checkpoint_layers", [0, 2])
def test_kept_weights_skip_dequantization_and_change_nothing(batch, monkeypatch, checkpoint_layers):
    """Recomputing layers that keep their dequantized weights dequantize once per forward and
    once per recompute, never in backward; the layers kept for the run dequantize in the run's
    first forward and never again. Loss and gradients, step after step, are those of dequantizing
    every time."""
    from mistral_qlora.kernels import lora_autograd

    calls = []
    dequantize = lora_autograd.dequantize

    def counted(weight, absmax, dtype):
        calls.append(weight)
        return dequantize(weight, absmax, dtype)

    monkeypatch.setattr(lora_autograd, "dequantize", counted)
    results = {}
    for kept in (None, 0, 4):  # None: no layer keeps (dequantize again everywhere)
        plan = {"keep_weights": False} if kept is None else {"kept_for_run": kept}
        model = lora_model(True, 0.1, checkpoint_layers, **plan)
        layers = model.get_base_model().model.layers
        L = len(layers)
        flags = [[m.keep for m in layer.modules() if isinstance(m, FusedLoraLinear4bit)] for layer in layers]
        cache = [kept is not None and i >= max(checkpoint_layers, L - kept) for i in range(L)]
        keep = [kept is not None and i < checkpoint_layers or cache[i] for i in range(L)]
        assert flags == [["run" if c else "backward" if k else "none"] * 7 for k, c in zip(keep, cache)]
        # backward dequantizes for the layers that do not keep (layer 0's q/k/v read the frozen
        # embeddings and need no input gradient, unless checkpointing made them need one)
        backward = 7 * keep.count(False) - (3 if not keep[0] and not checkpoint_layers else 0)
        results[kept] = []
        for step in range(2):
            calls.clear()
            model.zero_grad(set_to_none=True)
            results[kept].append(loss_and_grads(model, batch))
            forward = 7 * L if step == 0 else 7 * cache.count(False)
            assert len(calls) == forward + 7 * checkpoint_layers + backward, (kept, step, len(calls))
    loss, grads = results[None][0]
    for kept, steps in results.items():
        for step_loss, step_grads in steps:
            assert step_loss == loss and all(torch.equal(step_grads[k], grads[k]) for k in grads), kept


def test_cached_weight_follows_its_4bit_weight_and_outlives_inference_mode(batch):
    """The run-long copy is made again when the 4-bit weight is replaced, and a copy first made
    under torch.inference_mode (an evaluation or a preview before training) can still be saved
    for backward."""
    model = lora_model(True, 0.0, kept_for_run=2)
    layer = model.get_base_model().model.layers[-1].mlp.up_proj
    assert layer.keep == "run"
    with torch.inference_mode():
        model(**on(model, batch))
    first = layer.dequantized_weight(torch.float32)
    assert not first.is_inference() and layer.dequantized_weight(torch.float32) is first
    loss_and_grads(model, batch)  # saves the copy for backward
    base = layer.get_base_layer()
    base.weight.data = base.weight.data.clone()
    again = layer.dequantized_weight(torch.float32)
    assert again is not first and torch.equal(again, first)


@pytest.mark.parametrize("checkpoint_layers", [0, 2])
def test_readers_of_one_input_sum_their_gradient_in_one_buffer(batch, monkeypatch, checkpoint_layers):
    """q/k/v (and gate/up) add their input gradients into one buffer and only the last one hands
    it to autograd; the gradients are those of autograd's own sum."""
    from mistral_qlora.kernels.lora_autograd import LoraLinear4bitFunction

    def grads_without_groups():
        model = lora_model(True, 0.1, checkpoint_layers, shared_input_grad=False)
        assert not any(getattr(m, "input_group", None) for m in model.modules())
        return loss_and_grads(model, batch)

    ref_loss, ref_grads = grads_without_groups()
    handed = []
    backward = LoraLinear4bitFunction.backward

    def recorded(ctx, grad_out):
        grads = backward(ctx, grad_out)
        handed.append(grads[0] is not None)
        return grads

    monkeypatch.setattr(LoraLinear4bitFunction, "backward", staticmethod(recorded))
    model = lora_model(True, 0.1, checkpoint_layers)
    layers = model.get_base_model().model.layers
    assert all(layer.self_attn.q_proj.input_group is layer.self_attn.v_proj.input_group is not None
               and layer.mlp.gate_proj.input_group is layer.mlp.up_proj.input_group for layer in layers)
    loss, grads = loss_and_grads(model, batch)
    assert loss == ref_loss
    for k in grads:  # the same sum, added in another order
        assert (grads[k] - ref_grads[k]).abs().max() <= 1e-5 * ref_grads[k].abs().max(), k
    # per layer: o_proj, down_proj and one of gate/up and of q/k/v hand a gradient; layer 0's
    # q/k/v need none (they read the frozen embeddings) unless checkpointing made them need one
    readers = 7 * len(layers)
    assert len(handed) == readers
    assert handed.count(True) == 4 * len(layers) - (0 if checkpoint_layers else 1)


def test_readers_given_different_tensors_keep_their_own_gradient():
    model = lora_model(True, 0.0)
    attn = model.get_base_model().model.layers[1].self_attn
    device = next(model.parameters()).device
    x = torch.randn(5, attn.q_proj.in_features, device=device, requires_grad=True)
    (attn.q_proj(x).sum() + attn.k_proj(x.clone()).sum()).backward()
    together = x.grad.clone()
    x.grad = None
    attn.q_proj(x).sum().backward()
    attn.k_proj(x).sum().backward()
    assert torch.allclose(x.grad, together, rtol=1e-5, atol=1e-7)
