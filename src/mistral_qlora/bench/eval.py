"""`mistral-qlora bench --eval N`: evaluating N records in packed rows, as a run evaluates, against
one record per forward, as runs evaluated before packed evaluation; the same model, the same
records and the run's Trainer (`RunTrainer`) for both, so the time is the only difference. Both
eval losses are the mean over every answer token and must agree.

The records are synthetic (lognormal lengths, `--median`/`--sigma`/`--max-len`, random tokens, the
first third of each a prompt); the model is built as `train` builds it (`make_plan` +
`build_model`, `model.attention: auto`). A short untimed pass warms both paths up first.
"""

from __future__ import annotations

import tempfile
import time

import torch

from mistral_qlora.bench.options import BenchOptions
from mistral_qlora.bench.report import environment, now, write_report
from mistral_qlora.config import ModelSection, validate_config
from mistral_qlora.data.collator import PackedCollator, PackedRows
from mistral_qlora.data.packing import pack_best_fit_decreasing, packing_efficiency
from mistral_qlora.bench.synthetic import lognormal_lengths, token_examples
from mistral_qlora.errors import UserError
from mistral_qlora.model.attention import TAKES_CU_SEQLENS
from mistral_qlora.model.base import load_model_config, resolve_model_path
from mistral_qlora.model.build import build_model
from mistral_qlora.plan import make_plan
from mistral_qlora.run.trainer import RunTrainer
from mistral_qlora.runtime import Runtime

WARMUP_RECORDS = 16


def _evaluate(model, dataset, collator, rt: Runtime, out_dir: str) -> tuple[float, float]:
    """(seconds, eval loss) of one Trainer evaluation of `dataset`, one item per forward."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=out_dir, per_device_eval_batch_size=1, report_to="none",
                             remove_unused_columns=False, use_cpu=rt.device == "cpu", disable_tqdm=True,
                             bf16=rt.dtype == torch.bfloat16, fp16=rt.dtype == torch.float16)
    trainer = RunTrainer(model=model, args=args, eval_dataset=dataset, data_collator=collator)
    if rt.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = trainer.evaluate()["eval_loss"]
    if rt.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss


def run_eval_bench(opts: BenchOptions, records: int, warmup: int = WARMUP_RECORDS) -> dict:
    if records < 1:
        raise UserError(f"--eval {records}: evaluate at least one record")
    if opts.tokens_per_row < opts.max_len:
        raise UserError(f"--tokens-per-row ({opts.tokens_per_row}) must be >= --max-len ({opts.max_len})")
    rt = Runtime.detect(opts.dtype)
    path = resolve_model_path(opts.model, random_dir=opts.model_dir)
    model_config = load_model_config(path, ModelSection(name_or_path=path, sliding_window=opts.sliding_window))
    cfg = validate_config({
        "model": {"name_or_path": path, "sliding_window": opts.sliding_window, "dtype": opts.dtype},
        "lora": {"r": opts.lora_r, "alpha": 2 * opts.lora_r},
        "data": {"tokens_per_row": opts.tokens_per_row, "max_seq_len": opts.max_len},
        "train": {"micro_batch_size": 1, "seed": opts.seed},
    }, source="bench options")
    plan = make_plan(cfg, model_config, rt)
    model = build_model(cfg, plan, rt, path, model_config, 0)[0]
    lengths = lognormal_lengths(records, opts.median, opts.sigma, opts.max_len, opts.min_len, opts.seed)
    examples = token_examples(lengths, model_config.vocab_size, opts.seed)
    rows = pack_best_fit_decreasing(lengths, opts.tokens_per_row, opts.seed)
    collator = PackedCollator(with_cu_seqlens=plan.attention in TAKES_CU_SEQLENS)
    paths = {"one record per forward": examples, "packed rows": PackedRows(examples, rows)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = examples[:warmup]
        warm_rows = pack_best_fit_decreasing(lengths[:warmup], opts.tokens_per_row, opts.seed)
        for dataset in (warm, PackedRows(warm, warm_rows)):
            _evaluate(model, dataset, collator, rt, tmp)
        for name, dataset in paths.items():
            print(f"bench --eval: {name} ...", flush=True)
            seconds, loss = _evaluate(model, dataset, collator, rt, tmp)
            results[name] = {"forwards": len(dataset), "seconds": seconds, "tokens_per_second": sum(lengths) / seconds,
                             "eval_loss": loss}
            print(f"bench --eval: {name}: {len(dataset)} forwards, {seconds:.2f} s, "
                  f"{sum(lengths) / seconds:,.0f} tokens/s, eval loss {loss:.6f}", flush=True)
    one, packed = results["one record per forward"], results["packed rows"]
    report = {
        "date": now(),
        "mode": "eval",
        "model": opts.model,
        "environment": environment(rt.dtype),
        "attention": plan.attention,
        "records": records,
        "tokens": sum(lengths),
        "lengths": f"lognormal, median {opts.median}, sigma {opts.sigma}, clipped to [{opts.min_len}, {opts.max_len}]",
        "tokens_per_row": opts.tokens_per_row,
        "packing_efficiency": packing_efficiency(lengths, rows, opts.tokens_per_row),
        "results": results,
        "speedup": one["seconds"] / packed["seconds"],
        "loss_difference": abs(one["eval_loss"] - packed["eval_loss"]),
    }
    write_report(opts.out, report)
    return report


def format_eval_report(report: dict) -> str:
    one, packed = report["results"]["one record per forward"], report["results"]["packed rows"]
    return (f"eval of {report['records']:,} records ({report['tokens']:,} tokens, attention {report['attention']}): "
            f"packed rows {packed['seconds']:.2f} s ({packed['forwards']} forwards) vs one record per forward "
            f"{one['seconds']:.2f} s: {report['speedup']:.2f}x; eval losses {packed['eval_loss']:.6f} and "
            f"{one['eval_loss']:.6f} (difference {report['loss_difference']:.2e})")
