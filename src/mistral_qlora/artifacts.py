"""What a run leaves in output_dir: config.yaml, summary.json, loss.png, samples.md.

Every file is written to a temporary name, flushed to disk and renamed, so a reader (or a
killed run) never sees half of one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

SUMMARY = "summary.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 50.0))


def loss_curves(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    return train, evals


def plot_loss(path: Path, log_history: list[dict], title: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = loss_curves(log_history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / answer token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def samples_markdown(prompts: list[str], before: list[str], after: list[str]) -> str:
    lines = ["# Samples", "", "Greedy answers to held-out prompts, before and after training.", ""]
    for i, (p, b, a) in enumerate(zip(prompts, before, after), start=1):
        lines += [f"## {i}. Prompt", "", p, "", "**Before:**", "", b or "_(empty)_", "", "**After:**", "",
                  a or "_(empty)_", ""]
    if not prompts:
        lines.append("_No held-out prompts (no eval split)._")
    return "\n".join(lines) + "\n"
