"""Trainer callbacks: throughput (real tokens/s) in the logs, so users see what the benchmark sees."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second` (real, non-padding tokens, all ranks) to every training log.

    Time is measured between optimizer steps; an interval in which the Trainer evaluated or
    saved is left out, so the number is the training rate alone. The run totals are kept for
    the summary.
    """

    def __init__(self):
        self.train_seconds = 0.0
        self.train_tokens = 0
        self._last_time = None
        self._last_tokens = 0
        self._window_seconds = 0.0
        self._window_tokens = 0
        self._interrupted = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        if not self._interrupted and self._last_time is not None:
            dt, dn = now - self._last_time, tokens - self._last_tokens
            self.train_seconds += dt
            self.train_tokens += dn
            self._window_seconds += dt
            self._window_tokens += dn
        self._interrupted = False
        self._last_time, self._last_tokens = now, tokens

    def _interrupt(self, *args, **kwargs):
        self._interrupted = True

    on_evaluate = on_save = _interrupt

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        if self._window_seconds > 0:
            logs["tokens_per_second"] = round(self._window_tokens / self._window_seconds, 1)
        self._window_seconds, self._window_tokens = 0.0, 0

    @property
    def tokens_per_second(self) -> float | None:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else None
