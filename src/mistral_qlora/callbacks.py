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


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (a collective: call it on all ranks)."""
    if not _distributed():
        return flag
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class CheckpointCommitCallback(TrainerCallback):
    """Seals each checkpoint the Trainer staged (manifest, fsync, rename) and keeps the newest N."""

    def __init__(self, fingerprint: dict, keep: int):
        self.fingerprint = fingerprint
        self.keep = keep
        self.last_committed = None

    def on_save(self, args, state, control, **kwargs):
        from pathlib import Path

        from mistral_qlora.checkpoints import commit, rotate

        barrier()  # every rank has written its part of the checkpoint
        staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and staged.is_dir():
            self.last_committed = commit(staged, self.fingerprint)
            rotate(self.last_committed.parent, self.keep)
        else:
            self.last_committed = Path(args.output_dir).parent / staged.name
        barrier()  # nobody moves on (or exits) before the checkpoint is in place


class PreemptionCallback(TrainerCallback):
    """SIGTERM / SIGUSR1: save a checkpoint at the next step boundary, then stop.

    The signal is only noted in the handler; at each step end the ranks agree (one tiny
    all-reduce when there are several) so all of them save and stop at the same step.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, log=print):
        self.received = None
        self.preempted_at = None
        self._previous = {}
        self._log = log

    def _handler(self, signum, frame):
        import signal

        self.received = signal.Signals(signum).name

    def on_train_begin(self, args, state, control, **kwargs):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(self.received is not None):
            if state.is_world_process_zero:
                self._log(f"{self.received or 'signal'} received: saving a checkpoint at step {state.global_step} and stopping")
            self.preempted_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class DivergenceCallback(TrainerCallback):
    """Stops on a NaN/infinite loss and never lets a non-finite adapter reach a checkpoint."""

    def __init__(self):
        self.diverged_at = None
        self.value = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        import math

        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self._stop(control, state.global_step, loss)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None:
            import torch

            # One reduction, one sync (only on save steps); under ZeRO-3 check the local partition.
            checks = [torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in model.parameters() if p.requires_grad]
            finite = bool(torch.stack(checks).all()) if checks else True
            if not any_rank(not finite):
                return
            self._stop(control, state.global_step, float("nan"))

    def _stop(self, control, step, value):
        if self.diverged_at is None:
            self.diverged_at, self.value = step, value
        control.should_save = False
        control.should_training_stop = True
