"""The `bench` and `bench-data` flags (bench/cli.py) default to what the library defaults to:
`BenchOptions`' fields and data_step.py's constants, each written once."""

import dataclasses
import inspect

from mistral_qlora.bench import data_step
from mistral_qlora.bench.options import BenchOptions
from mistral_qlora.cli import build_parser


def test_bench_flags_default_to_the_bench_options_fields():
    args = vars(build_parser().parse_args(["bench"]))
    shared = [f for f in dataclasses.fields(BenchOptions) if f.name in args]
    # every flag of a BenchOptions field but the report file (None for the library, bench.json here)
    assert {f.name for f in shared} >= {"model", "sequences", "median", "sigma", "max_len", "min_len",
                                        "tokens_per_row", "padded_batch_size", "warmup", "timed_rows", "repeats",
                                        "sliding_window", "lora_r", "dtype", "seed"}
    for f in shared:
        if f.name != "out":
            assert args[f.name] == f.default, f.name
    assert args["out"] == "bench.json" and args["no_gradient_checkpointing"] == (not BenchOptions().gradient_checkpointing)


def test_bench_data_flags_default_to_the_data_step_defaults():
    args = build_parser().parse_args(["bench-data"])
    signature = inspect.signature(data_step.bench_data).parameters
    assert args.records == signature["records"].default == data_step.RECORDS
    assert args.baseline_records == signature["baseline_records"].default == data_step.BASELINE_RECORDS
    assert args.max_seq_len == signature["max_seq_len"].default == data_step.MAX_SEQ_LEN
    assert str(signature["workdir"].default) == args.workdir == data_step.WORKDIR
    assert args.phases.split(",") == list(signature["phases"].default) == list(data_step.PHASES)


def test_bench_help_shows_each_default_from_the_options():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = sub.choices["bench"].format_help()
    d = BenchOptions()
    for shown in (f"(default {d.sequences})", f"synthetic median length ({d.median})", f"lognormal sigma ({d.sigma})",
                  f"(default {d.tokens_per_row})", f"{d.model} (default)"):
        assert shown in " ".join(text.split()), shown
    assert "%(default)" not in text
