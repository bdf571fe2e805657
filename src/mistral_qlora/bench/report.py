"""The bench's JSON report and the tables it prints."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from mistral_qlora.bench.gpu_clocks import describe as describe_clocks
from mistral_qlora.files import write_json


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def environment(dtype) -> dict:
    """Versions, the card and the dtype, recorded with every report."""
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {name: version(name) for name in ("torch", "transformers", "peft", "bitsandbytes", "flash-attn",
                                            "liger-kernel")}
    env["python"] = platform.python_version()
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    env["dtype"] = str(dtype).removeprefix("torch.")
    return env


def write_report(out: str | None, report: dict) -> None:
    """The JSON report at `out`, its folder made, where one was asked for."""
    if out:
        write_json(Path(out), report)


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def format_report(report: dict) -> str:
    env = report["environment"]
    repeats = report["options"].get("repeats", 1)
    lines = [
        f"bench: {report['model']} on {env['device']}, {env['dtype']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, {report['date']}",
        f"lengths: {report['lengths']}",
        f"timed: {report['timed_rows']} rows of {report['tokens_per_row']} tokens = {report['timed_sequences']} "
        f"sequences (packing efficiency {report['packing_efficiency']:.1%}); padded batches of "
        f"{report['padded_batch_size']} on the same sequences"
        f"{'' if repeats == 1 else f', timed {repeats} times (median)'}"
        f"; LoRA r={report['lora_r']}, "
        f"activation checkpointing {'on' if report['gradient_checkpointing'] else 'off'}",
        "",
        f"| {'recipe':<32} | {'real tok/s':>10} | {'MFU':>6} | {'padding':>7} | {'peak GiB':>8} | {'vs tutorial':>11} | "
        f"{'vs plain':>8} | {'steps':>5} |",
        f"|{'-' * 34}|{'-' * 11}:|{'-' * 7}:|{'-' * 8}:|{'-' * 9}:|{'-' * 12}:|{'-' * 9}:|{'-' * 6}:|",
    ]
    for r in report["results"]:
        if r["error"]:
            lines.append(f"| {r['recipe']:<32} | failed: {r['error']}")
            continue
        ratio = {k: _fmt(r.get(k), '.2f') + 'x' if r.get(k) else 'n/a' for k in ("vs_tutorial", "vs_plain")}
        lines.append(
            f"| {r['recipe']:<32} | {_fmt(r['tokens_per_second'], ',.0f'):>10} | {_fmt(r.get('mfu'), '.1%'):>6} | "
            f"{_fmt(r['padding_fraction'], '.1%'):>7} | {_fmt(r['peak_memory_gib'], '.1f'):>8} | "
            f"{ratio['vs_tutorial']:>11} | {ratio['vs_plain']:>8} | {r['steps']:>5} |"
        )
    clocked = [r for r in report["results"] if r.get("gpu_clocks")]
    if clocked:
        lines += ["", "the GPU's SM clock and power over the timed passes (median; what held the clock back):"]
        lines += [f"  {r['recipe']:<32} {describe_clocks(r['gpu_clocks'])}" for r in clocked]
    for r in report["results"]:
        if r.get("profile"):
            lines += ["", f"where one step of {r['recipe']} spends its GPU time"
                      + (f" (at {describe_clocks(r['profile_gpu_clocks'])}):" if r.get("profile_gpu_clocks") else ":")]
            lines += [f"  {kind:<34} {v['ms']:>9.1f} ms  {v['share']:>6.1%}" for kind, v in r["profile"].items()]
            if r.get("profile_kernels"):
                lines += ["  the kernels that took longest:"]
                lines += [f"  {k['ms']:>9.1f} ms {k['calls']:>5}x  {k['kernel'][:90]}" for k in r["profile_kernels"]]
    return "\n".join(lines)


def format_compare(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"bench --compare: {report['recipe']} on {report['model']}, {env['device']}, {env['dtype']}, "
        f"torch {env['torch']}, {report['date']}",
        f"{report['timed_rows']} rows of {report['tokens_per_row']} tokens a pass; the variants took turns "
        f"{report['repeats']} times (median pass)",
        "",
        f"| {'variant':<28} | {'real tok/s':>10} | {'vs planned':>10} | {'MFU':>6} | {'peak GiB':>8} | passes",
        f"|{'-' * 30}|{'-' * 11}:|{'-' * 11}:|{'-' * 7}:|{'-' * 9}:|--------",
    ]
    for v in report["variants"]:
        lines.append(f"| {v['variant']:<28} | {v['tokens_per_second']:>10,.0f} | {v['vs_planned'] - 1:>+10.1%} | "
                     f"{_fmt(v['mfu'], '.1%'):>6} | {_fmt(v['peak_memory_gib'], '.1f'):>8} | "
                     + " / ".join(f"{p:,.0f}" for p in v["passes"]))
    clocked = [v for v in report["variants"] if v.get("gpu_clocks")]
    if clocked:
        lines += ["", "the GPU's SM clock and power over each variant's passes (median; what held the clock back):"]
        lines += [f"  {v['variant']:<28} {describe_clocks(v['gpu_clocks'])}" for v in clocked]
    return "\n".join(lines)


def format_strategies(report: dict) -> str:
    lines = [f"bench --strategies: {report['model']}, {report['steps']} steps of packed {report['tokens_per_row']}-token "
             f"rows through `train`, one process each, {report['date']}",
             "",
             "| strategy (1 process) | tokens/s (steps 4+) | tokens/s (whole run) | peak GiB | auto's estimate GiB |",
             "|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['strategy']} | failed (log: {r['log']}) | | | |")
        else:
            lines.append(f"| {r['strategy']} | {_fmt(r['tokens_per_second_steady'], ',.0f')} "
                         f"| {_fmt(r['tokens_per_second_run'], ',.0f')} | {_fmt(r['peak_memory_gib'], '.1f')} "
                         f"| {r['estimated_gib']} |")
    return "\n".join(lines)
