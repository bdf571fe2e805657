"""Preference tuning (run/preference.py): the losses against TRL's formulas, per-record log-probs
packed and unpacked, the reference pass's cache, and a tiny DPO run through run_training.

CPU, the embedded tiny model in float32."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mistral_qlora.data.collator import PackedCollator, PackedPairs
from mistral_qlora.data.tokenize import IGNORE_INDEX
from mistral_qlora.run.preference import (ReferenceCallback, ReferenceLogps, dpo_loss, orpo_loss, record_logps,
                                          reference_key, token_logps)

from testkit import ROOT, QA, tiny_path

# ---------------------------------------------------------------------------------------------
# Losses against TRL's formulas (trl/trainer/dpo_trainer.py's dpo_loss with label smoothing and
# its length-averaged IPO; trl/experimental/orpo/orpo_trainer.py's odds_ratio_loss), written here
# term by term from the fixed log-probs; TRL itself when it is installed.

POLICY = torch.tensor([[-12.0, -15.5], [-30.25, -28.0], [-7.5, -7.25], [-3.0, -9.0]], dtype=torch.float64)
REFERENCE = torch.tensor([[-13.0, -14.0], [-29.0, -29.5], [-7.0, -8.0], [-4.5, -8.5]], dtype=torch.float64)
TOKENS = torch.tensor([[6.0, 7.0], [11.0, 9.0], [3.0, 4.0], [2.0, 5.0]], dtype=torch.float64)


def _trl_sigmoid(beta, ls):
    out = []
    for (pc, pr), (rc, rr) in zip(POLICY.tolist(), REFERENCE.tolist()):
        logits = (pc - pr) - (rc - rr)
        out.append(-math.log(1 / (1 + math.exp(-beta * logits))) * (1 - ls)
                   - math.log(1 / (1 + math.exp(beta * logits))) * ls)
    return out


@pytest.mark.parametrize("beta, ls", [(0.1, 0.0), (0.5, 0.2), (2.0, 0.45)])
def test_dpo_sigmoid_loss_and_rewards_match_trls_formula(beta, ls):
    losses, chosen, rejected = dpo_loss(POLICY, REFERENCE, TOKENS, beta, "sigmoid", ls)
    assert losses.tolist() == pytest.approx(_trl_sigmoid(beta, ls), rel=1e-12)
    assert chosen.tolist() == pytest.approx((beta * (POLICY[:, 0] - REFERENCE[:, 0])).tolist())
    assert rejected.tolist() == pytest.approx((beta * (POLICY[:, 1] - REFERENCE[:, 1])).tolist())


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_loss_uses_length_averaged_log_ratios_as_trl(beta):
    expected = []
    for (pc, pr), (rc, rr), (tc, tr) in zip(POLICY.tolist(), REFERENCE.tolist(), TOKENS.tolist()):
        expected.append(((pc - rc) / tc - (pr - rr) / tr - 1 / (2 * beta)) ** 2)
    losses, _, _ = dpo_loss(POLICY, REFERENCE, TOKENS, beta, "ipo")
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_orpo_loss_is_chosen_nll_minus_beta_log_sigmoid_of_log_odds_as_trl():
    beta = 0.25
    avg = POLICY / TOKENS
    terms = []
    for c, r in avg.tolist():
        log_odds = (c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r)))
        terms.append(math.log(1 / (1 + math.exp(-log_odds))))
    nll = -POLICY[:, 0].sum().item() / TOKENS[:, 0].sum().item()
    loss, got_nll, ratio, chosen, rejected = orpo_loss(POLICY, TOKENS, beta)
    assert got_nll.item() == pytest.approx(nll, rel=1e-12)
    assert ratio.tolist() == pytest.approx(terms, rel=1e-12)
    assert loss.item() == pytest.approx(nll - beta * sum(terms) / len(terms), rel=1e-12)
    assert chosen.tolist() == pytest.approx((beta * avg[:, 0]).tolist())
    assert rejected.tolist() == pytest.approx((beta * avg[:, 1]).tolist())


def test_log_odds_stay_finite_for_average_log_probs_near_zero():
    policy = torch.tensor([[-1e-6, -3.0]], dtype=torch.float64)
    loss, *_ = orpo_loss(policy, torch.ones(1, 2, dtype=torch.float64), 0.1)
    assert math.isfinite(loss.item())


def test_chunked_token_logps_equal_a_whole_log_softmax_with_the_same_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 37, generator=gen, requires_grad=True)
    targets = torch.randint(0, 37, (10,), generator=gen)
    chunked = token_logps(logits, targets, chunk=3)
    (g_chunked,) = torch.autograd.grad((chunked * torch.arange(10.0)).sum(), logits)
    whole = F.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    (g_whole,) = torch.autograd.grad((whole * torch.arange(10.0)).sum(), logits)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(g_chunked, g_whole)
    # bf16 logits: float32 log-probs, and the gradient of the float32 math rounded once to bf16
    half = logits.detach().bfloat16().requires_grad_()
    (g_half,) = torch.autograd.grad((token_logps(half, targets, chunk=4) * torch.arange(10.0)).sum(), half)
    ref = half.detach().float().requires_grad_()
    (g_ref,) = torch.autograd.grad((F.log_softmax(ref, -1).gather(1, targets[:, None]).squeeze(1)
                                    * torch.arange(10.0)).sum(), ref)
    assert g_half.dtype == torch.bfloat16
    assert torch.equal(g_half, g_ref.bfloat16())


# ---------------------------------------------------------------------------------------------
# Per-record log-probs on the tiny model: one packed row of 3 pairs against each record alone.


@pytest.fixture(scope="module")
def tokenizer():
    from mistral_qlora.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_path())


@pytest.fixture(scope="module")
def model():
    from testkit.training import tiny_lora_model

    return tiny_lora_model().eval()  # non-zero LoRA B: the adapter takes part


def make_pairs(tokenizer, n: int) -> list[dict]:
    """Hand-made pairs: "[INST] q [/INST]" ids with -100 labels, then the answer's ids labelled
    (chosen: the question's own answer, rejected: another one's)."""
    pairs = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        prompt = tokenizer(f"[INST] {q} [/INST]")["input_ids"]
        pair = {}
        for side, answer in (("chosen", a), ("rejected", QA[(i + 1) % len(QA)][1])):
            ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            pair[f"{side}_ids"] = prompt + ids
            pair[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + ids
        pairs.append(pair)
    return pairs


def test_packed_pairs_give_each_records_log_prob_as_alone(model, tokenizer):
    pairs = make_pairs(tokenizer, 3)
    collator = PackedCollator()
    packed = collator([PackedPairs(pairs, [[0, 1, 2]])[0]])
    assert packed["record_pair"].tolist() == [0, 0, 1, 1, 2, 2]
    with torch.no_grad():
        sums, counts = record_logps(model, packed)
        alone = []
        for pair in pairs:
            for side in ("chosen", "rejected"):
                ids, labels = pair[f"{side}_ids"], pair[f"{side}_labels"]
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
                lp = F.log_softmax(logits, -1)
                target = torch.tensor(labels[1:])
                keep = target != IGNORE_INDEX
                alone.append(lp[keep].gather(1, target[keep][:, None]).sum().item())
    expected_counts = [sum(lab != IGNORE_INDEX for lab in p[f"{s}_labels"][1:]) for p in pairs
                       for s in ("chosen", "rejected")]
    assert counts.tolist() == expected_counts
    # float32 sums of ~20 tokens of ~-10 each: equal to float32 rounding (1e-6 relative)
    np.testing.assert_allclose(sums.numpy(), np.array(alone), atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The reference pass and its cache


class _Args:
    device = torch.device("cpu")


class _State:
    global_step = 0


def test_reference_pass_is_computed_once_then_read_from_the_cache(model, tokenizer, tmp_path):
    pairs = make_pairs(tokenizer, 4)
    train, evals = PackedPairs(pairs[:3], [[0, 2], [1]]), PackedPairs(pairs[3:], [[0]])
    store = ReferenceLogps(tmp_path, "k1")
    first = ReferenceCallback(store, train, evals, PackedCollator(), rank=0, world=1, is_main=True)
    first.on_train_begin(_Args(), _State(), None, model=model)
    assert first.computed and store.exists()
    assert train.reference.shape == (3, 2) and evals.reference.shape == (1, 2)
    assert train.reference.dtype == np.float64 and (train.reference < 0).all()
    # a second run of the same key reads the file: a model that cannot run proves no forward happens
    train2, evals2 = PackedPairs(pairs[:3], [[0, 2], [1]]), PackedPairs(pairs[3:], [[0]])
    again = ReferenceCallback(store, train2, evals2, PackedCollator(), rank=0, world=1, is_main=True)
    again.on_train_begin(_Args(), _State(), None, model=None)
    assert not again.computed
    np.testing.assert_array_equal(train2.reference, train.reference)
    # the batches now carry each record's reference log-prob, chosen then rejected
    batch = PackedCollator()([train2[0]])
    assert batch["reference_logps"].tolist() == pytest.approx(train.reference[[0, 2]].reshape(-1).tolist())


def test_a_resumed_run_without_its_reference_cache_is_refused(tmp_path):
    from mistral_qlora.errors import UserError

    class Resumed:
        global_step = 5

    cb = ReferenceCallback(ReferenceLogps(tmp_path, "gone"), PackedPairs([], []), None, PackedCollator(), 0, 1, True)
    with pytest.raises(UserError, match="--overwrite"):
        cb.on_train_begin(_Args(), Resumed(), None, model=None)


def test_reference_key_changes_with_the_init_adapter_and_the_data(tmp_path):
    from mistral_qlora.config import RunConfig

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights-1")
    base = RunConfig()
    with_adapter = RunConfig(lora={"init_from": str(adapter)})
    key = reference_key(with_adapter, "digest-a", "sdpa", torch.float32)
    assert key == reference_key(with_adapter, "digest-a", "sdpa", torch.float32)
    assert key != reference_key(base, "digest-a", "sdpa", torch.float32)
    assert key != reference_key(with_adapter, "digest-b", "sdpa", torch.float32)
    assert key != reference_key(with_adapter, "digest-a", "eager", torch.float32)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights-2")
    assert key != reference_key(with_adapter, "digest-a", "sdpa", torch.float32)


# ---------------------------------------------------------------------------------------------
# Config rules


@pytest.mark.parametrize("overrides, words", [
    (["train.method=dpo", "train.neftune_alpha=5"], "train.neftune_alpha"),
    (["train.method=orpo", "preference.loss=ipo"], "preference.loss=ipo"),
    (["train.method=dpo", "preference.loss=ipo", "preference.label_smoothing=0.1"], "preference.label_smoothing"),
    (["preference.label_smoothing=0.5"], "preference.label_smoothing"),
])
def test_preference_settings_that_cannot_run_are_refused_in_one_line(overrides, words):
    from mistral_qlora.config import load_config
    from mistral_qlora.errors import UserError

    with pytest.raises(UserError, match=words.replace(".", r"\.")) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# One tiny DPO run through run_training, on prompt/chosen/rejected JSONL files (data.train and
# data.eval): the real data path, from records to packed pairs.


def pairs_jsonl(path, indices):
    """Pairs of QA as a prompt/chosen/rejected JSONL: question i, its own answer chosen and the next
    question's rejected."""
    path.write_text("".join(json.dumps({"prompt": QA[i % len(QA)][0], "chosen": QA[i % len(QA)][1],
                                        "rejected": QA[(i + 1) % len(QA)][1]}) + "\n" for i in indices))
    return path


def preference_run(tmp_path_factory, method: str, steps: int):
    from mistral_qlora.config import load_config
    from mistral_qlora.train import run_training

    tmp = tmp_path_factory.mktemp(method)
    train, evals = pairs_jsonl(tmp / "train.jsonl", range(10)), pairs_jsonl(tmp / "eval.jsonl", range(10, 12))
    overrides = [f"data.train={train}", f"data.eval={evals}", "data.max_seq_len=64", "data.tokens_per_row=128",
                 f"train.max_steps={steps}", "train.gradient_checkpointing=false", "train.logging_steps=1",
                 "train.eval_steps=2", "train.save_steps=100", "eval.samples=1", "eval.max_new_tokens=4",
                 "train.report_to=[none]", f"train.method={method}", "lora.dropout=0", f"output_dir={tmp / 'run'}"]
    return run_training(load_config(ROOT / "configs/tiny.yaml", overrides)), tmp / "run"


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    return preference_run(tmp_path_factory, "dpo", 2)


def test_a_dpo_run_writes_its_rewards_and_preference_accuracy_to_the_summary(dpo_run):
    summary, out = dpo_run
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    pref = summary["preference"]
    assert summary["method"] == "dpo" and pref["method"] == "dpo" and pref["reference_computed"] is True
    for part in ("train", "eval"):
        assert set(pref[part]) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                   "rewards/accuracies"}
        assert all(math.isfinite(v) for v in pref[part].values())
    # before: the reference pass's share of held-out pairs whose chosen answer is likelier
    assert pref["preference_accuracy_before"] in (0.0, 0.5, 1.0)
    assert 0.0 <= pref["preference_accuracy_after"] <= 1.0
    history = json.loads((out / "history.json").read_text())
    first_eval = next(e for e in history if "eval_loss" in e)
    # at step 0 the policy is the reference: every reward is 0 and the loss is log 2
    assert first_eval["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first_eval["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first_eval["eval_preference_accuracy"] == pref["preference_accuracy_before"]
    samples = (out / "samples.md").read_text()
    assert "**Chosen:**" in samples and "**Rejected:**" in samples


def test_an_orpo_run_needs_no_reference_and_reports_its_nll(tmp_path_factory):
    summary, out = preference_run(tmp_path_factory, "orpo", 1)
    pref = summary["preference"]
    assert pref["method"] == "orpo" and pref["reference_computed"] is None
    history = json.loads((out / "history.json").read_text())
    evals = [e for e in history if "eval_loss" in e]
    # the eval loss is the chosen answers' NLL minus beta * mean log sigmoid(log odds)
    assert evals[0]["eval_loss"] > evals[0]["eval_nll_loss"] > 0
    assert pref["preference_accuracy_before"] == evals[0]["eval_preference_accuracy"]
    assert pref["preference_accuracy_after"] == evals[-1]["eval_preference_accuracy"]


def test_dpo_on_sft_records_is_refused_in_one_line(tmp_path):
    from mistral_qlora.errors import UserError
    from testkit import train_tiny

    with pytest.raises(UserError, match="train.method=dpo needs preference pairs") as err:
        train_tiny(tmp_path, ["train.method=dpo", "train.max_steps=1"], records=8)
    assert not (tmp_path / "run").exists()
    assert "\n" not in str(err.value)
