"""The speed levers on the CPU: partial activation checkpointing is exact, and the auto plan
spends memory the way the estimate says."""

import pytest
import torch

from mistral_qlora.config import LoraSection, RunConfig
from mistral_qlora.plan.backends import select_kernels
from mistral_qlora.plan.layers import plan_recompute
from mistral_qlora.plan.memory import recompute_layers_for

from testkit import layer_plan, load_tiny_base

GIB = 2**30


class Mistral7B:  # the config fields the estimate reads
    hidden_size, intermediate_size, num_hidden_layers, vocab_size = 4096, 14336, 32, 32000
    num_attention_heads, num_key_value_heads, head_dim, tie_word_embeddings = 32, 8, 128, False


def _cfg(**train):
    return RunConfig.model_validate({"data": {"tokens_per_row": 8192, "max_seq_len": 4096},
                                     "train": {"micro_batch_size": 1, **train}})


def test_explicit_settings():
    assert recompute_layers_for(True, 32) == 32 and recompute_layers_for(False, 32) == 0
    assert recompute_layers_for(0.25, 32) == 8 and recompute_layers_for("auto", 32) is None
    assert plan_recompute(_cfg(gradient_checkpointing=0.5), Mistral7B, 2, "none", 80 * GIB)[0] == 16


def test_auto_spends_free_memory_and_low_memory_checkpoints_everything():
    big, why = plan_recompute(_cfg(gradient_checkpointing="auto"), Mistral7B, 2, "liger", 73 * GIB)
    assert 0 <= big < 8, why  # an 80 GB card keeps (almost) every layer's activations
    small, _ = plan_recompute(_cfg(gradient_checkpointing="auto"), Mistral7B, 2, "liger", 22 * GIB)
    assert big < small < 32  # a 24 GB card recomputes most layers
    assert plan_recompute(_cfg(gradient_checkpointing="auto"), Mistral7B, 2, "liger", 8 * GIB)[0] == 32
    low, why = plan_recompute(_cfg(gradient_checkpointing="auto", memory="low"), Mistral7B, 2, "liger", 73 * GIB)
    assert low == 32 and "memory=low" in why
    assert plan_recompute(_cfg(gradient_checkpointing="auto"), Mistral7B, 2, "none", None)[0] == 32  # no GPU


def test_headroom_follows_the_estimate():
    """`auto` leaves 4% of the budget (at least 1 GiB) free where the estimate counts the fast path
    op by op (0.3-0.4 GiB under measured peaks), 10% where it is the rule for PEFT's layers (within
    ~10%), ZeRO-3 included."""
    from mistral_qlora.plan import layers as speed

    cfg = _cfg(gradient_checkpointing="auto")
    peft = RunConfig.model_validate({**cfg.model_dump(), "lora": {"fused": False}})
    h100 = 81559 * 2**20 - int(0.08 * 81559 * 2**20)
    assert speed.auto_headroom(cfg, "liger", h100) == int(0.04 * h100)  # 2.9 GiB
    assert speed.auto_headroom(cfg, "liger", 11 * GIB) == GIB  # a 12 GB card: the floor
    for other in (speed.auto_headroom(cfg, "none", h100), speed.auto_headroom(peft, "liger", h100),
                  speed.auto_headroom(cfg, "liger", h100, "zero3"), speed.auto_headroom(cfg, "liger", h100, "zero3_offload")):
        assert other == int(0.10 * h100)
    assert "(1.6 GiB kept free)" in plan_recompute(cfg, Mistral7B, 2, "liger", 40 * GIB)[1]
    assert "(4.0 GiB kept free)" in plan_recompute(cfg, Mistral7B, 2, "none", 40 * GIB)[1]


def test_bad_fraction_and_kernels_on_cpu():
    from mistral_qlora.errors import UserError

    with pytest.raises(Exception, match="fraction of the layers"):
        _cfg(gradient_checkpointing=1.5)
    if not torch.cuda.is_available():
        assert select_kernels("auto") == "none"
        with pytest.raises(UserError, match="model.kernels=liger: needs a CUDA GPU"):
            select_kernels("liger")


def test_partial_checkpointing_is_exact():
    from transformers import AutoModelForCausalLM

    from mistral_qlora.model.base import resolve_model_path
    from mistral_qlora.model.lora import add_lora

    path = resolve_model_path("tiny-random-mistral")
    ids = torch.randint(3, 32000, (1, 96), generator=torch.Generator().manual_seed(0))
    grads = {}
    for k in (0, 2, 4):
        torch.manual_seed(0)
        model = add_lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                         LoraSection(r=4, dropout=0.0), layer_plan(recompute=k))
        layers = model.get_base_model().model.layers
        assert [layer.gradient_checkpointing for layer in layers] == [i < k for i in range(4)]
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[k] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for k in (2, 4):
        for name, g in grads[0].items():
            assert torch.allclose(g, grads[k][name], atol=1e-6, rtol=1e-5), (k, name)


def test_lora_dropout_copies_in_the_estimate():
    from mistral_qlora.plan.memory import estimate_memory

    def without_dropout(cfg):
        return RunConfig.model_validate({**cfg.model_dump(), "lora": {**cfg.lora.model_dump(), "dropout": 0.0}})

    H, I = 4096, 14336
    cfg = _cfg(gradient_checkpointing=False)
    assert cfg.lora.fused and cfg.lora.dropout > 0
    # the fast path: a bf16 copy + mask of each linear's input, where without dropout each input
    # tensor is kept once (q/k/v's, gate/up's, down's; o_proj's is attention's output)
    with_dropout = estimate_memory(Mistral7B, cfg, 2, fused_loss=True).activations
    no_dropout = without_dropout(cfg)
    without = estimate_memory(Mistral7B, no_dropout, 2, fused_loss=True).activations
    assert with_dropout - without == 32 * 8192 * ((6 * H + I) * 3 - (2 * H + I) * 2)
    # PEFT's layers (and the path without Liger): the copies on top of the same 16H + 4I values
    peft = RunConfig.model_validate({**cfg.model_dump(), "lora": {**cfg.lora.model_dump(), "fused": False}})
    peft_gap = (estimate_memory(Mistral7B, peft, 2, fused_loss=True).activations
                - estimate_memory(Mistral7B, without_dropout(peft), 2, fused_loss=True).activations)
    assert peft_gap == 32 * 8192 * (6 * H + I) * 3
    assert estimate_memory(Mistral7B, cfg, 2).activations - estimate_memory(Mistral7B, no_dropout, 2).activations == peft_gap
    # without the copies, auto keeps every layer's activations on an 80 GB card
    assert plan_recompute(RunConfig.model_validate({**no_dropout.model_dump(),
                                                        "train": {**no_dropout.train.model_dump(),
                                                                  "gradient_checkpointing": "auto"}}),
                              Mistral7B, 2, "liger", 73 * GIB)[0] == 0


def test_kept_weights_spend_what_checkpointing_leaves():
    """`auto` keeps the dequantized weights of as many layers not recomputed as the memory left
    holds (0.4 GiB a Mistral-7B layer), none with train.memory=low, PEFT's layers or no GPU; the
    estimate counts them, and one layer's worth wherever layers recompute."""
    from mistral_qlora.plan import layers as speed
    from mistral_qlora.plan.layers import plan_kept_weights
    from mistral_qlora.plan.memory import estimate_memory, kept_weight_bytes, layer_shapes

    cfg = _cfg(gradient_checkpointing="auto")
    per_layer = kept_weight_bytes(layer_shapes(Mistral7B, cfg.lora.target_modules), cfg, 2)
    assert per_layer == 2 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    plans = {}
    h100 = 81559 * 2**20 - int(0.08 * 81559 * 2**20)  # gpu_budget of an H100 80GB (nvidia-smi's total)
    for budget in (48 * GIB, 64 * GIB, h100, 129 * GIB):  # made-up budgets, an H100 80GB's, an H200's
        k, _ = plan_recompute(cfg, Mistral7B, 2, "liger", budget)
        n, why = plan_kept_weights(cfg, Mistral7B, 2, "liger", budget, k)
        plans[budget] = (k, n)
        need = estimate_memory(Mistral7B, cfg, 2, k, fused_loss=True, kept_weight_layers=n)
        usable = budget - speed.auto_headroom(cfg, "liger", budget)
        assert need.per_gpu("single") <= usable and f"{n} of {32 - k}" in why
        if k > 0:  # one layer fewer recomputed would not have fit
            fewer = estimate_memory(Mistral7B, cfg, 2, k - 1, fused_loss=True)
            assert fewer.per_gpu("single") > usable
        if n < 32 - k:  # one layer more would not have fit
            more = estimate_memory(Mistral7B, cfg, 2, k, fused_loss=True, kept_weight_layers=n + 1)
            assert more.per_gpu("single") > usable
    assert plans[48 * GIB][0] > 0, plans  # recomputes some layers
    assert plans[64 * GIB][0] == 0 and 0 < plans[64 * GIB][1] < 32, plans  # some layers' weights
    assert plans[h100] == plans[129 * GIB] == (0, 32), plans  # an 80 GB card: every layer's
    assert plan_kept_weights(cfg, Mistral7B, 2, "liger", 8 * GIB, 32)[0] == 0
    n, why = plan_kept_weights(_cfg(gradient_checkpointing="auto", memory="low"), Mistral7B, 2, "liger", 129 * GIB, 32)
    assert n == 0 and "memory=low" in why
    assert plan_kept_weights(cfg, Mistral7B, 2, "liger", None, 32)[0] == 0
    peft = RunConfig.model_validate({**cfg.model_dump(), "lora": {"fused": False}})
    assert plan_kept_weights(peft, Mistral7B, 2, "liger", 129 * GIB, 0) == (0, "PEFT's LoRA layers dequantize in backward")
    # recomputing layers keep theirs one at a time: one layer's worth in the estimate
    from mistral_qlora.plan.memory import fast_path_layer_bytes

    inputs, recompute = 32 * 8192 * 4096 * 2, 8192 * fast_path_layer_bytes(layer_shapes(Mistral7B, "all-linear"), 2, True)
    assert estimate_memory(Mistral7B, cfg, 2, 32, fused_loss=True).activations == inputs + recompute + per_layer


def test_fast_path_estimate_matches_the_h200_measurements():
    """docs/benchmarks.md, Mistral-7B on an H200, NF4 + LoRA r16 (dropout 0.05) on every linear,
    fused LoRA layer, Liger, 8192-token rows: 56.8 GiB with no layer recomputed, 69.8 GiB with
    every layer's dequantized weights kept as well, 9.2 GiB with every layer recomputed (one
    layer's weights kept from its recompute to its backward)."""
    from mistral_qlora.plan.memory import estimate_memory

    cfg = _cfg(gradient_checkpointing="auto")
    for checkpointed, kept, measured in ((0, 0, 56.8), (0, 32, 69.8), (32, 0, 9.2)):
        need = estimate_memory(Mistral7B, cfg, 2, checkpointed, fused_loss=True, kept_weight_layers=kept)
        assert abs(need.per_gpu("single") / GIB / measured - 1) < 0.05, (checkpointed, kept, need)


def _tiny_fused_model(plan):
    from mistral_qlora.model.lora import add_lora

    return add_lora(load_tiny_base(), LoraSection(r=4, dropout=0.0), plan)


def test_levers_switched_off_and_back_to_the_plan():
    """`bench --compare` applies the plan with a lever off, and the plan again, through the one
    function that configures the fused layers (model/lora.py)."""
    import dataclasses

    from mistral_qlora.bench.levers import LEVERS
    from mistral_qlora.kernels.fused_lora import FusedLoraLinear4bit
    from mistral_qlora.model.lora import configure_fused_layers

    plan = layer_plan(recompute=1, fused=True, kept_for_run=2)
    model = _tiny_fused_model(plan)
    fused = [m for m in model.modules() if isinstance(m, FusedLoraLinear4bit)]

    def grouping():  # which linears share an input-gradient buffer, as labels
        ids = {}
        return [ids.setdefault(id(m.input_group), len(ids)) if m.input_group else None for m in fused]

    def without(*levers):
        changes = {}
        for lever in levers:
            changes.update(LEVERS[lever][1])
        configure_fused_layers(model, dataclasses.replace(plan, **changes))

    keeps, groups = [m.keep for m in fused], grouping()
    assert keeps == ["backward"] * 7 + ["none"] * 7 + ["run"] * 14  # layer 0 recomputes, layers 2-3 keep for the run
    assert groups.count(None) == 2 * 4 and len(set(groups) - {None}) == 2 * 4  # q/k/v and gate/up of 4 layers
    cached = next(m for m in fused if m.keep == "run")
    cached.dequantized_weight(torch.float32)
    without("cached-weights")
    assert [m.keep for m in fused] == ["none" if k == "none" else "backward" for k in keeps]
    assert cached._dequantized is None  # the copy is freed
    assert all(m.product_first for m in fused) and grouping() == groups
    without("kept-weights", "shared-input-grad", "product-first")
    assert not any(m.keep != "none" or m.input_group or m.product_first for m in fused)
    configure_fused_layers(model, plan)
    assert [m.keep for m in fused] == keeps and grouping() == groups and all(m.product_first for m in fused)
    with pytest.raises(ValueError):
        fused[0].configure(keep="always")
