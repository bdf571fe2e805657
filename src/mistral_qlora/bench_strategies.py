"""One GPU, one process: the plain single-GPU path against ZeRO-2 and ZeRO-3 on a random-weight
Mistral-7B (NF4 + LoRA r16 on all linears, packed 8192-token rows), through `mistral-qlora train`
exactly as users run it. Prints a markdown table of steady-state tokens/s and peak memory.

    python -m mistral_qlora.bench_strategies [--model random:mistral-7b] [--steps 16] \
        [--strategies single,zero2,zero3] [--out /tmp/bench-strategies]

`random:mistral-7b` is built on the first run (modeling/random7b.py), the data is synthetic Q&A with lognormal lengths (median ~256
tokens, at most 4096). Each strategy runs in its own process, one after the other.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

from mistral_qlora.distributed import project_dir
from mistral_qlora.modeling.model import resolve_model_path

WORDS = ("the river carries water from the hills to the sea and plants along its banks grow tall because "
         "farmers use it to water fields while children learn how rain clouds form when the sun warms lakes "
         "so that vapour rises cools and falls again as rain over the land").split()


def write_data(path: Path, records: int = 3000, seed: int = 0) -> None:
    rng = random.Random(seed)
    out = []
    for _ in range(records):
        # ~1.3 tokens a word; lognormal total length, median ~256 tokens, capped at 4096
        words = min(3000, max(16, int(math.exp(rng.gauss(math.log(190), 0.9)))))
        q = " ".join(rng.choice(WORDS) for _ in range(max(4, words // 8)))
        a = " ".join(rng.choice(WORDS) for _ in range(words - words // 8))
        out.append({"prompt": q.capitalize() + "?", "response": a.capitalize() + "."})
    path.write_text(json.dumps(out))


def run(strategy: str, model: str, data: Path, out: Path, steps: int, tokens_per_row: int = 8192) -> dict:
    sets = {
        "model.name_or_path": model, "data.train": data, "data.eval_fraction": 0, "data.max_seq_len": min(4096, tokens_per_row),
        "data.tokens_per_row": tokens_per_row, "train.micro_batch_size": 1, "train.max_steps": steps,
        "train.logging_steps": 1, "train.save_steps": 100000, "train.learning_rate": 2e-4,
        "train.strategy": strategy, "lora.r": 16, "eval.samples": 0, "output_dir": out,
    }
    cmd = [sys.executable, "-m", "mistral_qlora", "train", str(project_dir("configs") / "tiny.yaml"), "--overwrite"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (out.parent / f"{strategy}.log").write_text(log)
    if proc.returncode != 0:
        return {"strategy": strategy, "error": log[-3000:]}
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "history.json").read_text())
    logs = [e for e in history if "num_input_tokens_seen" in e and "train_runtime" in e]
    steady = None
    if len(logs) > 4:  # from the end of step 3 on: the first steps include CUDA/kernel warm-up
        a, b = logs[2], logs[-1]
        steady = (b["num_input_tokens_seen"] - a["num_input_tokens_seen"]) / (b["train_runtime"] - a["train_runtime"])
    return {
        "strategy": strategy, "tokens_per_second_steady": steady,
        "tokens_per_second_run": summary["tokens_per_second"], "peak_memory_gib": summary["peak_memory_gib"],
        "attention": summary["attention_backend"], "steps": summary["steps"], "world_size": summary["world_size"],
        "wall_seconds": round(time.time() - t0, 1), "train_runtime_seconds": summary["runtime_seconds"],
        "strategy_line": next((line for line in log.splitlines() if "train.strategy=" in line and "(" in line), ""),
    }


def _estimate(model_dir: str, tokens_per_row: int):
    import torch

    from mistral_qlora.config import load_config
    from mistral_qlora.distributed import estimate_memory
    from mistral_qlora.modeling.model import load_model_config

    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"data.tokens_per_row={tokens_per_row}",
                             f"data.max_seq_len={min(4096, tokens_per_row)}", "train.micro_batch_size=1"])
    dtype_bytes = 2 if torch.cuda.is_available() else 4
    return estimate_memory(load_model_config(model_dir, cfg.model), cfg, dtype_bytes)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:mistral-7b", help="random:mistral-7b, a hub id or a local folder")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-strategies"))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--strategies", default="single,zero2,zero3")
    ap.add_argument("--tokens-per-row", type=int, default=8192)
    args = ap.parse_args()
    model_dir = resolve_model_path(args.model)  # builds random:mistral-7b once, before the runs
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data.json"
    if not data.is_file():
        write_data(data)
    estimate = _estimate(model_dir, args.tokens_per_row)
    results = []
    for strategy in args.strategies.split(","):
        r = run(strategy, model_dir, data, args.out / strategy, args.steps, args.tokens_per_row)
        r["estimated_gib"] = round(estimate.per_gpu(strategy, 1) / 2**30, 1)  # what train.strategy=auto assumes
        print(json.dumps(r), flush=True)
        results.append(r)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| strategy (1 process) | tokens/s (steps 4+) | tokens/s (whole run) | peak GiB | auto's estimate GiB |")
    print("|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['strategy']} | failed | | | |")
        else:
            print(f"| {r['strategy']} | {_fmt(r['tokens_per_second_steady'], ',.0f')} "
                  f"| {_fmt(r['tokens_per_second_run'], ',.0f')} | {_fmt(r['peak_memory_gib'], '.1f')} "
                  f"| {r['estimated_gib']} |")


if __name__ == "__main__":
    main()
