"""Command line: `mistral-qlora {train,prepare,generate,merge,export,bench,env}` (also `python -m mistral_qlora`).

Each subcommand parses its flags and calls one function of the package; nothing else happens
here. A `UserError` ends the program with one line on stderr and exit code 2; `--debug` shows the
traceback instead. Heavy imports (torch, transformers) happen inside the subcommands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mistral_qlora import __version__
from mistral_qlora.bench.levers import LEVERS
from mistral_qlora.errors import Preempted, UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (for example configs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=1 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-qlora", description="4-bit QLoRA fine-tuning of Mistral-7B-Instruct, from one GPU to many nodes.")
    parser.add_argument("--version", action="version", version=f"mistral-qlora {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune: data -> 4-bit model + LoRA -> adapter in output_dir")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in output_dir")
    p.add_argument("--force", action="store_true",
                   help="resume a checkpoint even though the data or batch settings changed")
    g = p.add_argument_group("processes (more than one: re-launched through `accelerate launch`)")
    g.add_argument("--nproc", type=int, metavar="N",
                   help="processes on this node (default: $NPROC_PER_NODE, else one per visible GPU, else 1)")
    g.add_argument("--nnodes", type=int, metavar="M", help="nodes in the run (default: $NNODES, else 1)")
    g.add_argument("--node-rank", type=int, metavar="R", help="this node's rank (default: $NODE_RANK, else 0)")
    g.add_argument("--main-addr", metavar="HOST", help="the rank-0 node's address (default: $MASTER_ADDR)")
    g.add_argument("--main-port", type=int, metavar="PORT",
                   help="its rendezvous port (default: $MASTER_PORT, else 29500 on several nodes, a free one on one)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="validate and tokenize the data into its cache; print its statistics")
    _add_config_args(p)
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="training processes per node the run will use: steps per epoch count them (default 1)")
    p.add_argument("--nnodes", type=int, default=1, metavar="N", help="nodes the run will use (default 1)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("generate", help="answer a prompt with a trained adapter (or a plain model)")
    p.add_argument("--adapter", help="a run's adapter/ folder")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--prompt", action="append", required=True, help="the question (repeatable)")
    p.add_argument("--system", default="", help="a system prompt for every question")
    p.add_argument("--template", metavar="NAME",
                   help="the chat template: auto, mistral-v1, mistral-v3 or tokenizer (default: the run's data.template, read from the adapter's run folder; "
                        "else auto)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--bits", type=int, choices=(4, 16), default=4, help="load the base in 4-bit or 16-bit")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="merge an adapter into a 16-bit copy of its base (safetensors)")
    p.add_argument("--adapter", required=True, help="a run's adapter/ folder")
    p.add_argument("--output", required=True, help="new folder for the merged model")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="merge an adapter and write GGUF (llama.cpp, Ollama) or safetensors")
    p.add_argument("--adapter", required=True, help="a run's adapter/ folder")
    p.add_argument("--output", required=True, help="the .gguf file to write (a new folder for safetensors)")
    p.add_argument("--format", default="gguf", help="gguf (default): one file with the tokenizer and chat template, "
                                                    "an Ollama NAME.Modelfile beside it; safetensors: as merge")
    p.add_argument("--type", dest="qtype", metavar="TYPE",
                   help="gguf: f16 (default), bf16 or q8_0; safetensors: bf16 (default), f16 or fp32")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_export)

    _add_bench_parser(sub)

    p = sub.add_parser("bench-data", help="the data step's tokens/s and peak memory: list baseline, first "
                       "prepare, cached, streaming (tools/bench_data.py)")
    p.add_argument("--records", type=int, default=1_000_000, help="records of the generated file (default 1,000,000)")
    p.add_argument("--baseline-records", type=int, default=200_000,
                   help="its first N records for the list-based baseline (default 200,000)")
    p.add_argument("--workdir", default="bench-data", help="where the files and the cache go (default ./bench-data)")
    p.add_argument("--phases", default=",".join(("baseline", "first", "cached", "streaming")),
                   help="comma-separated phases to run (default all)")
    p.add_argument("--max-seq-len", type=int, default=4096, help="data.max_seq_len and data.tokens_per_row")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_bench_data)

    p = sub.add_parser("env", help="versions, GPUs, usable attention backends and kernels")
    p.set_defaults(func=cmd_env)
    return parser


def _add_bench_parser(sub) -> None:
    from mistral_qlora.data.synthetic import DEFAULT_MAX_LEN, DEFAULT_MEDIAN, DEFAULT_MIN_LEN, DEFAULT_SIGMA

    p = sub.add_parser("bench", help="tokens/s: the tutorial's padded recipe against packed rows with each backend")
    p.add_argument("--model", default="tiny-random-mistral",
                   help="tiny-random-mistral (default), a local checkpoint folder, a hub id, or random:mistral-7b "
                        "(Mistral-7B-Instruct-v0.2's architecture with random weights, built once on local disk)")
    p.add_argument("--model-dir", help="where random:mistral-7b is written (default: the cache folder)")
    p.add_argument("--data", help="a dataset file (e.g. dataset/story.json) instead of synthetic lengths")
    p.add_argument("--sequences", type=int, default=4000, help="synthetic sequences to draw (default 4000)")
    p.add_argument("--median", type=int, default=DEFAULT_MEDIAN, help=f"synthetic median length ({DEFAULT_MEDIAN})")
    p.add_argument("--sigma", type=float, default=DEFAULT_SIGMA, help=f"lognormal sigma ({DEFAULT_SIGMA})")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN, help=f"longest sequence ({DEFAULT_MAX_LEN})")
    p.add_argument("--min-len", type=int, default=DEFAULT_MIN_LEN, help=f"shortest sequence ({DEFAULT_MIN_LEN})")
    p.add_argument("--tokens-per-row", type=int, default=8192, help="packed row budget (default 8192)")
    p.add_argument("--padded-batch-size", type=int, default=8, help="the tutorial recipe's batch size (default 8)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up rows, untimed (default 3)")
    p.add_argument("--timed-rows", type=int, default=8,
                   help="timed rows; the padded recipe is timed on the same sequences (default 8)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes over the timed rows per recipe; tokens/s is their median (default 3: "
                        "the first pass of the padded recipe still warms up)")
    p.add_argument("--recipes", help="comma-separated: tutorial (padded+sdpa; alias seed), plain (packed+flex with the tutorial's "
                                     "preparation), packed+BACKEND[+liger][+ckpt=all|none|auto|FRACTION]"
                                     "[+lora=fused|peft] "
                                     "(default: tutorial, plain, every usable backend, then the fastest with Liger)")
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
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per strategy with --strategies (default 16)")
    p.add_argument("--work-dir", default="runs/bench-strategies",
                   help="where --strategies writes its data, configs, logs and runs (default runs/bench-strategies)")
    p.add_argument("--sliding-window", default="auto", help="auto (the checkpoint's), none, or a number of tokens")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="keep every activation")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json", help="where the JSON report goes (default bench.json)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from transformers.utils import logging as hf_logging

    from mistral_qlora.bench.options import BenchOptions
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


def _comma_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def cmd_train(args) -> int:
    from mistral_qlora.config import load_config
    from mistral_qlora.relaunch import relaunch
    from mistral_qlora.run.trackers import check_trackers
    from mistral_qlora.train import run_training

    cfg = load_config(args.config, args.overrides)
    check_trackers(cfg)  # before --nproc starts processes that would each refuse it
    code = relaunch(cfg, args.config, args.overrides, nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                    main_addr=args.main_addr, main_port=args.main_port, overwrite=args.overwrite, force=args.force,
                    debug=args.debug)
    if code is not None:
        return code
    summary = run_training(cfg, overwrite=args.overwrite, force=args.force)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(cfg.output_dir, summary)
    return 0


def _print_summary(output_dir: str, s: dict) -> None:
    def fmt(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    print(f"\ndone: {s['steps']} steps in {s['runtime_seconds']:.0f} s, attention={s['attention_backend']}, "
          f"strategy={s['strategy']}, world_size={s['world_size']}")
    print(f"eval loss {fmt(s['initial_eval_loss'])} -> {fmt(s['final_eval_loss'])}; "
          f"{fmt(s['tokens_per_second'], ',.0f')} tokens/s"
          + (f" (MFU {s['mfu']:.1%})" if s.get("mfu") else "")
          + f"; peak memory {fmt(s['peak_memory_gib'], '.2f')} GiB"
          + (" (host RSS)" if s.get("peak_memory_of") == "host" else ""))
    print(f"adapter: {output_dir}/adapter   summary: {output_dir}/summary.json   plot: {output_dir}/loss.png")


def cmd_prepare(args) -> int:
    from mistral_qlora.config import load_config
    from mistral_qlora.tools.prepare import describe_data

    if args.nproc < 1 or args.nnodes < 1:
        raise UserError("--nproc and --nnodes must be at least 1")
    cfg = load_config(args.config, args.overrides)
    print(describe_data(cfg, world_size=args.nproc * args.nnodes))
    return 0


def cmd_bench_data(args) -> int:
    from pathlib import Path

    from mistral_qlora.files import atomic_write_text
    from mistral_qlora.tools.bench_data import PHASES, bench_data, table

    phases = _comma_list(args.phases)
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise UserError(f"--phases: unknown phase '{unknown[0]}' (use {', '.join(PHASES)})")
    if args.records < 1 or args.baseline_records < 1:
        raise UserError("--records and --baseline-records must be at least 1")
    results = bench_data(args.records, min(args.baseline_records, args.records), Path(args.workdir), phases,
                         args.max_seq_len, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(results))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(results, indent=1))
    return 0


def cmd_generate(args) -> int:
    from mistral_qlora.data.formats import Conversation
    from mistral_qlora.data.templates import TEMPLATES, resolve_template
    from mistral_qlora.model.greedy import greedy_answers
    from mistral_qlora.run.artifacts import visible_whitespace
    from mistral_qlora.tools.generate import load_for_generation, run_template

    if args.template is not None and args.template not in TEMPLATES:
        raise UserError(f"--template {args.template}: choose one of {', '.join(TEMPLATES)}")

    model, tokenizer = load_for_generation(args.adapter, args.model, bits=args.bits)
    template = resolve_template(args.template or run_template(args.adapter), tokenizer)
    prompts = [Conversation([(prompt, "")], args.system) for prompt in args.prompt]
    for prompt, answer in zip(prompts, greedy_answers(model, tokenizer, prompts, args.max_new_tokens, template)):
        # What the model was given, as the template rendered it (BOS left out).
        ids = template.generation_ids(prompt)
        shown = tokenizer.decode(ids[1:] if ids[:1] == [tokenizer.bos_token_id] else ids).strip()
        print(f"{shown}\n{answer.strip() or visible_whitespace(answer)}\n")
    return 0


def cmd_merge(args) -> int:
    from mistral_qlora.tools.merge import merge_adapter

    out = merge_adapter(args.adapter, args.output, dtype=args.dtype, model=args.model)
    print(f"merged model ({args.dtype}) written to {out}; try: mistral-qlora generate --model {out} --bits 16 "
          "--prompt ...")
    return 0


def cmd_export(args) -> int:
    from mistral_qlora.tools.export import export_model

    written = export_model(args.adapter, args.output, fmt=args.format, qtype=args.qtype, model=args.model,
                           overwrite=args.overwrite)
    if args.format == "safetensors":
        print(f"merged model written to {written[0]}; try: mistral-qlora generate --model {written[0]} --bits 16 "
              "--prompt ...")
        return 0
    gguf, modelfile = written
    print(f"wrote {gguf} ({gguf.stat().st_size / 1e9:.2f} GB) and {modelfile}\n"
          f"llama.cpp: llama-cli -m {gguf} -cnv\n"
          f"Ollama:    ollama create NAME -f {modelfile}")
    return 0


def cmd_env(args) -> int:
    from mistral_qlora.tools.env import environment_report

    print(environment_report())
    return 0


def _close_progress_bars() -> None:
    """So the error line starts on a line of its own, not after a half-drawn progress bar."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
        bar.close()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Library logs and warnings: to output_dir/run.log (train), on the console only as errors
    # unless --debug (mistral_qlora/logs.py).
    from mistral_qlora.logs import setup_logging

    setup_logging(debug=args.debug)
    try:
        code = args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        _close_progress_bars()
        print(f"mistral-qlora: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except Preempted as exc:
        _close_progress_bars()
        print(f"mistral-qlora: preempted: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("mistral-qlora: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
