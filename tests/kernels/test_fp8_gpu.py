"""FP8 on the GPU (kernels/fp8.py): the Triton kernels against their PyTorch reference, and the
error of the base's two matmuls against bf16 for every linear shape of Mistral-7B, on activations
and gradients captured from the 7B architecture and on activations with outlier channels.
Each test prints its measurements; docs/benchmarks.md quotes them. Skipped without a GPU that
runs FP8."""

from __future__ import annotations

import pytest
import torch

from mistral_qlora.plan.backends import fp8_problem

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or fp8_problem(torch.bfloat16) is not None,
                                 reason="needs a GPU with FP8 tensor cores")]

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def one_step_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where two e4m3 tensors differ by more than one rounding step (2**-3 of the value, or the
    subnormal step)."""
    a, b = a.float(), b.float()
    return (a - b).abs() > 2.0**-3 * b.abs() + 2.0**-9


@pytest.mark.parametrize("shape", [(8192, 4096), (8192, 14336), (77, 1000)])
@pytest.mark.parametrize("col_scale", [False, True])
def test_quantize_rows_kernel_is_the_reference(shape, col_scale):
    from mistral_qlora.kernels import fp8

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    x[3] = 0
    cs = torch.rand(shape[1], device="cuda", generator=gen) + 0.5 if col_scale else None
    got, want = fp8.quantize_rows(x, cs), fp8.quantize_rows_reference(x, cs)
    assert torch.allclose(got.scale, want.scale, rtol=1e-6, atol=0)
    differs = (got.data.float() != want.data.float()).float().mean().item()
    assert differs < 1e-4 and not one_step_apart(got.data, want.data).any(), differs


@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
def test_nf4_to_fp8_kernel_is_dequantize_then_quantize(shape):
    import bitsandbytes as bnb

    from mistral_qlora.kernels import fp8
    from mistral_qlora.kernels.lora_autograd import dequantize, dequantized_absmax, requantize_fp8

    torch.manual_seed(0)
    linear = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                               compress_statistics=True)
    linear.weight.data.normal_(0, 0.02)
    linear = linear.cuda()
    weight = linear.weight
    absmax = dequantized_absmax(weight)
    got = requantize_fp8(weight, absmax)
    want = fp8.quantize_rows_reference(dequantize(weight, absmax, torch.float32))
    assert torch.allclose(got.scale, want.scale, rtol=1e-6, atol=0)
    differs = (got.data.float() != want.data.float()).float().mean().item()
    assert differs < 1e-4 and not one_step_apart(got.data, want.data).any(), differs


@pytest.fixture(scope="module")
def captured():
    """Inputs and output gradients of every linear of the second decoder layer of
    random:mistral-7b (the first two layers loaded), on 4096 tokens of random ids (with random
    weights, which tokens they are does not matter)."""
    from mistral_qlora.config import ModelSection, QuantizationSection
    from mistral_qlora.model.base import load_base_model, load_model_config, resolve_model_path

    path = resolve_model_path("random:mistral-7b")
    config = load_model_config(path, ModelSection())
    config.num_hidden_layers = 2
    model = load_base_model(path, config, None, QuantizationSection(), "sdpa", torch.bfloat16,
                            device_map={"": 0})
    ids = torch.randint(3, config.vocab_size, (1, 4096), generator=torch.Generator().manual_seed(0)).cuda()
    layer = model.model.layers[1]
    modules = {name: getattr(layer.self_attn if name in LINEARS[:4] else layer.mlp, name) for name in LINEARS}
    got = {}
    hooks = []
    for name, m in modules.items():
        hooks.append(m.register_forward_hook(lambda mod, inp, out, n=name: got.__setitem__((n, "x"), inp[0].detach())))
        hooks.append(m.register_full_backward_hook(
            lambda mod, gin, gout, n=name: got.__setitem__((n, "g"), gout[0].detach())))
    model.enable_input_require_grads()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for h in hooks:
        h.remove()
    return {name: (m.weight, got[(name, "x")].reshape(-1, m.in_features),
                   got[(name, "g")].reshape(-1, m.out_features)) for name, m in modules.items()}


def test_fp8_matmul_error_per_7b_linear(captured):
    """Y = X W^T and dX = dY W in FP8 against bf16, per linear of Mistral-7B: on the captured
    activations, and on the same with 4 input channels 100x larger (outliers, as real models have)."""
    from mistral_qlora.kernels import fp8
    from mistral_qlora.kernels.lora_autograd import dequantize, dequantized_absmax, requantize_fp8

    rows = []
    for name, (weight, x, g) in captured.items():
        absmax = dequantized_absmax(weight)
        w = dequantize(weight, absmax, torch.bfloat16)
        w8 = requantize_fp8(weight, absmax)
        outliers = x.clone()
        outliers[:, torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(0))[:4]] *= 100
        errors = {}
        for kind, xs in (("captured", x), ("outliers", outliers)):
            y = fp8.fp8_linear(fp8.quantize_rows(xs), w8, torch.bfloat16)
            errors[kind] = rel(y, xs @ w.t())
        dx_err = rel(fp8.fp8_input_grad(g, w8), g @ w)
        rows.append((name, tuple(w.shape), errors["captured"], errors["outliers"], dx_err))
    print("\nlinear      W shape        Y rel.err  Y with outliers  dX rel.err")
    for name, shape, y, yo, dx in rows:
        print(f"{name:10s} {str(shape):14s} {y:9.4f} {yo:16.4f} {dx:11.4f}")
    for name, shape, y, yo, dx in rows:
        assert y < 0.06 and yo < 0.06 and dx < 0.06, (name, y, yo, dx)


def test_tiny_model_trains_in_fp8_on_the_gpu():
    """A few optimizer steps of the tiny model in bf16 with the base's matmuls in FP8 against the
    same in bf16: every loss within 2%."""
    from mistral_qlora.config import LoraSection
    from mistral_qlora.model.lora import add_lora
    from mistral_qlora.plan.layers import LayerPlan

    from testkit import load_tiny_base

    def losses(compute: str) -> list[float]:
        torch.manual_seed(0)
        base = load_tiny_base(dtype=torch.bfloat16, device_map={"": 0})
        model = add_lora(base, LoraSection(r=8, dropout=0.0),
                         LayerPlan(lora_layer="fused", recompute=1, kept_for_run=2, compute=compute))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ids = torch.randint(3, 32000, (1, 512), generator=torch.Generator().manual_seed(1)).cuda()
        out = []
        for _ in range(5):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    ref, got = losses("bf16"), losses("fp8")
    print("bf16", ref, "\nfp8 ", got)
    assert all(abs(a - b) < 0.02 * a for a, b in zip(got, ref))
