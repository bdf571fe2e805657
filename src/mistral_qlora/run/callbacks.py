"""The Trainer callbacks a run installs (run/trainer.py puts them in order):

- `ThroughputCallback`: real tokens/s and MFU in every log, as the benchmark measures them;
- `EvalPerplexityCallback`: the perplexity next to each eval loss;
- `PreemptionCallback`: SIGTERM/SIGUSR1 -> a checkpoint at the next step boundary, then stop;
- `DivergenceCallback`: a NaN/infinite loss stops the run, and no checkpoint of it is written;
- `SamplesCallback`: answers to held-out prompts before the first step;
- `CompletedCheckpointCallback`: a run resumed at its last step trains no further;
- `AdapterCheckCallback`: every checkpoint's adapter read back and checked;
- `CheckpointCommitCallback`: every checkpoint sealed and renamed into place (run/checkpoints.py).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from mistral_qlora.data.stream import POSITION_FILE as STREAM_POSITION
from mistral_qlora.files import atomic_write_text
from mistral_qlora.flops import mfu
from mistral_qlora.model.adapter import check_adapter
from mistral_qlora.model.greedy import greedy_answers
from mistral_qlora.run.artifacts import perplexity
from mistral_qlora.run.checkpoints import commit, restore_rng_state, rotate
from mistral_qlora.runtime import any_rank, barrier


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second` (real, non-padding tokens, all ranks) to every training log, and
    `mfu` (mistral_qlora.flops) where the GPUs' peak is known.

    Time is measured between optimizer steps; an interval in which the Trainer evaluated or
    saved is left out, so the number is the training rate alone. The run totals are kept for
    the summary.
    """

    def __init__(self, flops_per_token: float = 0.0, peak_flops_all_gpus: float | None = None):
        self.flops_per_token = flops_per_token
        self.peak_flops_all_gpus = peak_flops_all_gpus
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
            rate = self._window_tokens / self._window_seconds
            # stored unrounded (history.json, trackers): the console rounds what it shows
            added = {"tokens_per_second": rate}
            if self.peak_flops_all_gpus:
                added["mfu"] = mfu(rate, self.flops_per_token, self.peak_flops_all_gpus)
            logs.update(added)  # what the console and TensorBoard callbacks after this one print
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(added)  # the Trainer stored a copy: history.json
        self._window_seconds, self._window_tokens = 0.0, 0

    @property
    def tokens_per_second(self) -> float | None:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else None

    @property
    def mfu(self) -> float | None:
        return mfu(self.tokens_per_second, self.flops_per_token, self.peak_flops_all_gpus)


class EvalPerplexityCallback(TrainerCallback):
    """Adds `eval_perplexity` = exp(eval_loss) to every evaluation's log (and its history entry),
    before the console and trackers see it; not to a preference run's (its eval loss is DPO's or
    ORPO's, not a token cross-entropy)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "eval_loss" not in logs or "eval_rewards/accuracies" in logs:
            return
        value = perplexity(logs["eval_loss"])
        if value is not None:
            logs["eval_perplexity"] = value
            if state.log_history and state.log_history[-1].get("eval_loss") == logs["eval_loss"]:
                state.log_history[-1]["eval_perplexity"] = value


class CheckpointCommitCallback(TrainerCallback):
    """Seals each checkpoint the Trainer staged (manifest, fsync, rename) and keeps the newest N."""

    def __init__(self, fingerprint: dict, keep: int):
        self.fingerprint = fingerprint
        self.keep = keep
        self.last_committed = None

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank has written its part of the checkpoint
        staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and staged.is_dir():
            self.last_committed = commit(staged, self.fingerprint)
            rotate(self.last_committed.parent, self.keep)
        else:
            self.last_committed = Path(args.output_dir).parent / staged.name
        barrier()  # nobody moves on (or exits) before the checkpoint is in place


class StreamPositionCallback(TrainerCallback):
    """Streaming: each checkpoint records where the stream is (data/stream.py), as `stream.json`,
    before the commit seals it. Every optimizer step consumes `rows_per_step` rows of the stream
    (micro-batch x accumulation x processes), whatever the data loader has read ahead.

    A stream has no length, so the Trainer's `epoch` in a log is only the step over `max_steps`,
    counted again from zero after a resume: each log (and its history entry) shows instead
    `stream_rows`, the packed rows read from the stream so far, the count `stream.json` resumes from."""

    def __init__(self, stream, rows_per_step: int, resume_from: Path | None = None):
        self.stream = stream
        self.rows_per_step = rows_per_step
        self.resume_from = resume_from  # its random generators are restored before the first step

    def on_step_begin(self, args, state, control, **kwargs):
        # Where the Trainer restores them when it resumes by skipping batches: after the first
        # batches of the resumed run are fetched, before the forward pass.
        if self.resume_from is not None:
            restore_rng_state(self.resume_from, args.world_size, args.process_index)
            self.resume_from = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        entry = state.log_history[-1] if state.log_history and state.log_history[-1].get("step") == state.global_step \
            else {}
        for shown in (logs, entry):
            shown.pop("epoch", None)
            shown["stream_rows"] = state.global_step * self.rows_per_step

    def on_save(self, args, state, control, **kwargs):
        staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and staged.is_dir():
            position = self.stream.position_at(state.global_step * self.rows_per_step)
            atomic_write_text(staged / STREAM_POSITION, json.dumps(position))


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
        self.received = signal.Signals(signum).name

    def on_train_begin(self, args, state, control, **kwargs):
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
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class DivergenceCallback(TrainerCallback):
    """Stops on a NaN/infinite loss and never lets a non-finite adapter reach a checkpoint."""

    def __init__(self):
        self.diverged_at = None
        self.value = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self._stop(control, state.global_step, loss)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None:
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


class SamplesCallback(TrainerCallback):
    """Answers to the held-out prompts before the first step, generated once the Trainer has built
    its engine: under ZeRO-3 the layers are gathered collectively, so every rank generates (in
    lockstep) and rank 0 writes them. Put it before ThroughputCallback so its time is not counted."""

    def __init__(self, model, tokenizer, prompts: list, max_new_tokens: int, template=None):
        self.model, self.tokenizer, self.prompts, self.max_new_tokens = model, tokenizer, prompts, max_new_tokens
        self.template = template  # the run's chat template (TrainingData.template)
        self.before: list[str] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.before = greedy_answers(self.model, self.tokenizer, self.prompts, self.max_new_tokens, self.template)


class RunAlreadyComplete(Exception):
    """The resumed checkpoint was saved at the run's last step: there is nothing left to train."""

    def __init__(self, step: int):
        super().__init__(f"the checkpoint is at step {step}, the run's last")
        self.step = step


class CompletedCheckpointCallback(TrainerCallback):
    """Stops a run resumed from a checkpoint of its last step before the Trainer trains once more.

    The Trainer checks `max_steps` only after a step, so resuming from its final checkpoint (a
    kill after that checkpoint was committed, before the adapter and summary were written) would
    train one step too many, and the adapter would differ from the uninterrupted run's. At
    `on_train_begin` the Trainer has already loaded the checkpoint's weights and state; raising
    here hands the run back to `train.py` for its final evaluation and artifacts."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise RunAlreadyComplete(state.global_step)


class AdapterCheckCallback(TrainerCallback):
    """Every checkpoint's adapter is read back on rank 0: an empty LoRA tensor stops the run."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            check_adapter(Path(args.output_dir) / f"checkpoint-{state.global_step}")

