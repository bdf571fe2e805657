"""The `bench` and `bench-data` subcommands: their flags and the functions they call.

`mistral_qlora.cli` adds them with `add_bench_parsers`. Each flag that sets a `BenchOptions` field
takes its default from that field (a `BenchOptions()` made for the purpose), and `bench-data`'s
from data_step.py's constants, so a default is written in one place; help texts show it with
`%(default)s`. The flags only `bench` has (`--out`, `--steps`, `--work-dir`) keep theirs here:
`BenchOptions.out` is None (no report file) for callers of the library, `bench.json` on the
command line. Heavy imports (torch, transformers) happen inside the commands.
"""

from __future__ import annotations

import json
import sys

from mistral_qlora.bench.data_step import BASELINE_RECORDS, FORMS, MAX_SEQ_LEN, PHASES, RECORDS, WORKDIR
from mistral_qlora.bench.levers import LEVERS
from mistral_qlora.bench.max_context import MaxContextOptions
from mistral_qlora.bench.options import BenchOptions
from mistral_qlora.errors import UserError


def add_bench_parsers(sub) -> None:
    """Add `bench` and `bench-data` to the subparsers `sub` of the top-level parser."""
    _add_bench_parser(sub)
    _add_bench_data_parser(sub)


def _add_bench_parser(sub) -> None:
    d = BenchOptions()
    p = sub.add_parser("bench", help="tokens/s: the tutorial's padded recipe against packed rows with each backend")
    p.add_argument("--model", default=d.model,
                   help="%(default)s (default), a local checkpoint folder, a hub id, or random:mistral-7b "
                        "(Mistral-7B-Instruct-v0.2's architecture with random weights, built once on local disk)")
    p.add_argument("--model-dir", help="where random:mistral-7b is written (default: the cache folder)")
    p.add_argument("--data", help="a dataset file (e.g. dataset/story.json) instead of synthetic lengths")
    p.add_argument("--sequences", type=int, default=d.sequences, help="synthetic sequences to draw (default %(default)s)")
    p.add_argument("--median", type=int, default=d.median, help="synthetic median length (%(default)s)")
    p.add_argument("--sigma", type=float, default=d.sigma, help="lognormal sigma (%(default)s)")
    p.add_argument("--max-len", type=int, default=d.max_len, help="longest sequence (%(default)s)")
    p.add_argument("--min-len", type=int, default=d.min_len, help="shortest sequence (%(default)s)")
    p.add_argument("--tokens-per-row", type=int, default=d.tokens_per_row, help="packed row budget (default %(default)s)")
    p.add_argument("--padded-batch-size", type=int, default=d.padded_batch_size,
                   help="the tutorial recipe's batch size (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="warm-up rows, untimed (default %(default)s)")
    p.add_argument("--timed-rows", type=int, default=d.timed_rows,
                   help="timed rows; the padded recipe is timed on the same sequences (default %(default)s)")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="timed passes over the timed rows per recipe; tokens/s is their median (default %(default)s: "
                        "the first pass of the padded recipe still warms up)")
    p.add_argument("--recipes", help="comma-separated: tutorial (padded+sdpa; alias seed), plain (packed+flex with the tutorial's "
                                     "preparation), packed+BACKEND[+liger][+ckpt=all|none|auto|FRACTION]"
                                     "[+lora=fused|peft] "
                                     "(default: tutorial, plain, every usable backend, then the fastest with Liger)")
    p.add_argument("--method", default="sft", choices=("sft", "dpo", "orpo"),
                   help="sft (default); dpo or orpo: a preference step of ours against TRL's trainer on the same "
                        "synthetic pairs (--recipes trl,fast by default; bench/preference.py)")
    p.add_argument("--profile", action="store_true", help="profile one step of the last recipe: GPU time by kernel kind")
    p.add_argument("--compare", metavar="LEVERS",
                   help=f"comma-separated levers of the fast path ({', '.join(LEVERS)}): "
                        "time the last recipe (default: the fast one) as planned and with each lever switched off, "
                        "the variants taking turns pass by pass in one process")
    p.add_argument("--strategies", metavar="LIST",
                   help="comma-separated strategies (single,zero2,zero3): train --steps steps of each through "
                        "`mistral-qlora train` in a process of its own on one GPU, and compare tokens/s and memory")
    p.add_argument("--eval", type=int, metavar="N",
                   help="time the evaluation of N synthetic records (--median, --sigma, --max-len): packed rows of "
                        "--tokens-per-row against one record per forward, through the run's Trainer")
    m = MaxContextOptions()
    p.add_argument("--max-context", action="store_true",
                   help="the longest single record that trains one full step in each of --budgets (one child "
                        "process per probe, seeded from the planner's estimate), on the last of --recipes "
                        "(default fast) with --lora-r and --sliding-window")
    p.add_argument("--budgets", help="--max-context: comma-separated GiB, each enforced with "
                                     "torch.cuda.set_per_process_memory_fraction (default: the card's whole memory)")
    p.add_argument("--granularity", type=int, default=m.granularity,
                   help="--max-context: the finest step between lengths, in tokens (default %(default)s)")
    p.add_argument("--resolution", type=float, default=m.resolution,
                   help="--max-context: a budget's step as a share of the planner's length, rounded down to a power "
                        "of two (default %(default)s)")
    p.add_argument("--growth", type=float, default=m.growth,
                   help="--max-context: the factor the length grows or shrinks by from the planner's length "
                        "before bisecting (default %(default)s)")
    p.add_argument("--max-probes", type=int, default=m.max_probes,
                   help="--max-context: probes per budget; the search stops there (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=m.max_tokens,
                   help="--max-context: the longest row probed (default %(default)s)")
    p.add_argument("--also-at", type=int, default=m.also_at, metavar="TOKENS",
                   help="--max-context: also time one row of TOKENS tokens in --also-at-budget")
    p.add_argument("--also-at-budget", type=float, default=m.also_at_budget,
                   help="--max-context: the budget of --also-at, GiB (default %(default)s)")
    p.add_argument("--full-attention-check", action="store_true",
                   help="--max-context: time one step without the sliding window at the largest budget's length")
    p.add_argument("--steps", type=int, default=16,
                   help="optimizer steps per strategy with --strategies (default %(default)s)")
    p.add_argument("--work-dir", default="runs/bench-strategies",
                   help="where --strategies writes its data, configs, logs and runs (default %(default)s)")
    p.add_argument("--sliding-window", default=d.sliding_window,
                   help="auto (the checkpoint's), none, or a number of tokens")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="keep every activation")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--dtype", default=d.dtype, choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default="bench.json", help="where the JSON report goes (default %(default)s)")
    p.set_defaults(func=cmd_bench)


def _add_bench_data_parser(sub) -> None:
    p = sub.add_parser("bench-data", help="the data step's tokens/s and peak memory: list baseline, first "
                       "prepare, cached, streaming (bench/data_step.py)")
    p.add_argument("--records", type=int, default=RECORDS, help=f"records of the generated file (default {RECORDS:,})")
    p.add_argument("--baseline-records", type=int, default=BASELINE_RECORDS,
                   help=f"its first N records for the list-based baseline (default {BASELINE_RECORDS:,})")
    p.add_argument("--workdir", default=WORKDIR, help="where the files and the cache go (default ./%(default)s)")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases to run (default all)")
    p.add_argument("--max-seq-len", type=int, default=MAX_SEQ_LEN, help="data.max_seq_len and data.tokens_per_row")
    p.add_argument("--format", default="chat", choices=FORMS,
                   help="chat: prompt/response records; raw: raw documents (data.format=raw, split at --max-seq-len)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_bench_data)


def cmd_bench(args) -> int:
    from transformers.utils import logging as hf_logging

    from mistral_qlora.bench.report import format_compare, format_report, format_strategies

    if not args.debug:
        hf_logging.disable_progress_bar()

    window = args.sliding_window.lower()
    if window in ("none", "null"):
        window = None
    elif window != "auto":
        if not window.isdigit() or int(window) < 1:
            raise UserError(f"--sliding-window {args.sliding_window!r}: use auto, none, or a number of tokens >= 1")
        window = int(window)
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: must be at least 1")
    recipes = _comma_list(args.recipes) or None
    if args.strategies:
        from mistral_qlora.bench.strategies import run_strategies
        from mistral_qlora.plan.strategy import STRATEGIES

        strategies = _comma_list(args.strategies)
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown or args.steps < 1:
            raise UserError(f"--strategies {args.strategies} --steps {args.steps}: strategies from "
                            f"{', '.join(STRATEGIES)}, at least one step")
        print(format_strategies(run_strategies(args.model, strategies, args.steps, args.tokens_per_row,
                                               args.work_dir, args.out, args.model_dir)))
        if args.out:
            print(f"report: {args.out}")
        return 0
    opts = BenchOptions(
        model=args.model, model_dir=args.model_dir, data=args.data, sequences=args.sequences, median=args.median,
        sigma=args.sigma, max_len=args.max_len, min_len=args.min_len, tokens_per_row=args.tokens_per_row,
        padded_batch_size=args.padded_batch_size, warmup=args.warmup, timed_rows=args.timed_rows,
        repeats=args.repeats, recipes=recipes,
        sliding_window=window, gradient_checkpointing=not args.no_gradient_checkpointing, lora_r=args.lora_r,
        dtype=args.dtype, seed=args.seed, out=args.out, profile=args.profile,
    )
    if args.max_context:
        from mistral_qlora.bench.max_context import format_max_context, run_max_context

        budgets = None
        if args.budgets:
            try:
                budgets = [float(b) for b in _comma_list(args.budgets)]
            except ValueError:
                raise UserError(f"--budgets {args.budgets}: comma-separated numbers of GiB, e.g. 16,24,40,80") from None
        mc = MaxContextOptions(budgets=budgets, granularity=args.granularity, resolution=args.resolution,
                               growth=args.growth, max_probes=args.max_probes, max_tokens=args.max_tokens,
                               also_at=args.also_at, also_at_budget=args.also_at_budget,
                               full_attention_check=args.full_attention_check)
        print(format_max_context(run_max_context(opts, mc, log=lambda m: print(m, flush=True))))
        if args.out:
            print(f"report: {args.out}")
        return 0
    if args.method != "sft":
        from mistral_qlora.bench.preference import format_preference_report, run_preference_bench
        from mistral_qlora.bench.report import write_report

        report = run_preference_bench(opts, args.method)
        print(format_preference_report(report))
        write_report(args.out, report)
        if args.out:
            print(f"report: {args.out}")
        return 0
    if args.eval is not None:
        from mistral_qlora.bench.eval import format_eval_report, run_eval_bench

        print(format_eval_report(run_eval_bench(opts, args.eval)))
        if args.out:
            print(f"report: {args.out}")
        return 0
    if args.compare:
        from mistral_qlora.bench.compare import run_compare

        print(format_compare(run_compare(opts, _comma_list(args.compare))))
    else:
        from mistral_qlora.bench.run import run_bench

        print(format_report(run_bench(opts)))
    if args.out:
        print(f"report: {args.out}")
    return 0


def cmd_bench_data(args) -> int:
    from pathlib import Path

    from mistral_qlora.bench.data_step import bench_data, table
    from mistral_qlora.files import atomic_write_text

    phases = _comma_list(args.phases)
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise UserError(f"--phases: unknown phase '{unknown[0]}' (use {', '.join(PHASES)})")
    if args.records < 1 or args.baseline_records < 1:
        raise UserError("--records and --baseline-records must be at least 1")
    results = bench_data(args.records, min(args.baseline_records, args.records), Path(args.workdir), phases,
                         args.max_seq_len, log=lambda m: print(m, file=sys.stderr, flush=True), form=args.format)
    print(table(results))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(results, indent=1))
    return 0


def _comma_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]
