"""FP8 compute for the base weight's matmuls (kernels/fp8.py, `quantization.compute: fp8`).

On the CPU the FP8 math runs through its PyTorch reference: these tests hold it to the formula
(scales, rounding, the two matmuls), run the fused layer with it against the bf16 layer, and check
every place `fp8` is refused. The Triton kernels and the speed are tested on the GPU
(tests/test_fp8_gpu.py, `mistral-qlora bench`)."""

import dataclasses
import math

import pytest
import torch

from mistral_qlora.config import LoraSection, QuantizationSection, validate_config
from mistral_qlora.errors import UserError
from mistral_qlora.kernels import fp8
from mistral_qlora.kernels.fused_lora import FusedLoraLinear4bit
from mistral_qlora.kernels.lora_autograd import dequantize
from mistral_qlora.model.base import load_model_config
from mistral_qlora.model.lora import add_lora
from mistral_qlora.plan import make_plan
from mistral_qlora.plan.layers import LayerPlan
from mistral_qlora.runtime import Runtime

from testkit import load_tiny_base, run_cli, tiny_path
from testkit.lora import loss_and_grads

# e4m3 has 3 mantissa bits: rounding to nearest is off by at most 2**-4 of the value for normal
# numbers (magnitudes >= 2**-6 after scaling); below that, by half the subnormal step 2**-10.
HALF_ULP = 2.0**-4
SUBNORMAL_HALF_STEP = 2.0**-10


def test_rows_are_scaled_to_e4m3s_range_and_rounded_to_nearest():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, generator=gen) * torch.logspace(-3, 3, 64)[:, None]  # rows of any magnitude
    x[5] = 0.0
    q = fp8.quantize_rows_reference(x)
    assert q.data.dtype == torch.float8_e4m3fn and q.scale.shape == (64, 1)
    amax = x.abs().amax(dim=1, keepdim=True)
    assert torch.equal(q.scale[amax > 0], (amax / 448.0)[amax > 0])
    assert q.scale[5].item() == pytest.approx(fp8.MIN_SCALE) and torch.all(q.data[5].float() == 0)  # a zero row: zeros, no NaN
    scaled = x / q.scale
    # each row's largest magnitude maps to 448 exactly; nothing saturates
    assert torch.all(q.data.float().abs().amax(dim=1)[amax[:, 0] > 0] == 448.0)
    err = (q.data.float() - scaled).abs()
    bound = torch.maximum(HALF_ULP * scaled.abs(), torch.full_like(scaled, SUBNORMAL_HALF_STEP))
    assert torch.all(err <= bound * (1 + 1e-6))


def test_a_column_scale_is_applied_before_the_row_amax():
    gen = torch.Generator().manual_seed(1)
    g, cs = torch.randn(16, 40, generator=gen), torch.rand(40, generator=gen) + 0.5
    with_cs = fp8.quantize_rows_reference(g, col_scale=cs)
    applied = fp8.quantize_rows_reference(g * cs)
    assert torch.equal(with_cs.scale, applied.scale) and torch.equal(with_cs.data.float(), applied.data.float())


def test_the_two_matmuls_are_the_formula_and_near_bf16():
    gen = torch.Generator().manual_seed(2)
    T, K, N = 96, 256, 160
    x, w, g = torch.randn(T, K, generator=gen), torch.randn(N, K, generator=gen) * 0.02, torch.randn(T, N, generator=gen)
    xq, wq = fp8.quantize_rows(x), fp8.quantize_rows(w)
    y = fp8.fp8_linear(xq, wq, torch.float32)
    formula = (xq.data.double() * xq.scale.double()) @ (wq.data.double() * wq.scale.double()).t()
    assert torch.allclose(y.double(), formula, rtol=1e-5, atol=1e-6)

    dx = fp8.fp8_input_grad(g, wq)
    gq = fp8.quantize_rows_reference(g * wq.scale.reshape(1, -1))
    formula = (gq.data.double() * gq.scale.double()) @ wq.data.double()
    assert torch.allclose(dx.double(), formula, rtol=1e-5, atol=1e-6)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    # against the unquantized products: e4m3's rounding, a few percent (independent errors average out)
    assert rel(y, x @ w.t()) < 0.05
    assert rel(dx, g @ w) < 0.05


def test_nf4_row_scales_are_the_rows_dequantized_amax():
    """Every NF4 block's largest magnitude is its absmax, so a row's FP8 scale is known from the
    block scales alone: what lets the GPU kernel go from NF4 to e4m3 in one pass."""
    import bitsandbytes.functional as F

    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(3))
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    deq = F.dequantize_4bit(packed, state).float()
    assert torch.equal(fp8.nf4_row_scales(state.absmax, 48), deq.abs().amax(dim=1, keepdim=True) / 448.0)


def _fp8_model(compute: str, recompute: int = 0, kept_for_run: int = 0):
    torch.manual_seed(0)
    plan = LayerPlan(lora_layer="fused", recompute=recompute, kept_for_run=kept_for_run, compute=compute)
    model = add_lora(load_tiny_base(), LoraSection(r=8, dropout=0.0), plan)
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


class _Fp8Base(torch.autograd.Function):
    """The base's two matmuls as the module docstring of kernels/fp8.py writes them."""

    @staticmethod
    def forward(ctx, x, w8):
        ctx.w8 = w8
        return fp8.fp8_linear(fp8.quantize_rows_reference(x), w8, x.dtype)

    @staticmethod
    def backward(ctx, g):
        return fp8.fp8_input_grad(g, ctx.w8), None


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_fused_fp8_layer_is_the_formula(dropout):
    """One fused linear in FP8, forward and backward, against the formula written out with
    autograd: base = fp8(x) fp8(W)^T, adapter = scaling * dropout(x) A^T B^T in full precision."""
    torch.manual_seed(0)
    plan = LayerPlan(lora_layer="fused", recompute=0, compute="fp8")
    model = add_lora(load_tiny_base(), LoraSection(r=8, dropout=dropout), plan)
    layer = model.get_base_model().model.layers[1].mlp.gate_proj
    layer.lora_B["default"].weight.data.normal_(0, 0.05)
    model.train()
    x = torch.randn(2, 37, layer.in_features, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    got = (y.detach(), x.grad.clone(), layer.lora_A["default"].weight.grad.clone(),
           layer.lora_B["default"].weight.grad.clone())

    A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    weight = layer.get_base_layer().weight
    w8 = fp8.quantize_rows_reference(dequantize(weight, layer.block_scales(weight), torch.float32))
    x2 = x.detach().reshape(-1, x.shape[-1]).requires_grad_()
    torch.manual_seed(7)
    dropped = torch.native_dropout(x2, dropout, True)[0] if dropout else x2
    y_ref = _Fp8Base.apply(x2, w8) + layer.scaling["default"] * (dropped @ A.t()) @ B.t()
    y_ref.backward(g.reshape(y_ref.shape))
    want = (y_ref.detach().reshape(y.shape), x2.grad.reshape(x.shape), A.grad, B.grad)
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_readers_of_one_input_add_their_fp8_gradients_in_one_pass(monkeypatch, dropout):
    """gate and up read one input: up's FP8 input gradient and its adapter's share go into gate's
    buffer in one pass (the product kernel's `addend`), and the sum equals autograd's sum of the
    two linears' gradients computed each on its own."""
    from mistral_qlora.kernels import lora_autograd

    torch.manual_seed(0)
    plan = LayerPlan(lora_layer="fused", recompute=0, compute="fp8")
    model = add_lora(load_tiny_base(), LoraSection(r=8, dropout=dropout), plan).train()
    mlp = model.get_base_model().model.layers[1].mlp
    for layer in (mlp.gate_proj, mlp.up_proj):
        layer.lora_B["default"].weight.data.normal_(0, 0.05)
    assert mlp.gate_proj.input_group is mlp.up_proj.input_group is not None
    x = torch.randn(2, 37, mlp.gate_proj.in_features)
    gen = torch.Generator().manual_seed(5)
    g_gate, g_up = (torch.randn(2, 37, mlp.gate_proj.out_features, generator=gen) for _ in range(2))

    def x_grad():
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        ((mlp.gate_proj(xi) * g_gate).sum() + (mlp.up_proj(xi) * g_up).sum()).backward()
        return xi.grad

    addends = []
    product = lora_autograd.add_lora_product_torch_
    monkeypatch.setattr(lora_autograd, "add_lora_product_torch_",
                        lambda *a, **k: addends.append(k.get("addend") is not None) or product(*a, **k))
    shared = x_grad()
    assert addends.count(True) == 1  # the second reader joined the first one's buffer
    group = mlp.gate_proj.input_group
    for layer in (mlp.gate_proj, mlp.up_proj):
        layer.input_group = None
    alone = x_grad()
    for layer in (mlp.gate_proj, mlp.up_proj):
        layer.input_group = group
    assert torch.allclose(shared, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recompute,kept_for_run", [(0, 0), (2, 2)])
def test_the_fused_layer_in_fp8_trains_like_bf16(batch, monkeypatch, recompute, kept_for_run):
    """The whole tiny model, base matmuls in FP8 against the bf16 layer: the loss within 1%, the
    adapters' gradients pointing the same way; each input group's input quantized once.
    The tiny model's random linears have gains well above 1, so e4m3's few percent per matmul
    compound from layer to layer far more than in a trained model: the gradient bound is loose
    (a wrong scale or layout gives unrelated gradients; the GPU test and the 7B parity run in
    docs/benchmarks.md measure the error where it matters)."""
    ref_loss, ref_grads = loss_and_grads(_fp8_model("bf16", recompute, kept_for_run), batch)
    model = _fp8_model("fp8", recompute, kept_for_run)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, FusedLoraLinear4bit) and layer.compute == "fp8"

    calls = []
    quantize = fp8.quantize_rows
    for where in ("mistral_qlora.kernels.fused_lora.quantize_rows", "mistral_qlora.kernels.lora_autograd.quantize_rows",
                  "mistral_qlora.kernels.fp8.quantize_rows"):
        monkeypatch.setattr(where, lambda x, col_scale=None: calls.append(tuple(x.shape)) or quantize(x, col_scale))
    loss, grads = loss_and_grads(model, batch)
    assert math.isfinite(loss) and abs(loss - ref_loss) < 0.01 * abs(ref_loss)
    for name, g in grads.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0).item()
        assert cos > 0.8, (name, cos)
    # per decoder layer and forward: q/k/v share one quantized input, gate/up one, o and down one each
    # (4 inputs); backward quantizes each of the 7 output gradients; layers that recompute quantize
    # their inputs once more (layers kept for the run convert their weights once, outside these calls).
    # (on the CPU the weights are quantized by the same function: their calls have other row counts)
    n_layers, tokens = len(model.get_base_model().model.layers), batch["input_ids"].numel()
    # The first layer's q/k/v need no input gradient unless recompute made the embeddings' output
    # require one (model/lora.py: enable_input_require_grads).
    first_qkv = 0 if recompute else 3
    assert sum(rows == tokens for rows, _ in calls) == n_layers * (4 + 7) - first_qkv + recompute * 4


def test_fp8_weights_kept_for_the_run_are_the_e4m3_copy(batch):
    model = _fp8_model("fp8", kept_for_run=4)
    layer = model.get_base_model().model.layers[3].mlp.down_proj
    loss_and_grads(model, batch)
    kept = layer._fp8
    assert kept is not None and kept.data.dtype == torch.float8_e4m3fn and getattr(layer, "_dequantized", None) is None
    weight = layer.get_base_layer().weight
    want = fp8.quantize_rows_reference(dequantize(weight, layer.block_scales(weight), torch.float32))
    assert torch.equal(kept.scale, want.scale) and torch.equal(kept.data.float(), want.data.float())
    assert torch.equal(kept.data_t.float(), want.data.float().t())  # the layout the input gradient reads



def _plan(overrides: dict, monkeypatch, capability=None, strategy_env=None):
    cfg = validate_config(overrides, "test")
    mc = load_model_config(tiny_path(), cfg.model)
    rt = Runtime.detect("auto")
    if capability is not None:  # a CUDA machine of this compute capability, as far as the plan asks
        monkeypatch.setattr("mistral_qlora.plan.backends._cuda", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
        rt = dataclasses.replace(rt, dtype=torch.bfloat16)
    return make_plan(cfg, mc, rt, env=strategy_env or {})


def test_fp8_is_refused_on_the_cpu(monkeypatch):
    with pytest.raises(UserError, match=r"quantization.compute=fp8 needs a CUDA GPU with FP8 tensor cores.*"
                                        r"set quantization.compute=bf16"):
        _plan({"quantization": {"compute": "fp8"}}, monkeypatch)
    assert _plan({}, monkeypatch).layers.compute == "bf16"


def test_fp8_is_refused_before_hopper(monkeypatch):
    with pytest.raises(UserError, match=r"compute capability 9.0 or newer.*Test GPU is 8.9"):
        _plan({"quantization": {"compute": "fp8"}, "model": {"attention": "sdpa", "kernels": "none"}},
              monkeypatch, capability=(8, 9))


@pytest.mark.parametrize("overrides,why", [
    ({"lora": {"fused": False}}, "lora.fused=false"),
    ({"quantization": {"bits": 16}}, "16-bit base"),
])
def test_fp8_is_refused_without_the_fused_layer(monkeypatch, overrides, why):
    cfg = {"quantization": {"compute": "fp8", **overrides.get("quantization", {})},
           "model": {"attention": "sdpa", "kernels": "none"}, **{k: v for k, v in overrides.items() if k != "quantization"}}
    with pytest.raises(UserError, match=f"fused 4-bit LoRA layer only.*{why}"):
        _plan(cfg, monkeypatch, capability=(9, 0))


def test_fp8_is_refused_under_zero3(monkeypatch):
    from mistral_qlora.plan.layers import compute_for

    cfg = validate_config({"quantization": {"compute": "fp8"}}, "test")
    with pytest.raises(UserError, match="fused 4-bit LoRA layer only.*ZeRO-3"):
        compute_for(cfg, "peft", "zero3", None, torch.bfloat16)
    assert compute_for(cfg, "fused", "single", None, torch.bfloat16)[0] == "fp8"


def test_fp8_on_the_cpu_is_one_line_and_exit_2(small_dataset, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "configs/tiny.yaml", "--set", f"data.train={small_dataset}", "--set", f"output_dir={out}",
            "--set", "quantization.compute=fp8")
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "quantization.compute=fp8" in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()


def test_compute_is_a_config_key_with_two_values():
    assert QuantizationSection().compute == "bf16"
    with pytest.raises(UserError, match="quantization.compute"):
        validate_config({"quantization": {"compute": "fp16"}}, "test")
