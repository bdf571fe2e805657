"""The LoRA variants: rsLoRA on the fused layer equals PEFT's; DoRA runs on PEFT's layer and the plan
says why; LoRA+ gives B its learning rate; NEFTune's noise is on while training only; a list of
targets and modules trained in full train, save and load. Each trained adapter loads in PEFT, merges
and generates."""

import json
import math

import pytest
import torch

from testkit import ROOT, load_tiny_base, story_records, train_tiny


def _model(fused: bool, lora, seed: int = 0):
    from mistral_qlora.model.lora import add_lora
    from mistral_qlora.plan.layers import LayerPlan

    torch.manual_seed(seed)
    model = add_lora(load_tiny_base(), lora, LayerPlan(lora_layer="fused" if fused else "peft", recompute=0))
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():  # B starts at zero: give the adapter branch some weight
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def _rows(n_rows: int = 1):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n_rows):
        row = []
        for n in (60, 40):
            ids = [1] + torch.randint(3, 32000, (n - 1,), generator=gen).tolist()
            row.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
        rows.append(row)
    return rows


def test_rslora_fused_layer_matches_peft():
    from mistral_qlora.config import LoraSection
    from mistral_qlora.data.collator import PackedCollator
    from mistral_qlora.kernels.fused_lora import FusedLoraLinear4bit

    lora = LoraSection(r=8, alpha=16, dropout=0.0, rslora=True)
    ref, fused = _model(False, lora), _model(True, lora)
    q_proj = fused.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, FusedLoraLinear4bit) and q_proj.fused_plan((), {}) is not None
    assert q_proj.scaling["default"] == pytest.approx(16 / math.sqrt(8))  # alpha / sqrt(r), not alpha / r
    batch = PackedCollator(with_cu_seqlens=False)(_rows())
    results = []
    for model in (ref, fused):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    (ref_loss, ref_grads), (fused_loss, fused_grads) = results
    assert fused_loss == pytest.approx(ref_loss, rel=1e-5)
    for name, g in ref_grads.items():
        assert g.norm() > 0, name
        assert ((fused_grads[name] - g).norm() / g.norm()).item() < 1e-4, name
    # and the scale matters: plain LoRA's alpha / r gives another loss
    plain = _model(True, LoraSection(r=8, alpha=16, dropout=0.0))
    assert plain(**batch).loss.item() != pytest.approx(fused_loss, rel=1e-4)


def test_dora_runs_on_peft_layers_and_the_plan_says_why():
    from mistral_qlora.config import load_config
    from mistral_qlora.model.base import load_model_config
    from mistral_qlora.plan import make_plan
    from mistral_qlora.runtime import Runtime

    from testkit import tiny_path

    cfg = load_config(None, ["lora.dora=true"])
    plan = make_plan(cfg, load_model_config(tiny_path(), cfg.model), Runtime.detect("float32"))
    assert plan.layers.lora_layer == "peft"
    lines = "\n".join(plan.log_lines(cfg))
    assert "lora.dora=true: PEFT's DoRA layers" in lines and "fused layer computes plain LoRA only" in lines
    assert "lora: variants dora" in lines


@pytest.mark.parametrize("keys,message", [
    (["lora.dora=true"], "lora.dora cannot run with train.strategy=zero3"),
    (["lora.modules_to_save=[lm_head]"], "lora.modules_to_save cannot run with train.strategy=zero3"),
])
def test_variants_zero3_cannot_run_are_refused(keys, message):
    from mistral_qlora.config import load_config
    from mistral_qlora.errors import UserError
    from mistral_qlora.plan import check_variants

    with pytest.raises(UserError, match=message):
        check_variants(load_config(None, keys), "zero3")
    check_variants(load_config(None, keys), "ddp")  # fine elsewhere


def test_loraplus_groups_and_neftune_noise_while_training_only(tmp_path):
    """One optimizer step through the run's Trainer: B's learning rate is the ratio times A's, and
    the embeddings are noisy in training mode during the run, never in eval mode nor after it."""
    from transformers import TrainerCallback

    from mistral_qlora.config import LoraSection, load_config
    from mistral_qlora.data.collator import PackedCollator
    from mistral_qlora.run.trainer import RunTrainer, training_arguments
    from mistral_qlora.runtime import Runtime

    cfg = load_config(None, ["lora.plus_lr_ratio=16", "train.neftune_alpha=5", "train.max_steps=1",
                             "train.learning_rate=1e-3", "train.report_to=[none]", f"output_dir={tmp_path}"])
    args = training_arguments(cfg, Runtime.detect("float32"), has_eval=False)
    assert args.neftune_noise_alpha == 5
    model = _model(True, LoraSection(r=8, dropout=0.0))
    ids = torch.tensor([[1, 330, 2936, 28723]])

    def noisy(emb, training: bool) -> bool:
        emb.train(training)
        with torch.no_grad():
            return not torch.equal(emb(ids), emb(ids))

    class Probe(TrainerCallback):
        seen = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            emb = model.get_input_embeddings()
            was = emb.training
            Probe.seen = (noisy(emb, True), noisy(emb, False))
            emb.train(was)

    trainer = RunTrainer(model=model, args=args, train_dataset=_rows(2), callbacks=[Probe()],
                         data_collator=PackedCollator(with_cu_seqlens=False), loraplus_lr_ratio=16)
    trainer.train()
    assert Probe.seen == (True, False)
    assert not noisy(model.get_input_embeddings(), True)  # the hook is gone after training
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            lrs[names[id(p)]] = group["lr"]
    a = {lr for n, lr in lrs.items() if "lora_A" in n}
    b = {lr for n, lr in lrs.items() if "lora_B" in n}
    assert len(a) == len(b) == 1 and b.pop() == pytest.approx(16 * a.pop())
    assert len(lrs) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("keys,message", [
    (["lora.modules_to_save=[lm_heads]"], "lora.modules_to_save: lm_heads is not a module of the base model"),
    (["lora.target_modules=[q_proj, vproj]"], "lora.target_modules: vproj is not a module of the base model"),
])
def test_module_names_not_in_the_model_are_refused(keys, message):
    from mistral_qlora.config import load_config
    from mistral_qlora.errors import UserError
    from mistral_qlora.model.lora import add_lora

    from testkit import layer_plan

    with pytest.raises(UserError, match=message):
        add_lora(load_tiny_base(), load_config(None, keys).lora, layer_plan())


@pytest.mark.parametrize("keys,message", [
    (["lora.plus_lr_ratio=-2"], "lora.plus_lr_ratio: must be > 0"),
    (["train.neftune_alpha=0"], "train.neftune_alpha: must be > 0"),
    (["lora.target_modules=[]"], "lora.target_modules: must be all-linear or a non-empty list"),
    (["lora.modules_to_save=['']"], "lora.modules_to_save: module names must not be empty"),
])
def test_bad_variant_values_are_refused(keys, message):
    from mistral_qlora.config import load_config
    from mistral_qlora.errors import UserError

    with pytest.raises(UserError, match=message):
        load_config(None, keys)



@pytest.fixture(scope="module")
def dora_run(tmp_path_factory):
    summary, run = train_tiny(tmp_path_factory.mktemp("dora"), [
        "data.max_seq_len=64", "data.tokens_per_row=128", "train.max_steps=2",
        "data.eval_fraction=0", "eval.samples=0", "train.report_to=[none]", "train.gradient_checkpointing=false",
        "lora.dora=true", "lora.target_modules=[q_proj, v_proj]", "lora.modules_to_save=[embed_tokens]"])
    return summary, run / "adapter"


def test_dora_run_trains_and_saves_magnitudes_and_embeddings(dora_run):
    from safetensors import safe_open

    summary, adapter = dora_run
    assert summary["lora_layer"] == "peft" and summary["lora_variants"] == ["dora", "modules_to_save=embed_tokens"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["modules_to_save"] == ["embed_tokens"]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("lora_magnitude_vector" in k for k in keys)
    assert "base_model.model.model.embed_tokens.weight" in keys


@pytest.mark.slow  # reads the run with real trackers (tracked_run)
def test_fused_path_variants_are_in_the_adapter(tracked_run):
    adapter = tracked_run["out"] / "adapter"
    summary = json.loads((tracked_run["out"] / "summary.json").read_text())
    assert summary["lora_layer"] == "fused"
    assert summary["lora_variants"] == ["rslora", "loraplus(ratio=16)", "neftune(alpha=5)", "modules_to_save=lm_head"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["modules_to_save"] == ["lm_head"]
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]


@pytest.mark.parametrize("which", [pytest.param("fused", marks=pytest.mark.slow), "dora"])  # fused: the tracked run
def test_variant_adapters_load_merge_and_generate(which, request, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mistral_qlora.model.base import resolve_model_path
    from mistral_qlora.model.greedy import greedy_answers
    from mistral_qlora.tools.generate import load_for_generation
    from mistral_qlora.tools.merge import merge_adapter

    adapter = (request.getfixturevalue("tracked_run")["out"] / "adapter" if which == "fused"
               else request.getfixturevalue("dora_run")[1])
    merged = merge_adapter(str(adapter), str(tmp_path / "merged"), dtype="fp32")
    base_path = resolve_model_path("tiny-random-mistral")
    ids = torch.tensor([[1, 733, 16289, 28793, 1824, 349, 264, 307, 1068, 28804, 733, 28748, 16289, 28793]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        base_logits = plain(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(plain, str(adapter)).eval()
        adapter_logits = with_adapter(input_ids=ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids=ids).logits
    assert (merged_logits - adapter_logits).abs().max().item() < 1e-3 * adapter_logits.abs().max().item()
    assert (base_logits - adapter_logits).abs().max().item() > 1e-3
    model, tokenizer = load_for_generation(str(adapter), None, bits=4)
    (answer,) = greedy_answers(model, tokenizer, ["What is a noun?"], max_new_tokens=4)
    assert isinstance(answer, str)


@pytest.mark.gpu
@pytest.mark.parametrize("keys,trained", [
    (["lora.rslora=true", "lora.plus_lr_ratio=16", "train.neftune_alpha=5", "lora.modules_to_save=[lm_head]"],
     "base_model.model.lm_head.weight"),
    (["lora.dora=true", "lora.modules_to_save=[embed_tokens]"], "base_model.model.model.embed_tokens.weight"),
])
def test_variants_train_on_the_gpu_with_liger(keys, trained, tmp_path):
    """On the GPU in bf16 with Liger's kernels where installed (its fused loss reads lm_head's weight:
    the trained copy must be the one it reads): the loss falls and the module trained in full moved."""
    from safetensors.torch import load_file

    from mistral_qlora.config import load_config
    from mistral_qlora.plan.backends import kernels_usable
    from mistral_qlora.train import run_training

    data = tmp_path / "qa.json"
    data.write_text(json.dumps(story_records(60)))
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"data.train={data}", "data.max_seq_len=128", "data.tokens_per_row=256", "train.max_steps=30",
        "train.eval_steps=30", "eval.samples=0", "train.report_to=[none]", *keys, f"output_dir={tmp_path / 'run'}"])
    summary = run_training(cfg)
    assert summary["kernels"] == ("liger" if kernels_usable() is None else "none")
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.5
    base = base_tensor(trained)
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))[trained]
    assert not torch.allclose(saved.float(), base.float())


def base_tensor(saved_key: str) -> torch.Tensor:
    """The base's tensor that the adapter's `saved_key` (a module trained in full) replaces."""
    from transformers import AutoModelForCausalLM

    from mistral_qlora.model.base import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-random-mistral"), dtype=torch.float32)
    return model.state_dict()[saved_key.removeprefix("base_model.model.")]
