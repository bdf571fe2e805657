"""Packed evaluation: eval batches are packed rows whose records never see each other, and the eval
loss is the mean over every answer token of the eval set, equal to the per-record computation.

CPU, the embedded tiny model in float32 and 16 bits (4 layers, a 64-token sliding window)."""

from __future__ import annotations

import json

import pytest
import torch

from mistral_qlora.config import DataSection
from mistral_qlora.data import build_data
from mistral_qlora.data.tokenize import IGNORE_INDEX

from testkit import QA, TESTKIT, load_tiny_base, tiny_path


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    # Answers of very different lengths, so a mean of per-record or per-batch means is far from
    # the mean over tokens.
    records = []
    for i in range(12):
        q, a = QA[i % len(QA)]
        records.append({"prompt": f"{q} (#{i})", "response": " ".join([a] * (1 + (i * 5) % 4)),
                        **({"system": "Answer plainly."} if i % 3 == 0 else {})})
    path = tmp_path_factory.mktemp("eval") / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture(scope="module")
def model():
    return load_tiny_base(attention="sdpa", dtype=torch.float32, bits=16).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from mistral_qlora.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_path())


_PER_RECORD: dict = {}


def _per_record(model, examples) -> tuple[float, float]:
    """(sum of answer-token losses / answer tokens, mean of per-record means), each record alone."""
    examples = [{"input_ids": list(ex["input_ids"]), "labels": list(ex["labels"])} for ex in examples]  # table rows
    key = json.dumps(examples)
    if key in _PER_RECORD:  # the packed and unpacked cases share their eval records
        return _PER_RECORD[key]
    total, tokens, means = 0.0, 0, []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            labels = torch.tensor(ex["labels"][1:])
            losses = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
            n = int((labels != IGNORE_INDEX).sum())
            total += float(losses.sum())
            tokens += n
            means.append(float(losses.sum()) / n)
    _PER_RECORD[key] = total / tokens, sum(means) / len(means)
    return _PER_RECORD[key]


def _trainer(model, data, tmp_path, micro_batch_size):
    from transformers import TrainingArguments

    from mistral_qlora.run.trainer import RunTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_eval_batch_size=1,
                             report_to="none", remove_unused_columns=False)
    return RunTrainer(model=model, args=args, eval_dataset=data.eval_dataset(micro_batch_size, seed=3),
                      data_collator=data.collator(0))


@pytest.mark.parametrize("packing", [True, False])
def test_eval_loss_is_the_mean_over_every_answer_token(records_file, model, tokenizer, tmp_path, packing):
    cfg = DataSection(train=str(records_file), eval=str(records_file), max_seq_len=256, tokens_per_row=256,
                      packing=packing)
    data = build_data(cfg, tokenizer, seed=3)
    expected, mean_of_means = _per_record(model, data.eval)
    assert abs(expected - mean_of_means) > 1e-3  # so the comparison below can tell them apart

    trainer = _trainer(model, data, tmp_path, micro_batch_size=2)
    batches = list(trainer.get_eval_dataloader())
    records = sum(int((b["position_ids"][0] == 0).sum()) if "position_ids" in b else b["input_ids"].shape[0]
                  for b in batches)
    assert records == len(data.eval) == 12
    if packing:
        # Packed rows: several records per forward, each with its own positions from 0.
        assert len(batches) <= len(data.eval) // 3
        assert all(b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] <= 2 * 256 for b in batches)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, abs=1e-5)


def test_eval_rows_are_packed_within_the_forward_budget(records_file, tokenizer):
    data = build_data(DataSection(train=str(records_file), eval=str(records_file), max_seq_len=256,
                                    tokens_per_row=256), tokenizer, seed=3)
    for mbs in (1, 3):
        rows = data.eval_dataset(mbs)
        assert sorted(i for row in rows.rows for i in row) == list(range(len(data.eval)))
        assert all(sum(data.eval_stats.lengths[i] for i in row) <= 256 * mbs for row in rows.rows)
    assert len(data.eval_dataset(3)) < len(data.eval_dataset(1))
    no_eval = build_data(DataSection(train=str(records_file), eval_fraction=0, max_seq_len=256,
                                       tokens_per_row=256), tokenizer, seed=3)
    assert no_eval.eval_dataset(2) is None


@pytest.mark.slow
def test_two_ranks_count_every_answer_token_once(tmp_path, model):
    """Five packed rows over two ranks: the second rank's last batch repeats a row (accelerate evens
    the batches out); the eval loss still equals the per-record mean over every answer token."""
    import os
    import subprocess
    import sys

    from testkit.dist_eval_worker import examples

    worker = TESTKIT / "dist_eval_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    out = tmp_path / "multi.pt"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29637", str(worker), str(out)], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(out)
    expected, mean_of_means = _per_record(model, examples())
    assert result["world_size"] == 2
    assert abs(expected - mean_of_means) > 1e-3
    assert result["loss"] == pytest.approx(expected, abs=1e-5)


def test_bench_eval_mode_times_both_paths_and_their_losses_agree(tmp_path):
    from mistral_qlora.bench.eval import format_eval_report, run_eval_bench
    from mistral_qlora.bench.options import BenchOptions

    out = tmp_path / "eval.json"
    opts = BenchOptions(model="tiny-random-mistral", median=24, sigma=0.5, max_len=64, min_len=8,
                        tokens_per_row=256, dtype="float32", out=str(out))
    report = run_eval_bench(opts, 6, warmup=1)
    one, packed = report["results"]["one record per forward"], report["results"]["packed rows"]
    assert one["forwards"] == 6 and packed["forwards"] < 6
    assert report["loss_difference"] < 1e-4  # the same loss, packed or not (a 4-bit base on the CPU)
    assert report["speedup"] == pytest.approx(one["seconds"] / packed["seconds"])
    assert json.loads(out.read_text())["records"] == 6
    assert "packed rows" in format_eval_report(report)
