"""What rank 0 prints while it trains: one plain line per logging step and one per evaluation.

    step STEP/TOTAL | epoch E | loss L | lr LR | grad norm G | N tok/s | MFU M% | ELAPSED | ETA T
    eval step STEP/TOTAL | loss L | perplexity P

`ConsoleCallback` takes the place of the Trainer's `PrinterCallback` and `ProgressCallback`, which
print each log as a raw dict. Progress bars (the Trainer's, through `ProgressCallback`'s own
methods) are drawn only when stdout is a terminal: in a pipe, a file, a SLURM or `docker logs`
stream each carriage return of a bar would become a line of its own. The lines go to stdout and to
run.log (mistral_qlora.logs). It runs after ThroughputCallback and EvalPerplexityCallback, whose
values it prints.
"""

from __future__ import annotations

import sys
import time

from transformers import ProgressCallback

from mistral_qlora.logs import record_line


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_line(logs: dict, step: int, total: int, elapsed: float, eta: float | None) -> str:
    parts = [f"step {step}/{total}"]
    if logs.get("epoch") is not None:
        parts.append(f"epoch {logs['epoch']:.2f}")
    parts.append(f"loss {logs['loss']:.4f}")
    if logs.get("learning_rate") is not None:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if logs.get("grad_norm") is not None:
        parts.append(f"grad norm {logs['grad_norm']:.3g}")
    if logs.get("tokens_per_second") is not None:
        parts.append(f"{logs['tokens_per_second']:,.0f} tok/s")
    if logs.get("mfu") is not None:
        parts.append(f"MFU {logs['mfu']:.1%}")
    parts.append(_clock(elapsed))
    parts.append("ETA " + (_clock(eta) if eta is not None else "?"))
    return " | ".join(parts)


def eval_line(logs: dict, step: int, total: int) -> str:
    parts = [f"eval step {step}/{total}", f"loss {logs['eval_loss']:.4f}"]
    if logs.get("eval_perplexity") is not None:
        parts.append(f"perplexity {logs['eval_perplexity']:.4g}")
    return " | ".join(parts)


class ConsoleCallback(ProgressCallback):
    """One line per training log and per evaluation on global rank 0; progress bars only with `bars`
    (stdout a terminal)."""

    def __init__(self, bars: bool | None = None, stream=None):
        super().__init__()
        self.stream = stream
        self.bars = sys.stdout.isatty() if bars is None else bars
        self._started = None
        self._start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._started, self._start_step = time.perf_counter(), state.global_step
        if self.bars:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bars:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bars:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.bars:
            super().on_evaluate(args, state, control, **kwargs)

    def on_predict(self, args, state, control, **kwargs):
        if self.bars:
            super().on_predict(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bars:
            super().on_train_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        step, total = state.global_step, state.max_steps
        if "loss" in logs:
            elapsed = time.perf_counter() - self._started if self._started is not None else 0.0
            done = step - self._start_step
            eta = elapsed / done * (total - step) if done > 0 else None
            self._print(train_line(logs, step, total, elapsed, eta))
        elif "eval_loss" in logs:
            self._print(eval_line(logs, step, total))

    def _print(self, line: str) -> None:
        bar = getattr(self, "training_bar", None)
        if bar is not None and self.stream is None:
            bar.write(line)  # above the bar, which is redrawn below it
        else:
            print(line, file=self.stream or sys.stdout, flush=True)
        record_line(line)
