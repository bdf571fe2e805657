"""Model FLOPs per token and MFU: the formula on Mistral-7B's shapes, the attention context with
and without a sliding window, and the peak table."""

import pytest

from mistral_qlora.flops import _mean_context, flops_per_token, lora_target_names, mfu, peak_flops


class Mistral7B:
    hidden_size, intermediate_size, num_hidden_layers, vocab_size = 4096, 14336, 32, 32000
    num_attention_heads, num_key_value_heads, head_dim, sliding_window = 32, 8, 128, None


def test_mean_context_counts_what_each_token_attends_to():
    assert _mean_context([4], None) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert _mean_context([4], 2) == pytest.approx((1 + 2 + 2 + 2) / 4)  # the window caps the context
    assert _mean_context([4, 2], None) == pytest.approx((10 + 3) / 6)


def test_flops_per_token_for_mistral_7b():
    linears = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 32000 * 4096
    lora = 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * 18432)
    one_token = flops_per_token(Mistral7B, 16, lora_target_names("all-linear"), [1])
    assert one_token == 4 * linears + 6 * lora + 32 * 12 * 1 * 4096
    assert one_token / 1e9 == pytest.approx(28.7, abs=0.1)  # ~4 x 7.2G frozen weights
    long = flops_per_token(Mistral7B, 16, lora_target_names("all-linear"), [4096])
    assert long - one_token == pytest.approx(32 * 12 * (4097 / 2 - 1) * 4096)
    q_only = flops_per_token(Mistral7B, 16, lora_target_names(["q_proj"]), [1])
    assert one_token - q_only == 6 * (lora - 32 * 16 * 8192)


def test_peak_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Tesla T4") is None and peak_flops(None) is None
    assert peak_flops("Tesla T4", override_tflops=65) == 65e12
    assert mfu(10_000, 30e9, 1e15) == pytest.approx(0.3)
    assert mfu(10_000, 30e9, 1e15, gpus=2) == pytest.approx(0.15)
    assert mfu(None, 30e9, 1e15) is None and mfu(10_000, 30e9, None) is None
