"""What rank 0 prints while it trains: one plain line per logging step and one per evaluation.

    step STEP/TOTAL | epoch E | loss L | lr LR | grad norm G | N tok/s | MFU M% | ELAPSED | ETA T
    (streaming: `rows R`, the packed rows read from the stream, in place of `epoch E`)
    eval step STEP/TOTAL | loss L | perplexity P
    (preference runs: `reward acc A | margin M` after the loss; eval: also `pref acc P`)

`ConsoleCallback` takes the place of the Trainer's `PrinterCallback` and `ProgressCallback`, which
print each log as a raw dict. Progress bars (the Trainer's, through `ProgressCallback`'s own
methods) are drawn only on a terminal (`logs.progress_bars`): in a pipe, a file, a SLURM or `docker logs`
stream each carriage return of a bar would become a line of its own. The lines go to stdout and to
run.log (mistral_qlora.logs). It runs after ThroughputCallback and EvalPerplexityCallback, whose
values it prints.

The ETA is the steps left times the steady time of a step: measured from the end of the run's
first step on (that step carries compilation, allocator and cache warm-up, which no later step
repeats), leaving out every interval in which the Trainer evaluated or saved. Until one steady
step is measured it shows `?`.
"""

from __future__ import annotations

import sys
import time

from transformers import ProgressCallback

from mistral_qlora.logs import progress_bars, record_line


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_line(logs: dict, step: int, total: int, elapsed: float, eta: float | None) -> str:
    parts = [f"step {step}/{total}"]
    if logs.get("epoch") is not None:
        parts.append(f"epoch {logs['epoch']:.2f}")
    elif logs.get("stream_rows") is not None:  # a stream has no epochs: the rows read from it
        parts.append(f"rows {logs['stream_rows']:,}")
    parts.append(f"loss {logs['loss']:.4f}")
    parts += _preference_parts(logs, "")
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


def _preference_parts(logs: dict, prefix: str) -> list[str]:
    """A preference run's reward accuracy and margin (run/preference.py), when the line has them."""
    if logs.get(f"{prefix}rewards/accuracies") is None:
        return []
    return [f"reward acc {logs[f'{prefix}rewards/accuracies']:.1%}", f"margin {logs[f'{prefix}rewards/margins']:.4g}"]


def eval_line(logs: dict, step: int, total: int) -> str:
    parts = [f"eval step {step}/{total}", f"loss {logs['eval_loss']:.4f}", *_preference_parts(logs, "eval_")]
    if logs.get("eval_preference_accuracy") is not None:
        parts.append(f"pref acc {logs['eval_preference_accuracy']:.1%}")
    if logs.get("eval_perplexity") is not None:
        parts.append(f"perplexity {logs['eval_perplexity']:.4g}")
    return " | ".join(parts)


class ConsoleCallback(ProgressCallback):
    """One line per training log and per evaluation on global rank 0; progress bars only with `bars`
    (by default: on a terminal). `clock` measures the ETA."""

    def __init__(self, bars: bool | None = None, stream=None, clock=time.perf_counter):
        super().__init__()
        self.stream = stream
        self.bars = progress_bars() if bars is None else bars
        self.clock = clock
        self._started = None
        self._last = None  # the end of the previous step, None until the first step has ended
        self._interrupted = False  # an evaluation or a save since the previous step's end
        self._steady_seconds = 0.0
        self._steady_steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._started, self._last = self.clock(), None
        self._steady_seconds, self._steady_steps, self._interrupted = 0.0, 0, False
        if args.eval_on_start and state.global_step == 0 and state.is_world_process_zero:
            self._print("eval: the held-out set before training (the first line's loss)")
        if self.bars:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        if self._last is not None and not self._interrupted:
            self._steady_seconds += now - self._last
            self._steady_steps += 1
        self._last, self._interrupted = now, False
        if self.bars:
            super().on_step_end(args, state, control, **kwargs)

    def on_save(self, args, state, control, **kwargs):
        self._interrupted = True

    def eta(self, step: int, total: int) -> float | None:
        """Seconds left at `step` of `total`, at the steady time per step (None until measured)."""
        if self._steady_steps == 0:
            return None
        return self._steady_seconds / self._steady_steps * max(total - step, 0)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bars:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_evaluate(self, args, state, control, **kwargs):
        self._interrupted = True
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
            elapsed = self.clock() - self._started if self._started is not None else 0.0
            self._print(train_line(logs, step, total, elapsed, self.eta(step, total)))
        elif "eval_loss" in logs:
            self._print(eval_line(logs, step, total))

    def _print(self, line: str) -> None:
        bar = getattr(self, "training_bar", None)
        if bar is not None and self.stream is None:
            bar.write(line)  # above the bar, which is redrawn below it
        else:
            print(line, file=self.stream or sys.stdout, flush=True)
        record_line(line)
