"""Packing: the packer's properties, the packed collator, and the loss (packed == unpacked).

CPU only. The model tests use the embedded tiny model in float32 (4 layers, a 64-token sliding
window shorter than the sequences here).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_qlora.data.collator import PackedCollator, PackedRows, PaddedCollator
from mistral_qlora.data.packing import pack_best_fit_decreasing, packing_efficiency
from mistral_qlora.bench.synthetic import lognormal_lengths
from mistral_qlora.data.tokenize import IGNORE_INDEX
from testkit import TESTKIT
from testkit.training import one_sgd_step, random_examples, tiny_lora_model

# ---------------------------------------------------------------------------------------------
# The packer


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 600), max_size=300),
    budget=st.integers(600, 5000),
    seed=st.integers(0, 2**32 - 1),
)
def test_packer_places_every_sequence_once_within_budget(lengths, budget, seed):
    rows = pack_best_fit_decreasing(lengths, budget, seed)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))  # none lost, none duplicated
    assert all(row for row in rows)  # no empty row
    assert all(sum(lengths[i] for i in row) <= budget for row in rows)
    # Best fit never leaves two rows that would fit together in one.
    totals = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(totals) < 2 or totals[0] + totals[1] > budget


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 64), max_size=200),  # many ties in length
    budget=st.integers(64, 512),
    seed=st.integers(0, 2**32 - 1),
)
def test_packer_is_deterministic_for_a_seed(lengths, budget, seed):
    assert pack_best_fit_decreasing(lengths, budget, seed) == pack_best_fit_decreasing(list(lengths), budget, seed)


def test_packer_seed_changes_the_tie_break():
    lengths = [10] * 40
    outcomes = {str(pack_best_fit_decreasing(lengths, 100, seed)) for seed in range(5)}
    assert len(outcomes) > 1


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1000, 4000), budget=st.sampled_from([4096, 8192]))
def test_packing_efficiency_on_the_default_distribution(seed, n, budget):
    """Lognormal lengths, median 256, clipped to 4096: at least 95% of row slots hold real tokens."""
    lengths = lognormal_lengths(n, seed=seed)
    rows = pack_best_fit_decreasing(lengths, budget, seed)
    assert packing_efficiency(lengths, rows, budget) >= 0.95


def test_packer_refuses_a_sequence_longer_than_the_budget():
    with pytest.raises(ValueError, match="more than the row budget"):
        pack_best_fit_decreasing([10, 300, 20], 256)


def test_default_length_distribution():
    lengths = sorted(lognormal_lengths(20001, seed=3))
    assert 240 <= lengths[len(lengths) // 2] <= 272  # median 256
    assert lengths[-1] == 4096 and lengths[0] >= 16


# ---------------------------------------------------------------------------------------------
# The packed collator


def _example(ids, n_prompt):
    return {"input_ids": list(ids), "labels": [IGNORE_INDEX] * n_prompt + list(ids[n_prompt:])}


def test_packed_collator_row_layout():
    a, b, c = _example(range(10, 15), 2), _example(range(20, 23), 1), _example(range(30, 34), 3)
    batch = PackedCollator(with_cu_seqlens=True)([[a, b], [c]])  # two rows -> one (1, T) row
    assert set(batch) == {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                          "max_length_q", "max_length_k"}  # no attention_mask
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14, 20, 21, 22, 30, 31, 32, 33]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    x = IGNORE_INDEX
    # Prompt tokens and the first token of every sequence are -100: the last token of one sequence
    # never learns to predict the first of the next.
    assert batch["labels"].tolist() == [[x, x, 12, 13, 14, x, 21, 22, x, x, x, 33]]
    cu = batch["cu_seq_lens_q"]
    assert cu.tolist() == [0, 5, 8, 12] and cu.dtype == torch.int32 and cu.device.type == "cpu"
    assert batch["cu_seq_lens_k"] is cu
    assert batch["max_length_q"] == batch["max_length_k"] == 5 and isinstance(batch["max_length_q"], int)


def test_packed_collator_train_on_prompt_keeps_all_but_first_label():
    ex = {"input_ids": [1, 5, 6, 7], "labels": [IGNORE_INDEX, 5, 6, 7]}  # train_on_prompt: only BOS masked
    batch = PackedCollator()([[ex, ex]])
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 5, 6, 7, IGNORE_INDEX, 5, 6, 7]]
    assert "cu_seq_lens_q" not in batch


def test_packed_collator_eval_items_are_single_examples():
    a, b = _example(range(3), 1), _example(range(4), 1)
    batch = PackedCollator(with_cu_seqlens=True)([a, b])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 7]


def test_padded_collator_is_the_baseline():
    a, b = _example([5, 6, 7], 1), _example([8, 9], 1)
    batch = PaddedCollator(pad_token_id=0)([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]


def test_packed_rows_dataset():
    examples = [{"input_ids": [i]} for i in range(5)]
    ds = PackedRows(examples, [[4, 0], [2], [1, 3]])
    assert len(ds) == 3 and ds[2] == [examples[1], examples[3]]


# ---------------------------------------------------------------------------------------------
# prepare: the data step with packing, and what `mistral-qlora prepare` prints

QA = [(f"What is {a} plus {b}? Explain how you add them.",
       f"{a} plus {b} is {a + b}. We add the ones first and then the tens." + " Let us check it again." * (a % 5))
      for a, b in [(12, 7), (25, 49), (3, 3), (40, 2), (17, 33), (8, 90), (61, 5), (22, 22), (9, 14), (30, 31),
                   (44, 1), (5, 55)]]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"text": f"<s>[INST] {q} [/INST] {a} </s>"} for q, a in QA]))
    return path


def test_prepare_reports_packing(data_file, tmp_path):
    from mistral_qlora.config import load_config
    from mistral_qlora.tools.prepare import describe_data

    cfg = load_config(None, [f"data.train={data_file}", "data.tokens_per_row=256", "data.max_seq_len=128",
                             "train.micro_batch_size=1", "train.grad_accum=2", f"output_dir={tmp_path}/run"])
    text = describe_data(cfg)
    assert "rows of 256 tokens per epoch" in text and "efficiency" in text and "steps per epoch" in text

    cfg.data.packing = False
    assert "padded batches of 1" in describe_data(cfg)


def test_prepare_data_packs_rows_within_budget(data_file):
    from mistral_qlora.config import DataSection
    from mistral_qlora.data import build_data
    from mistral_qlora.errors import UserError
    from mistral_qlora.model.base import resolve_model_path
    from mistral_qlora.model.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_model_path("tiny-random-mistral"))
    cfg = DataSection(train=str(data_file), eval_fraction=0.0, tokens_per_row=128, max_seq_len=128)
    data = build_data(cfg, tok, seed=1)
    lengths = data.train_stats.lengths
    assert sorted(i for row in data.packed_rows for i in row) == list(range(len(data.train)))
    assert all(sum(lengths[i] for i in row) <= 128 for row in data.packed_rows)
    assert isinstance(data.collator(tok.pad_token_id), PackedCollator)
    assert build_data(cfg, tok, seed=1).packed_rows == data.packed_rows  # same seed, same rows

    with pytest.raises(UserError, match="tokens_per_row"):
        build_data(DataSection(train=str(data_file), tokens_per_row=64, max_seq_len=128), tok, seed=1)
    unpacked = build_data(DataSection(train=str(data_file), packing=False), tok, seed=1)
    assert unpacked.packed_rows is None and isinstance(unpacked.collator(0), PaddedCollator)


# ---------------------------------------------------------------------------------------------
# The loss: the same packed as unpacked, a mean over all answer tokens of the global batch


LENGTHS = [97, 31, 150, 70, 12, 88]  # some longer than the 64-token window


@pytest.fixture(scope="module")
def lora_model():
    return tiny_lora_model()


def test_packed_loss_equals_unpacked_loss(lora_model):
    examples = random_examples(LENGTHS)
    n_items = sum(sum(1 for x in ex["labels"][1:] if x != IGNORE_INDEX) for ex in examples)
    with torch.no_grad():
        packed = lora_model(**PackedCollator()([examples]), num_items_in_batch=n_items).loss
        padded = lora_model(**PaddedCollator(0)(examples), num_items_in_batch=n_items).loss
        # Per sequence, summed: the definition.
        total = sum(lora_model(**PaddedCollator(0)([ex]), num_items_in_batch=1).loss for ex in examples)
    assert abs(packed.item() - total.item() / n_items) < 1e-5
    assert abs(padded.item() - total.item() / n_items) < 1e-5


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_one_optimizer_step_same_packed_and_unpacked_with_grad_accum(lora_model, tmp_path):
    """One SGD step (lr 1, no clipping) over the same six sequences: packed into rows with
    gradient accumulation over the rows, or in padded micro-batches of 2 with accumulation over 3.
    Same logged loss, same update: the loss is the mean over every answer token of the step."""
    examples = random_examples(LENGTHS)
    lengths = [len(ex["input_ids"]) for ex in examples]
    rows = pack_best_fit_decreasing(lengths, 160, seed=0)
    assert 2 <= len(rows) < len(examples)
    start = copy.deepcopy(lora_model.state_dict())
    start_w = {n: t for n, t in start.items()}

    def step(*args, **kwargs):
        lora_model.load_state_dict(start)
        return one_sgd_step(lora_model, *args, **kwargs)

    packed_rows = PackedRows(examples, rows)
    loss_packed, w_packed = step(packed_rows, PackedCollator(), 1, len(rows), tmp_path / "packed")
    loss_padded, w_padded = step(examples, PaddedCollator(0), 2, 3, tmp_path / "padded")
    _, w_row_means = step(packed_rows, PackedCollator(), 1, len(rows), tmp_path / "ctl", per_batch_means=True)
    lora_model.load_state_dict(start)

    n_items = sum(sum(1 for x in ex["labels"][1:] if x != IGNORE_INDEX) for ex in examples)
    with torch.no_grad():
        per_seq = [lora_model(**PaddedCollator(0)([ex]), num_items_in_batch=1).loss.item() for ex in examples]
    global_mean = sum(per_seq) / n_items
    assert loss_packed == pytest.approx(global_mean, rel=1e-5)
    assert loss_padded == pytest.approx(global_mean, rel=1e-5)

    moved = _max_diff(w_packed, {n: start_w[n] for n in w_packed})
    assert moved > 1e-3  # the step did something
    assert _max_diff(w_packed, w_padded) < 1e-3 * moved  # same update
    # The control: a mean of per-row means weighs tokens of short rows more; the test sees it.
    assert _max_diff(w_row_means, w_padded) > 1e-2 * moved


@pytest.mark.slow  # processes of their own
def test_two_ranks_with_grad_accum_take_the_mean_over_the_global_batch(tmp_path):
    """2 ranks x 2 accumulated rows == 1 rank x 4 rows: the Trainer's num_items_in_batch, gathered
    across ranks (average_tokens_across_devices, as train.py sets it), makes the loss the mean over
    every answer token of the global batch, however unevenly the tokens fall between rows and
    ranks. The control, each rank normalising by its own tokens, gives another update."""
    import os
    import subprocess
    import sys

    worker = TESTKIT / "dist_loss_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    run = subprocess.run([sys.executable, str(worker), str(single), "4"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29631", str(worker), str(multi), "2"], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = torch.load(single), torch.load(multi)
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert len(set(b["tokens_per_rank"])) == 2  # the ranks saw different numbers of answer tokens
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    moved = _max_diff(a["weights"], a["start"])
    assert moved > 1e-3
    assert _max_diff(a["weights"], b["weights"]) < 1e-3 * moved
    assert _max_diff(a["weights"], b["per_rank_weights"]) > 1e-2 * moved


def test_packed_pairs_keep_each_pair_whole_chosen_first():
    """A row of pairs becomes records chosen, rejected, chosen, rejected; the batch tags each record
    with its pair and, once known, its reference log-prob (data/collator.py's preference contract)."""
    import numpy as np

    from mistral_qlora.data.collator import PackedCollator, PackedPairs

    pairs = [{"chosen_ids": [1, 5, 6], "chosen_labels": [-100, 5, 6], "rejected_ids": [1, 7],
              "rejected_labels": [-100, 7]},
             {"chosen_ids": [1, 8], "chosen_labels": [-100, 8], "rejected_ids": [1, 9, 9, 9],
              "rejected_labels": [-100, -100, 9, 9]}]
    rows = PackedPairs(pairs, [[1, 0]])
    batch = PackedCollator(with_cu_seqlens=True)([rows[0]])
    assert batch["input_ids"].tolist() == [[1, 8, 1, 9, 9, 9, 1, 5, 6, 1, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert batch["record_pair"].tolist() == [1, 1, 0, 0]
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 6, 9, 11]
    assert "reference_logps" not in batch
    rows.reference = np.array([[-1.0, -2.0], [-3.0, -4.0]])
    batch = PackedCollator()([rows[0]])
    assert batch["reference_logps"].tolist() == [-3.0, -4.0, -1.0, -2.0]
