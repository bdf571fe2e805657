"""The memory estimate (plan/memory.py), pure arithmetic: against the peaks measured on the GPU, its parts
under partitioning, what dropout, kept weights, FP8 and the LoRA variants add."""

from __future__ import annotations

from testkit import tiny_path
from testkit.plan import MISTRAL_7B, config_7b

from mistral_qlora.config import RunConfig, load_config, validate_config
from mistral_qlora.flops import decoder_linear_shapes
from mistral_qlora.model.base import load_model_config
from mistral_qlora.plan.layers import plan_recompute
from mistral_qlora.plan.memory import (
    GIB,
    estimate_memory,
    fp8_transient_bytes,
    kept_weight_bytes,
    layer_shapes,
)


def test_estimate_matches_the_h100_measurements():
    # DESIGN.md, one H100, NF4 + LoRA r16 all linear, 8192-token rows: 10.0-10.2 GiB with every layer
    # checkpointed, 69.1 GiB with none (that one with Liger's fused loss, i.e. without the logits)
    ckpt = estimate_memory(MISTRAL_7B, config_7b(), 2).per_gpu("single") / GIB
    assert 9.0 < ckpt < 12.0
    full = estimate_memory(MISTRAL_7B, config_7b(gradient_checkpointing=False), 2).per_gpu("single") / GIB
    assert 60.0 < full < 76.0


def test_estimate_parts_shrink_with_partitioning():
    e = estimate_memory(MISTRAL_7B, config_7b(), 2)
    assert 3.5 * GIB < e.base < 4.5 * GIB  # ~7.2B weights in NF4 + 16-bit embeddings and head
    assert e.per_gpu("zero3", 4) < e.per_gpu("zero2", 4) < e.per_gpu("ddp", 4)
    assert e.per_gpu("zero3_offload", 4) < e.per_gpu("zero3", 4)
    assert e.tokens_per_micro_batch == 8192


def test_lora_dropout_copies_in_the_estimate():
    from mistral_qlora.plan.memory import estimate_memory

    def without_dropout(cfg):
        return RunConfig.model_validate({**cfg.model_dump(), "lora": {**cfg.lora.model_dump(), "dropout": 0.0}})

    H, I = 4096, 14336
    cfg = config_7b(gradient_checkpointing=False)
    assert cfg.lora.fused and cfg.lora.dropout > 0
    # the fast path: a bf16 copy + mask of each linear's input, where without dropout each input
    # tensor is kept once (q/k/v's, gate/up's, down's; o_proj's is attention's output)
    with_dropout = estimate_memory(MISTRAL_7B, cfg, 2, fused_loss=True).activations
    no_dropout = without_dropout(cfg)
    without = estimate_memory(MISTRAL_7B, no_dropout, 2, fused_loss=True).activations
    assert with_dropout - without == 32 * 8192 * ((6 * H + I) * 3 - (2 * H + I) * 2)
    # PEFT's layers (and the path without Liger): the copies on top of the same 16H + 4I values
    peft = RunConfig.model_validate({**cfg.model_dump(), "lora": {**cfg.lora.model_dump(), "fused": False}})
    peft_gap = (estimate_memory(MISTRAL_7B, peft, 2, fused_loss=True).activations
                - estimate_memory(MISTRAL_7B, without_dropout(peft), 2, fused_loss=True).activations)
    assert peft_gap == 32 * 8192 * (6 * H + I) * 3
    assert estimate_memory(MISTRAL_7B, cfg, 2).activations - estimate_memory(MISTRAL_7B, no_dropout, 2).activations == peft_gap
    # without the copies, auto keeps every layer's activations on an 80 GB card
    assert plan_recompute(RunConfig.model_validate({**no_dropout.model_dump(),
                                                        "train": {**no_dropout.train.model_dump(),
                                                                  "gradient_checkpointing": "auto"}}),
                              MISTRAL_7B, 2, "liger", 73 * GIB)[0] == 0


def test_fast_path_estimate_matches_the_h200_measurements():
    """docs/benchmarks.md, Mistral-7B on an H200, NF4 + LoRA r16 (dropout 0.05) on every linear,
    fused LoRA layer, Liger, 8192-token rows: 56.8 GiB with no layer recomputed, 69.8 GiB with
    every layer's dequantized weights kept as well, 9.2 GiB with every layer recomputed (one
    layer's weights kept from its recompute to its backward)."""
    from mistral_qlora.plan.memory import estimate_memory

    cfg = config_7b(gradient_checkpointing="auto")
    for checkpointed, kept, measured in ((0, 0, 56.8), (0, 32, 69.8), (32, 0, 9.2)):
        need = estimate_memory(MISTRAL_7B, cfg, 2, checkpointed, fused_loss=True, kept_weight_layers=kept)
        assert abs(need.per_gpu("single") / GIB / measured - 1) < 0.05, (checkpointed, kept, need)


def test_variants_count_in_flops_and_memory():
    from testkit import tiny_path

    from mistral_qlora.flops import flops_per_token, lora_target_names
    from mistral_qlora.model.base import load_model_config
    from mistral_qlora.plan.memory import estimate_memory, fused_lora

    c = load_model_config(tiny_path(), load_config(None).model)
    targets = lora_target_names(["q_proj", "v_proj"])
    assert targets == {"q_proj", "v_proj"}
    plain = flops_per_token(c, 8, targets, [100])
    assert flops_per_token(c, 8, targets, [100], trained_head=True) == plain + 2 * c.vocab_size * c.hidden_size
    base = estimate_memory(c, load_config(None), 2)
    head = estimate_memory(c, load_config(None, ["lora.modules_to_save=[lm_head]"]), 2)
    assert head.lora - base.lora == 4 * c.vocab_size * c.hidden_size  # fp32 weights
    assert not fused_lora(load_config(None, ["lora.dora=true"])) and fused_lora(load_config(None))


def test_dora_layers_are_counted_in_float32_with_their_extra_tensors():
    """PEFT's DoRA layers: float32 activations (the magnitude is a float32 parameter), the base and
    adapter outputs of each adapted linear kept, and under dropout the dequantized weight. With
    Mistral-7B's shapes at 8192 tokens and no layer recomputing, that is more than an H200 holds
    (the fast DoRA bench ran out of memory there when this counted the two outputs in bf16 only)."""
    from transformers import MistralConfig

    from mistral_qlora.flops import decoder_linear_shapes, lora_target_names
    from mistral_qlora.model.builtin import MISTRAL_7B_V02
    from mistral_qlora.plan.memory import (
        dora_layer_bytes,
        estimate_memory,
        layer_shapes,
    )

    c = MistralConfig(**{k: v for k, v in MISTRAL_7B_V02.items() if k != "architectures"})
    sets = ["data.tokens_per_row=8192", "train.micro_batch_size=1", "lora.dropout=0.05"]
    plain, dora = (estimate_memory(c, load_config(None, sets + extra), 2, recompute_layers=0)
                   for extra in ([], ["lora.dora=true"]))
    cfg = load_config(None, sets + ["lora.dora=true"])
    targets = lora_target_names(cfg.lora.target_modules)
    shapes = {n: s for n, s in decoder_linear_shapes(c).items() if n in targets}
    outs, weights = sum(o for i, o in shapes.values()), sum(i * o for i, o in shapes.values())
    layer = layer_shapes(c, cfg.lora.target_modules)
    assert dora_layer_bytes(layer, cfg, 8192, 2, 1000) == 2000 + 2 * 8192 * 2 * outs + 2 * weights
    no_dropout = load_config(None, ["lora.dora=true", "lora.dropout=0"])
    assert dora_layer_bytes(layer, no_dropout, 8192, 2, 1000) == 2000 + 2 * 8192 * 2 * outs
    assert dora.per_gpu("single") > 139.8 * 2**30 > plain.per_gpu("single")


def test_memory_plan_counts_fp8_weights_at_one_byte():
    cfg16 = validate_config({}, "test")
    cfg8 = validate_config({"quantization": {"compute": "fp8"}}, "test")
    mc = load_model_config(tiny_path(), cfg16.model)
    # two e4m3 layouts (1 byte a weight each) and a float32 scale per output channel, against 2 bytes a weight
    shapes = decoder_linear_shapes(mc).values()
    layer = layer_shapes(mc, cfg16.lora.target_modules)
    assert kept_weight_bytes(layer, cfg16, 2) == sum(2 * i * o for i, o in shapes)
    assert kept_weight_bytes(layer, cfg8, 2) == sum(2 * i * o + 4 * o for i, o in shapes)
    a = estimate_memory(mc, cfg16, 2, recompute_layers=0, kept_weight_layers=4)
    b = estimate_memory(mc, cfg8, 2, recompute_layers=0, kept_weight_layers=4)
    assert b.activations - a.activations == 4 * 4 * sum(o for _, o in shapes) + fp8_transient_bytes(layer, a.tokens_per_micro_batch)


def test_a_preference_step_counts_its_kept_logits_even_with_ligers_fused_loss():
    # Liger's fused lm_head + cross-entropy needs labels, which the preference log-prob path never
    # passes: its logits count with or without Liger, and for SFT with Liger they do not.
    from mistral_qlora.plan.memory import preference_logits_bytes

    T, V = 8192, MISTRAL_7B.vocab_size
    sft = estimate_memory(MISTRAL_7B, config_7b(), 2, fused_loss=True)
    for method in ("dpo", "orpo"):
        pref = estimate_memory(MISTRAL_7B, config_7b(method=method), 2, fused_loss=True)
        assert pref.activations - sft.activations == preference_logits_bytes(T, V, 2)
        unfused = estimate_memory(MISTRAL_7B, config_7b(method=method), 2, fused_loss=False)
        sft_unfused = estimate_memory(MISTRAL_7B, config_7b(), 2, fused_loss=False)
        # the same fast-path layers either way; the head in the model dtype, no float32 copy of the row
        assert unfused.activations - sft_unfused.activations == preference_logits_bytes(T, V, 2) - T * V * 10
        assert pref.base == sft.base and pref.lora_grads_and_optimizer == sft.lora_grads_and_optimizer


def test_preference_logits_estimate_covers_what_the_log_prob_path_keeps_for_backward():
    # record_logps' head: the scored positions' logits (bf16) are what it saves for backward, with
    # one log-sum-exp a token; the float32 log-softmax of each chunk is recomputed, never kept.
    import torch

    from mistral_qlora.plan.memory import preference_logits_bytes
    from mistral_qlora.run.preference import token_logps

    T, H, V = 2500, 32, 3000
    hidden = torch.randn(1, T, H, dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(V, H, dtype=torch.bfloat16)
    saved = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logits = torch.nn.functional.linear(hidden[:, torch.arange(T)], head).reshape(T, V)
        token_logps(logits, torch.randint(0, V, (T,)))
    kept = sum(saved.values())
    assert T * V * 2 <= kept < T * V * 2 * 1.1  # the bf16 logits, not a float32 copy
    # kept + their gradient + a chunk's float32 buffers
    assert preference_logits_bytes(T, V, 2) >= kept + T * V * 2


def test_ligers_fused_cross_entropy_is_planned_for_sft_only():
    from mistral_qlora.plan.memory import fused_loss_for

    assert fused_loss_for(config_7b(), "liger")
    assert not fused_loss_for(config_7b(method="dpo"), "liger")
    assert not fused_loss_for(config_7b(method="orpo"), "liger")
    assert not fused_loss_for(config_7b(), "none")
