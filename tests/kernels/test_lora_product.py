"""The Triton kernel for the fused LoRA layer's rank-r products computes what the PyTorch
expressions compute (forward `out + scaling * xa @ B.T`; backward under dropout
`grad_x + keep_scale * mask * (ga @ A)`), and the fused layer gives the same output and gradients
with it as without it. On the CPU the kernel runs in Triton's interpreter."""

import pytest
import torch

from mistral_qlora.kernels import fused_lora, lora_autograd
from mistral_qlora.kernels import lora_product as lora_kernels
from mistral_qlora.kernels.lora_product import add_lora_product_, lora_product_usable, triton_problem

pytestmark = pytest.mark.skipif(triton_problem() is not None, reason=str(triton_problem()))


@pytest.fixture
def device(monkeypatch):
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel is built (cached per mode)
    return "cpu"


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fused_nf4_layer(device, dropout: float):
    """A bf16 NF4 linear (4096 -> 14336 on the GPU, small in the interpreter) wrapped by the fused
    LoRA layer (r 16, B non-zero), in training mode, and its bf16 input [tokens x in]."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from mistral_qlora.model.base import keep_4bit_layout

    n_in, n_out, tokens = (4096, 14336, 8192) if device == "cuda" else (128, 192, 96)
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("up", bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"))
    w = torch.randn(n_out, n_in) * 0.02
    net.up.weight = bnb.nn.Params4bit(w.to(torch.bfloat16), requires_grad=False, quant_type="nf4")
    net = net.to(device)
    keep_4bit_layout(net)
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=["up"])
    fused_lora.register_fused_lora(cfg)
    model = get_peft_model(net, cfg).train()
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    x = torch.randn(tokens, n_in, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    return model, x.requires_grad_(True)


@pytest.mark.parametrize("masked", [True, False], ids=["backward-masked", "forward-transposed-B"])
@pytest.mark.parametrize("T,N,R,dtype", [(100, 300, 16, torch.bfloat16), (64, 128, 8, torch.float16),
                                         (70, 129, 40, torch.bfloat16)])
def test_kernel_matches_the_pytorch_expression(device, T, N, R, dtype, masked):
    gen = torch.Generator().manual_seed(T + N + R)
    gx, ga = (torch.randn(*s, generator=gen).to(device, dtype) for s in ((T, N), (T, R)))
    # backward: A [R x N] with contiguous rows; forward: B.t() of a [N x R] B (strides 1, R)
    A = torch.randn(R, N, generator=gen).to(device, dtype) if masked else torch.randn(N, R, generator=gen).to(device, dtype).t()
    mask = (torch.rand(T, N, generator=gen) > 0.1).to(device) if masked else None
    scale = 1 / 0.9 if masked else 2.0
    product = (ga.double() @ A.double()) * scale
    exact = gx.double() + (product * mask if masked else product)
    torch_path = gx.clone().addcmul_(ga @ A, mask, value=scale) if masked else gx.clone().addmm_(ga, A, alpha=scale)
    out = gx.clone()
    assert lora_product_usable(out)
    assert add_lora_product_(out, ga, A, scale, mask) is out
    # One rounding instead of two: on the GPU at least as close to the exact value as PyTorch's
    # path. Triton's CPU interpreter truncates when it converts to bf16 instead of rounding.
    slack = 1.05 if device == "cuda" else 2.0
    assert rel(out, exact) <= rel(torch_path, exact) * slack + 1e-6, (rel(out, exact), rel(torch_path, exact))
    assert rel(out, exact) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    if masked:
        dropped = ~mask  # where the mask drops a value the base gradient passes through untouched
        assert torch.equal(out[dropped], gx[dropped])


@pytest.mark.parametrize("masked", [True, False], ids=["backward-masked", "forward-transposed-B"])
def test_kernel_writes_the_product_without_reading_out(device, masked):
    """`accumulate=False`: out = scale * (mask *) (u @ v), whatever out held (NaN included), from
    the kernel and from the PyTorch fallback alike."""
    T, N, R = 100, 300, 16
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(T, R, generator=gen).to(device, torch.bfloat16)
    v = (torch.randn(R, N, generator=gen) if masked else torch.randn(N, R, generator=gen).t()).to(device, torch.bfloat16)
    mask = (torch.rand(T, N, generator=gen) > 0.1).to(device) if masked else None
    exact = (u.double() @ v.double()) * 1.5 * (mask if masked else 1)
    for write in (add_lora_product_, lora_kernels.add_lora_product_torch_):
        out = torch.full((T, N), float("nan"), dtype=torch.bfloat16, device=device)
        assert write(out, u, v, 1.5, mask, accumulate=False) is out
        assert torch.isfinite(out).all()
        assert rel(out, exact) < 1e-2, write.__name__
        if masked:
            assert (out[~mask] == 0).all()


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_kernel_adds_a_third_tensor_in_the_same_pass(device, masked):
    """`addend`: out += addend + scale * (mask *) (u @ v), the addend not masked, from the kernel
    and from the PyTorch fallback alike (the FP8 layer's input gradient joining a shared buffer)."""
    T, N, R = 100, 300, 16
    gen = torch.Generator().manual_seed(6)
    out0, addend = (torch.randn(T, N, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    u = torch.randn(T, R, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(R, N, generator=gen).to(device, torch.bfloat16)
    mask = (torch.rand(T, N, generator=gen) > 0.1).to(device) if masked else None
    exact = out0.double() + addend.double() + (u.double() @ v.double()) * 0.5 * (mask if masked else 1)
    for write in (add_lora_product_, lora_kernels.add_lora_product_torch_):
        out = out0.clone()
        assert write(out, u, v, 0.5, mask, addend=addend) is out
        assert rel(out, exact) < 1e-2, write.__name__
        if masked:
            dropped = ~mask
            assert torch.allclose(out[dropped].float(), (out0 + addend)[dropped].float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="addend"):
        add_lora_product_(out0.clone(), u, v, 0.5, addend=addend[:, :10])


def test_fused_layer_adds_its_gemm_onto_the_product_with_the_same_result(device, monkeypatch):
    """`product_first` (the default): the kernel writes the adapter's product and cuBLAS adds the
    base matmul onto it, forward and backward; output and gradients equal those of the GEMM-first
    order within bf16 rounding, with dropout (same masks) and without."""
    writes = []
    kernel = lora_kernels.add_lora_product_

    def spy(out, u, v, scale, mask=None, accumulate=True, addend=None):
        writes.append(accumulate)
        return kernel(out, u, v, scale, mask, accumulate, addend)

    monkeypatch.setattr(lora_autograd, "add_lora_product_", spy)

    def run(product_first: bool, dropout: float):
        model, x = fused_nf4_layer(device, dropout)
        model.base_model.model.up.configure(product_first=product_first)
        writes.clear()
        torch.manual_seed(3)
        y = model(x)
        y.float().pow(2).mean().backward()
        assert writes == [not product_first] * 2, writes  # forward and backward, in the order asked
        return y, x.grad, {k: p.grad for k, p in model.named_parameters() if p.requires_grad}

    for dropout in (0.0, 0.1):
        y_ref, gx_ref, g_ref = run(product_first=False, dropout=dropout)
        y, gx, g = run(product_first=True, dropout=dropout)
        errors = {"output": rel(y, y_ref), "grad x": rel(gx, gx_ref), **{k: rel(g[k], g_ref[k]) for k in g_ref}}
        print(dropout, errors)
        assert max(errors.values()) < 1e-2, errors


def test_kernel_refuses_what_it_does_not_compute(device):
    gx = torch.zeros(4, 8, dtype=torch.bfloat16, device=device)
    keep = torch.ones(4, 8, dtype=torch.bool, device=device)
    assert not lora_product_usable(gx.float())
    with pytest.raises(ValueError, match="shapes"):
        add_lora_product_(gx, torch.zeros(4, 2, dtype=gx.dtype, device=device),
                          torch.zeros(3, 8, dtype=gx.dtype, device=device), 1.0, keep)
    with pytest.raises(ValueError, match="contiguous rows"):
        add_lora_product_(gx.t().contiguous().t(), torch.zeros(4, 2, dtype=gx.dtype, device=device),
                          torch.zeros(2, 8, dtype=gx.dtype, device=device), 1.0, keep)
    with pytest.raises(ValueError, match="dtypes"):
        add_lora_product_(gx, torch.zeros(4, 2, device=device), torch.zeros(2, 8, dtype=gx.dtype, device=device),
                          1.0, keep)


def test_fused_layer_with_dropout_uses_the_kernel_and_keeps_its_gradients(device, monkeypatch):
    """A bf16 4-bit LoRA layer with dropout 0.1: output, input and LoRA gradients with the kernel
    equal those of the PyTorch expressions (same seed, so the same dropout masks) within bf16
    rounding."""

    def run(use_kernel: bool):
        model, x = fused_nf4_layer(device, 0.1)
        calls = []
        usable = lora_kernels.lora_product_usable

        def decide(g):
            calls.append(use_kernel and usable(g))
            return calls[-1]

        monkeypatch.setattr(lora_autograd, "lora_product_usable", decide)
        torch.manual_seed(3)  # the same dropout masks in both runs
        y = model(x)
        y.float().pow(2).mean().backward()
        # forward and backward, kernel as asked: with it, one decision a pass (the product written first);
        # without it, two (the product-first order refused, then the product added after the GEMM)
        assert calls == ([True] * 2 if use_kernel else [False] * 4), calls
        return y, x.grad, {k: p.grad for k, p in model.named_parameters() if p.requires_grad}

    y_ref, gx_ref, g_ref = run(use_kernel=False)
    y, gx, g = run(use_kernel=True)
    errors = {"output": rel(y, y_ref), "grad x": rel(gx, gx_ref), **{k: rel(g[k], g_ref[k]) for k in g_ref}}
    print(errors)
    assert max(errors.values()) < 1e-2, errors


def test_a_kernel_that_fails_to_compile_hands_over_to_pytorch(device, monkeypatch):
    """Triton compiles on first use; when its compiler fails (as Triton 3.6 does on Hopper for some
    layouts), the gradient still comes out right, a warning says why, and later calls go straight
    to PyTorch."""
    class Broken:
        calls = 0

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                Broken.calls += 1
                raise RuntimeError("PassManager::run failed")
            return launch

    monkeypatch.setattr(lora_kernels, "_kernel", lambda interpret: Broken())
    monkeypatch.setattr(lora_kernels, "_failed", {})
    gen = torch.Generator().manual_seed(0)
    gx, ga, A = (torch.randn(*s, generator=gen).to(device, torch.bfloat16) for s in ((64, 96), (64, 8), (8, 96)))
    mask = (torch.rand(64, 96, generator=gen) > 0.1).to(device)
    expected = gx.clone().addcmul_(ga @ A, mask, value=1 / 0.9)
    assert lora_product_usable(gx)
    with pytest.warns(RuntimeWarning, match="PassManager::run failed.*PyTorch expression"):
        out = add_lora_product_(gx.clone(), ga, A, 1 / 0.9, mask)
    assert torch.equal(out, expected) and Broken.calls == 1
    assert not lora_product_usable(gx)  # the fused layer now takes the PyTorch path itself
    assert lora_product_usable(gx.half())  # other dtypes still try the kernel
