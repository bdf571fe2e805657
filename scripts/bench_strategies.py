#!/usr/bin/env python3
"""One GPU, one process: the plain single-GPU path against ZeRO-2 and ZeRO-3 on a random-weight
Mistral-7B (NF4 + LoRA r16 on all linears, packed 8192-token rows), through `mistral-qlora train`
exactly as users run it. Prints a markdown table of steady-state tokens/s and peak memory.

    python scripts/bench_strategies.py [--model-dir /tmp/mistral-7b-random] [--steps 16] \
        [--strategies single,zero2,zero3] [--out /tmp/bench-strategies]

The checkpoint is built on the first run (random weights from a fixed seed, bf16 safetensors,
the real Mistral v1 tokenizer), the data is synthetic Q&A with lognormal lengths (median ~256
tokens, at most 4096). Each strategy runs in its own process, one after the other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MISTRAL_7B_V02 = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rope_theta=1_000_000.0,
    sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
WORDS = ("the river carries water from the hills to the sea and plants along its banks grow tall because "
         "farmers use it to water fields while children learn how rain clouds form when the sun warms lakes "
         "so that vapour rises cools and falls again as rain over the land").split()


def build_checkpoint(folder: Path) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from mistral_qlora.modeling.tokenizer import write_mistral_v1_tokenizer

    t0 = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = MistralForCausalLM(MistralConfig(**MISTRAL_7B_V02))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, max_shard_size="5GB")
    write_mistral_v1_tokenizer(folder)
    del model
    print(f"built {folder} in {time.time() - t0:.0f} s", file=sys.stderr)


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


def run(strategy: str, model_dir: Path, data: Path, out: Path, steps: int, tokens_per_row: int = 8192) -> dict:
    sets = {
        "model.name_or_path": model_dir, "data.train": data, "data.eval_fraction": 0, "data.max_seq_len": min(4096, tokens_per_row),
        "data.tokens_per_row": tokens_per_row, "train.micro_batch_size": 1, "train.max_steps": steps,
        "train.logging_steps": 1, "train.save_steps": 100000, "train.learning_rate": 2e-4,
        "train.strategy": strategy, "lora.r": 16, "eval.samples": 0, "output_dir": out,
    }
    cmd = [sys.executable, "-m", "mistral_qlora", "train", str(ROOT / "configs" / "tiny.yaml"), "--overwrite"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (out.parent / f"{strategy}.log").write_text(log)
    if proc.returncode != 0:
        return {"strategy": strategy, "error": log[-3000:]}
    summary = json.loads((out / "summary.json").read_text())
    state = json.loads(next((out / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    logs = [e for e in state["log_history"] if "num_input_tokens_seen" in e and "train_runtime" in e]
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


def _estimate(model_dir: Path, tokens_per_row: int):
    import torch

    from mistral_qlora.config import load_config
    from mistral_qlora.distributed import estimate_memory
    from mistral_qlora.modeling.model import load_model_config

    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"data.tokens_per_row={tokens_per_row}",
                             f"data.max_seq_len={min(4096, tokens_per_row)}", "train.micro_batch_size=1"])
    dtype_bytes = 2 if torch.cuda.is_available() else 4
    return estimate_memory(load_model_config(str(model_dir), cfg.model), cfg, dtype_bytes)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/mistral-7b-random"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-strategies"))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--strategies", default="single,zero2,zero3")
    ap.add_argument("--tokens-per-row", type=int, default=8192)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    if not (args.model_dir / "config.json").is_file():
        build_checkpoint(args.model_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data.json"
    if not data.is_file():
        write_data(data)
    estimate = _estimate(args.model_dir, args.tokens_per_row)
    results = []
    for strategy in args.strategies.split(","):
        r = run(strategy, args.model_dir, data, args.out / strategy, args.steps, args.tokens_per_row)
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
