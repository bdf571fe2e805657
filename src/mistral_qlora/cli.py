"""Command line: `mistral-qlora {train,prepare,generate,merge,export,evaluate,bench,bench-data,env}` (also
`python -m mistral_qlora`).

Each subcommand parses its flags and calls one function of the package; nothing else happens
here; `bench` and `bench-data` are added by bench/cli.py, which owns their flags. A `UserError` ends
the program with one line on stderr and exit code 2; `--debug` (before or after the command) shows
its traceback too. Heavy imports (torch, transformers) happen inside the subcommands, after their
arguments and config are checked.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from mistral_qlora import __version__
from mistral_qlora.bench.cli import add_bench_parsers
from mistral_qlora.errors import Preempted, UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (for example configs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=1 (repeatable)")


DEBUG_HELP = "show tracebacks and library logs"


def _add_debug_flag(sub) -> None:
    """`--debug` after any command as well as before it. SUPPRESS: a command that does not get the
    flag leaves the value the top-level parser set (argparse would otherwise reset it to False)."""
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-qlora", description="4-bit QLoRA fine-tuning of Mistral-7B-Instruct, from one GPU to many nodes.")
    parser.add_argument("--version", action="version", version=f"mistral-qlora {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
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
    p.add_argument("--tools", metavar="FILE",
                   help="a JSON file with the tools the model may call, OpenAI's form (a list of {type: function, "
                        "function: {name, description, parameters}}), rendered as the template renders a record's tools")
    p.add_argument("--template", metavar="NAME",
                   help="the chat template: auto, mistral-v1, mistral-v3, mistral-v7, mistral-tekken or tokenizer (default: the run's data.template, read from the adapter's run folder; "
                        "else auto)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="the longest answer, in tokens; generation stops earlier at the template's end token "
                        "(default 128)")
    p.add_argument("--bits", type=int, choices=(4, 16), default=4, help="load the base in 4-bit or 16-bit")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="merge an adapter into a 16-bit copy of its base (safetensors)")
    p.add_argument("--adapter", required=True, help="a run's adapter/ folder")
    p.add_argument("--output", required=True, help="new folder for the merged model")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="the dtype the base is loaded in, merged in and saved in (default bf16)")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (the new model is written before the old one is removed)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="merge an adapter and write GGUF (llama.cpp, Ollama) or safetensors")
    p.add_argument("--adapter", required=True, help="a run's adapter/ folder")
    p.add_argument("--output", required=True, help="the .gguf file to write (a new folder for safetensors)")
    p.add_argument("--format", default="gguf", help="gguf (default): one file with the tokenizer and chat template, "
                                                    "an Ollama NAME.Modelfile beside it; gguf-lora: the adapter alone "
                                                    "in llama.cpp's LoRA format; safetensors: as merge")
    p.add_argument("--type", dest="qtype", metavar="TYPE",
                   help="gguf: f16 (default), bf16 or q8_0; safetensors: bf16 (default), f16 or fp32")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--base-gguf", help="gguf-lora: the base model's GGUF the Modelfile's FROM line names")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="lm-evaluation-harness scores before and after an adapter (or of a model)")
    p.add_argument("--adapter", help="a run's adapter/ folder: scored with it off (before) and on (after)")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on); alone: scored as it is")
    p.add_argument("--tasks", required=True, metavar="T1,T2", help="lm-eval task names, comma-separated")
    p.add_argument("--limit", type=int, metavar="N", help="the first N examples of each task (default: all)")
    p.add_argument("--num-fewshot", type=int, metavar="K", help="examples in the prompt (default: each task's own)")
    p.add_argument("--batch-size", default="1", metavar="auto|N", help="lm-eval's batch size (default 1)")
    p.add_argument("--include-path", metavar="DIR",
                   help="a folder of task YAMLs (local tasks, e.g. dataset/tasks)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="render prompts with the run's chat template (default) or as plain text")
    p.add_argument("--bits", type=int, choices=(4, 16), help="load the base in 4 or 16 bits (default: the run's)")
    p.add_argument("--output", metavar="DIR",
                   help="where results.json and results.md go (default: RUN/eval beside the adapter)")
    p.set_defaults(func=cmd_evaluate)

    add_bench_parsers(sub)  # bench, bench-data (bench/cli.py)

    p = sub.add_parser("env", help="versions, GPUs, usable attention backends and kernels")
    p.set_defaults(func=cmd_env)
    _add_debug_flag(sub)
    return parser


def cmd_train(args) -> int:
    from mistral_qlora.relaunch import relaunch
    from mistral_qlora.run.trackers import check_trackers
    from mistral_qlora.train import run_training

    cfg = args.cfg  # validated by main
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
    if s.get("tasks"):
        from mistral_qlora.run.task_eval import table_markdown

        print("\nlm-eval tasks, adapter off (before) and on (after):\n" + table_markdown(s["tasks"]), end="")


def cmd_prepare(args) -> int:
    from mistral_qlora.tools.prepare import describe_data

    if args.nproc < 1 or args.nnodes < 1:
        raise UserError("--nproc and --nnodes must be at least 1")
    print(describe_data(args.cfg, world_size=args.nproc * args.nnodes))
    return 0


def cmd_generate(args) -> int:
    from mistral_qlora.data.formats import Conversation, parse_tools
    from mistral_qlora.data.templates import TEMPLATES, resolve_template
    from mistral_qlora.model.greedy import greedy_answers
    from mistral_qlora.run.artifacts import visible_whitespace
    from mistral_qlora.tools.generate import load_for_generation, run_template

    if args.template is not None and args.template not in TEMPLATES:
        raise UserError(f"--template {args.template}: choose one of {', '.join(TEMPLATES)}")

    tools = None
    if args.tools:
        try:
            tools = parse_tools(Path(args.tools).read_text(encoding="utf-8"), f"--tools {args.tools}")
        except OSError as exc:
            raise UserError(f"--tools {args.tools}: cannot read it ({exc.strerror})") from None
    model, tokenizer = load_for_generation(args.adapter, args.model, bits=args.bits)
    template = resolve_template(args.template or run_template(args.adapter), tokenizer)
    prompts = [Conversation([(prompt, "")], args.system, tools=tools) for prompt in args.prompt]
    for prompt, answer in zip(prompts, greedy_answers(model, tokenizer, prompts, args.max_new_tokens, template)):
        # What the model was given, as the template rendered it (BOS left out).
        ids = template.generation_ids(prompt)
        shown = tokenizer.decode(ids[1:] if ids[:1] == [tokenizer.bos_token_id] else ids).strip()
        print(f"{shown}\n{answer.strip() or visible_whitespace(answer)}\n")
    return 0


def cmd_merge(args) -> int:
    from mistral_qlora.tools.merge import merge_adapter

    out = merge_adapter(args.adapter, args.output, dtype=args.dtype, model=args.model, overwrite=args.overwrite)
    print(f"merged model ({args.dtype}) written to {out}; try: mistral-qlora generate --model {out} --bits 16 "
          "--prompt ...")
    return 0


def cmd_export(args) -> int:
    from mistral_qlora.tools.export import export_model

    written = export_model(args.adapter, args.output, fmt=args.format, qtype=args.qtype, model=args.model,
                           overwrite=args.overwrite, base_gguf=args.base_gguf)
    if args.format == "safetensors":
        print(f"merged model written to {written[0]}; try: mistral-qlora generate --model {written[0]} --bits 16 "
              "--prompt ...")
        return 0
    gguf, modelfile = written
    if args.format == "gguf-lora":
        print(f"wrote {gguf} ({gguf.stat().st_size / 1e6:.1f} MB) and {modelfile}\n"
              f"llama.cpp: llama-cli -m BASE.gguf --lora {gguf} -cnv\n"
              f"Ollama:    ollama create NAME -f {modelfile}  (its FROM line names the base GGUF)")
        return 0
    print(f"wrote {gguf} ({gguf.stat().st_size / 1e9:.2f} GB) and {modelfile}\n"
          f"llama.cpp: llama-cli -m {gguf} -cnv\n"
          f"Ollama:    ollama create NAME -f {modelfile}")
    return 0


def cmd_evaluate(args) -> int:
    from mistral_qlora.run.task_eval import TaskSpec
    from mistral_qlora.tools.evaluate import evaluate

    batch = args.batch_size
    if batch != "auto" and not (batch.isdigit() and int(batch) > 0):
        raise UserError(f"--batch-size {batch}: auto or a positive integer")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    spec = TaskSpec(tasks, limit=args.limit, num_fewshot=args.num_fewshot, include_path=args.include_path,
                    chat_template=args.chat_template, batch_size=batch if batch == "auto" else int(batch))
    table, markdown, out = evaluate(args.adapter, args.model, spec, output=args.output, bits=args.bits)
    print(markdown)
    print(f"elapsed {table['elapsed_seconds']:.1f} s (model load {table['load_seconds']:.1f} s); "
          f"written to {out}/results.json and {out}/results.md")
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
    from mistral_qlora.logs import setup_logging

    try:
        if hasattr(args, "config"):  # train, prepare: a bad config fails in a moment, before torch loads
            from mistral_qlora.config import load_config

            args.cfg = load_config(args.config, args.overrides)
        # Library logs and warnings (this imports torch, transformers, datasets): to
        # output_dir/run.log (train), on the console only as errors unless --debug (logs.py).
        setup_logging(debug=args.debug)
        code = args.func(args)
    except UserError as exc:
        _close_progress_bars()
        if args.debug:
            traceback.print_exc()
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
