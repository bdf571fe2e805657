"""Command line: `mistral-qlora {train,prepare,generate,env}` (also `python -m mistral_qlora`).

A `UserError` ends the program with one line on stderr and exit code 2; `--debug` shows the
traceback instead. Heavy imports (torch, transformers) happen inside the subcommands so
`--help` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from mistral_qlora import __version__
from mistral_qlora.errors import EXIT_USER_ERROR, UserError


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
    g = p.add_argument_group("processes (more than one: re-launched through `accelerate launch`)")
    g.add_argument("--nproc", type=int, metavar="N",
                   help="processes on this node (default: $NPROC_PER_NODE, else one per visible GPU, else 1)")
    g.add_argument("--nnodes", type=int, metavar="M", help="nodes in the run (default: $NNODES, else 1)")
    g.add_argument("--node-rank", type=int, metavar="R", help="this node's rank (default: $NODE_RANK, else 0)")
    g.add_argument("--main-addr", metavar="HOST", help="the rank-0 node's address (default: $MASTER_ADDR)")
    g.add_argument("--main-port", type=int, metavar="PORT",
                   help="its rendezvous port (default: $MASTER_PORT, else 29500 on several nodes, a free one on one)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="validate the data and print its statistics (writes nothing)")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("generate", help="answer a prompt with a trained adapter (or a plain model)")
    p.add_argument("--adapter", help="a run's adapter/ folder")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--prompt", action="append", required=True, help="the question (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--bits", type=int, choices=(4, 16), default=4, help="load the base in 4-bit or 16-bit")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("env", help="versions, GPUs, usable attention backends and kernels")
    p.set_defaults(func=cmd_env)
    return parser


def cmd_train(args) -> int:
    from mistral_qlora.config import load_config
    from mistral_qlora.train import run_training

    cfg = load_config(args.config, args.overrides)
    code = _relaunch(args, cfg)
    if code is not None:
        return code
    summary = run_training(cfg, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(cfg.output_dir, summary)
    return 0


def _relaunch(args, cfg) -> int | None:
    """With more than one process to start (and no launcher above us): build the `accelerate
    launch` command for this node, run it, and return its exit code. None: train in-process."""
    from mistral_qlora import launch

    given = [args.nproc, args.nnodes, args.node_rank, args.main_addr, args.main_port]
    explicit = args.nproc is not None or args.nnodes is not None
    if launch.launched_processes() is not None:  # torchrun / accelerate launch already started us
        launch.check_not_relaunched(
            (args.nproc or 1) * (args.nnodes or 1) if explicit else None)
        return None
    spec = launch.launch_spec(*given)
    if spec.world_size == 1:
        return None
    from pathlib import Path

    from mistral_qlora.distributed import plan_strategy
    from mistral_qlora.train import check_output_dir

    check_output_dir(Path(cfg.output_dir), args.overwrite)  # fail here, not in every process
    strategy, why, _ = plan_strategy(cfg, spec.world_size)
    argv = (["--debug"] if args.debug else []) + ["train", args.config]
    for item in args.overrides:
        argv += ["--set", item]
    if strategy != cfg.train.strategy:
        argv += ["--set", f"train.strategy={strategy}"]
    if args.overwrite:
        argv.append("--overwrite")
    env = launch.child_env()
    env["MISTRAL_QLORA_STRATEGY_WHY"] = why  # logged once, by rank 0
    return launch.run(launch.accelerate_command(spec, strategy, argv), env)


def _print_summary(output_dir: str, s: dict) -> None:
    def fmt(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    print(f"\ndone: {s['steps']} steps in {s['runtime_seconds']:.0f} s, attention={s['attention_backend']}, "
          f"strategy={s['strategy']}, world_size={s['world_size']}")
    print(f"eval loss {fmt(s['initial_eval_loss'])} -> {fmt(s['final_eval_loss'])}; "
          f"{fmt(s['tokens_per_second'], ',.0f')} tokens/s; peak memory {fmt(s['peak_memory_gib'], '.2f')} GiB")
    print(f"adapter: {output_dir}/adapter   summary: {output_dir}/summary.json   plot: {output_dir}/loss.png")


def cmd_prepare(args) -> int:
    from mistral_qlora.config import load_config
    from mistral_qlora.prepare import describe_data

    cfg = load_config(args.config, args.overrides)
    print(describe_data(cfg))
    return 0


def cmd_generate(args) -> int:
    from mistral_qlora.generate import generate_answers, load_for_generation

    model, tokenizer = load_for_generation(args.adapter, args.model, bits=args.bits)
    for prompt, answer in zip(args.prompt, generate_answers(model, tokenizer, args.prompt, args.max_new_tokens)):
        print(f"[INST] {prompt} [/INST]\n{answer}\n")
    return 0


def cmd_env(args) -> int:
    from mistral_qlora.envinfo import environment_report

    print(environment_report())
    return 0


def _quiet_libraries() -> None:
    """Library chatter (info logs, deprecation notes) hides our one-line messages; --debug keeps it."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("bitsandbytes", "DeepSpeed", "deepspeed", "accelerate", "datasets", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        _quiet_libraries()
    try:
        code = args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"mistral-qlora: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("mistral-qlora: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
