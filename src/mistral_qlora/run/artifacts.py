"""What a run leaves in output_dir, and the checks before anything is written there.

`config.yaml` first, then at the end `history.json`, `loss.png`, `samples.md` and `summary.json`,
written last: its presence marks a finished run, which is never overwritten without --overwrite.
Every file is written whole (files.py).
"""

from __future__ import annotations

import io
import math
import shutil
import tempfile
from pathlib import Path

from mistral_qlora.errors import UserError
from mistral_qlora.files import atomic_write_bytes, atomic_write_text, write_json

SUMMARY = "summary.json"
# What a run owns in output_dir (removed by --overwrite; nothing else is touched).
RUN_FILES = ("adapter", "checkpoints", "tensorboard", "wandb", SUMMARY, "config.yaml", "loss.png", "samples.md",
             "history.json", "run.log")


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a file, a finished run (without --overwrite) or a folder that cannot be written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir={str(out)!r} is a file, not a folder")
    if (out / SUMMARY).is_file() and not overwrite:
        raise UserError(
            f"output_dir={str(out)!r} holds a finished run; pass --overwrite to replace it "
            "or set output_dir to a new folder"
        )
    # Root ignores permission bits, so ask the filesystem itself: create and remove a probe file
    # in the nearest folder that exists (nothing is left behind).
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UserError(f"output_dir={str(out)!r} is not writable ({probe}: {exc.strerror})") from None


def clear_previous_run(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 50.0))


def loss_curves(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    return train, evals


def plot_loss(path: Path, log_history: list[dict], title: str) -> None:
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


def _prompt_text(prompt) -> str:
    """A prompt string, or a Conversation shown as its system prompt and last question."""
    if isinstance(prompt, str):
        return prompt
    system = getattr(prompt, "system", "")
    return (f"*System:* {system}\n\n" if system else "") + prompt[-1][0]


_VISIBLE = str.maketrans({"\n": "⏎", " ": "␠", "\t": "⇥", "\r": "␍"})


def visible_whitespace(text: str) -> str:
    """`text` with its whitespace as visible marks: newline ⏎, space ␠, tab ⇥, carriage return ␍."""
    return text.translate(_VISIBLE)


def shown_answer(text: str) -> str:
    """A generated answer as Markdown: its text (outer whitespace trimmed); an answer of whitespace
    alone (a model that emits only newlines) as visible marks in a code span, so it is not read as
    no answer at all; nothing generated as _(empty)_."""
    if text.strip():
        return text.strip()
    return f"_(whitespace only)_ `{visible_whitespace(text)}`" if text else "_(empty)_"


def samples_markdown(prompts: list, before: list[str], after: list[str], pairs: list | None = None) -> str:
    """Held-out prompts with the greedy answers before and after training; with `pairs` (a
    preference run's (prompt, chosen, rejected)) each prompt also shows its chosen and rejected answers."""
    lines = ["# Samples", "", "Greedy answers to held-out prompts, before and after training"
             + (", beside the pair's chosen and rejected answers." if pairs else "."), ""]
    for i, (p, b, a) in enumerate(zip(prompts, before, after), start=1):
        lines += [f"## {i}. Prompt", "", _prompt_text(p), ""]
        if pairs:
            lines += ["**Chosen:**", "", shown_answer(pairs[i - 1][1]), "", "**Rejected:**", "",
                      shown_answer(pairs[i - 1][2]), ""]
        lines += ["**Before:**", "", shown_answer(b), "", "**After:**", "", shown_answer(a), ""]
    if not prompts:
        lines.append("_No held-out prompts (no eval split)._")
    return "\n".join(lines) + "\n"


def write_final_artifacts(out: Path, history: list[dict], title: str, prompts: list, before: list[str],
                          after: list[str], summary: dict, pairs: list | None = None) -> None:
    """history.json, loss.png, samples.md, then summary.json: its presence marks a finished run."""
    write_json(out / "history.json", history)
    plot_loss(out / "loss.png", history, title)
    atomic_write_text(out / "samples.md", samples_markdown(prompts, before, after, pairs))
    write_json(out / SUMMARY, summary)
