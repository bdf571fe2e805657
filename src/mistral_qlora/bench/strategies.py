"""`mistral-qlora bench --strategies single,zero2,zero3`: the plain single-GPU path against ZeRO-2 and
ZeRO-3 in one process on one GPU, through `mistral-qlora train` exactly as users run it.

Each strategy trains `steps` steps of packed rows of synthetic prompt/response records
(synthetic.py) in its own process, one after the other; the table gives the steady-state
tokens/s (from the end of step 3 on: the first steps include CUDA and kernel warm-up), the whole
run's, the peak memory, and what `train.strategy=auto` estimates for that strategy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from mistral_qlora.bench.report import now, write_report
from mistral_qlora.config import validate_config
from mistral_qlora.bench.synthetic import qa_records
from mistral_qlora.model.base import load_model_config, resolve_model_path
from mistral_qlora.plan.memory import GIB, estimate_memory
from mistral_qlora.runtime import resolve_dtype


def strategy_config(strategy: str, model_path: str, data: Path, out: Path, steps: int, tokens_per_row: int):
    return validate_config({
        "model": {"name_or_path": model_path},
        "data": {"train": str(data), "eval_fraction": 0, "max_seq_len": min(4096, tokens_per_row),
                 "tokens_per_row": tokens_per_row},
        "train": {"micro_batch_size": 1, "max_steps": steps, "logging_steps": 1, "save_steps": 100000,
                  "learning_rate": 2e-4, "strategy": strategy},
        "lora": {"r": 16},
        "eval": {"samples": 0},
        "output_dir": str(out),
    }, source="bench --strategies")


def run_strategy(strategy: str, cfg, work: Path) -> dict:
    """Train one strategy through the CLI in a process of its own; its figures from summary.json
    and history.json."""
    config_file = work / f"{strategy}.yaml"
    config_file.write_text(cfg.to_yaml())
    log_file = work / f"{strategy}.log"
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "mistral_qlora", "train", str(config_file), "--overwrite"],
                          capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    log_file.write_text(log)
    if proc.returncode != 0:
        return {"strategy": strategy, "error": log[-3000:], "log": str(log_file)}
    out = Path(cfg.output_dir)
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "history.json").read_text())
    logs = [e for e in history if "num_input_tokens_seen" in e and "train_runtime" in e]
    steady = None
    if len(logs) > 4:
        a, b = logs[2], logs[-1]
        steady = (b["num_input_tokens_seen"] - a["num_input_tokens_seen"]) / (b["train_runtime"] - a["train_runtime"])
    return {
        "strategy": strategy, "tokens_per_second_steady": steady,
        "tokens_per_second_run": summary["tokens_per_second"], "peak_memory_gib": summary["peak_memory_gib"],
        "attention": summary["attention_backend"], "steps": summary["steps"], "world_size": summary["world_size"],
        "wall_seconds": round(time.time() - started, 1), "train_runtime_seconds": summary["runtime_seconds"],
        "strategy_line": next((line for line in log.splitlines() if "train.strategy=" in line and "(" in line), ""),
        "log": str(log_file),
    }


def run_strategies(model: str, strategies: list[str], steps: int, tokens_per_row: int, work_dir: str,
                   out: str | None, model_dir: str | None = None) -> dict:
    model_path = resolve_model_path(model, random_dir=model_dir)  # builds random:mistral-7b once, before the runs
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.json"
    if not data.is_file():
        data.write_text(json.dumps(qa_records()))
    results = []
    for strategy in strategies:
        cfg = strategy_config(strategy, model_path, data, work / strategy, steps, tokens_per_row)
        estimate = estimate_memory(load_model_config(model_path, cfg.model), cfg, resolve_dtype("auto").itemsize)
        r = run_strategy(strategy, cfg, work)
        r["estimated_gib"] = round(estimate.per_gpu(strategy, 1) / GIB, 1)  # what train.strategy=auto assumes
        print(f"bench --strategies: {json.dumps(r)[:400]}", flush=True)
        results.append(r)
    report = {"date": now(), "model": model, "steps": steps, "tokens_per_row": tokens_per_row, "results": results}
    write_report(out, report)
    return report
