"""The straggler report: how long each rank computes per step, and a warning when one rank is
persistently slower than the others.

What is timed is each rank's forward compute per optimizer step (its micro-batches' forwards
summed), through forward hooks on the model. A rank's wall time per step says nothing here: in
synchronous data parallelism every rank leaves a step's gradient collective together, the fast ones
having waited there for the slow one, so all wall times equal the slowest rank's. The forward of
the model inside DDP's or DeepSpeed's wrapper holds no collective under DDP and ZeRO-2, so a slow
rank (a throttled GPU, a busy host, a slow data worker's host contention) shows there alone; under
ZeRO-3 the forward gathers parameters, so its times include some of that waiting and understate
the spread.

At each logging step the ranks' min/median/max over the window since the last one are gathered
(one collective, on every rank, at the same log events) and rank 0 writes one line to run.log and
`forward_s/rank<R>/{min,median,max}` plus `forward_s/spread` (the slowest rank's median over the
median of the others' medians) to the logs the console and the trackers read. A rank whose median is
`factor` times the others' in WINDOWS logging windows in a row is named in a warning on the
console, once until it recovers.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import TrainerCallback

from mistral_qlora.logs import record_line

WINDOWS = 3  # logging windows in a row that make a slow rank a persistent straggler


def window_stats(times: list[float]) -> list[float]:
    """[min, median, max] of one rank's per-step times; NaNs when it measured no step."""
    if not times:
        return [float("nan")] * 3
    return [min(times), statistics.median(times), max(times)]


def slow_ranks(medians: list[float], factor: float) -> list[int]:
    """The ranks whose median is at least `factor` times the median of the other ranks' medians."""
    slow = []
    for r, m in enumerate(medians):
        others = [x for i, x in enumerate(medians) if i != r and x == x]
        if others and m == m and m >= factor * statistics.median(others):
            slow.append(r)
    return slow


def spread(medians: list[float]) -> float | None:
    """The slowest rank's median over the median of the other ranks' medians (1.0: all alike)."""
    known = [m for m in medians if m == m]
    if len(known) < 2:
        return None
    slowest = max(range(len(known)), key=known.__getitem__)
    rest = statistics.median(known[:slowest] + known[slowest + 1:])
    return known[slowest] / rest if rest > 0 else None


class StragglerCallback(TrainerCallback):
    """See the module docstring. `factor`: None reports without warning."""

    def __init__(self, rank: int, world_size: int, factor: float | None, warn=print, windows: int = WINDOWS):
        self.rank, self.world_size, self.factor, self._warn, self.windows = rank, world_size, factor, warn, windows
        self._times: list[float] = []  # this rank's forward seconds per step in the current window
        self._step = 0.0
        self._started: list = []
        self._cuda = False
        self._pending: list = []  # (start, end) CUDA events of this step's forwards
        self._hooks = []
        self._slow_for: dict[int, int] = {}  # rank -> logging windows in a row it was slow
        self._warned: set[int] = set()

    # timing
    def _before(self, module, args, kwargs=None):
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._started.append(start)
        else:
            self._started.append(time.perf_counter())

    def _after(self, module, args, output):
        if not self._started:
            return
        start = self._started.pop()
        if self._cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((start, end))
        else:
            self._step += time.perf_counter() - start

    def watch(self, model: torch.nn.Module, cuda: bool = False) -> None:
        """Time `model`'s forwards (once; the hooks stay for the run)."""
        if self._hooks:
            return
        self._cuda = cuda
        self._hooks = [model.register_forward_pre_hook(self._before), model.register_forward_hook(self._after)]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.watch(model, cuda=next(model.parameters()).is_cuda)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step, self._started = 0.0, []
        if self._cuda:
            self._pending = []

    def on_step_end(self, args, state, control, **kwargs):
        if not self._hooks:
            return
        if self._cuda:  # the events of this step, read once its work is done
            for _, end in self._pending:
                end.synchronize()
            self._step = sum(start.elapsed_time(end) for start, end in self._pending) / 1000
        self._times.append(self._step)

    # reporting
    def _gather(self, mine: list[float]) -> list[list[float]]:
        import torch.distributed as dist

        if self.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return [mine]
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        out = [torch.zeros(3, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(out, torch.tensor(mine, dtype=torch.float64, device=device))
        return [t.tolist() for t in out]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return  # a training logging step on every rank alike, so the gather below meets on all
        ranks = self._gather(window_stats(self._times))
        steps = len(self._times)
        self._times = []
        if not state.is_world_process_zero:
            return
        added = {}
        for r, (lo, mid, hi) in enumerate(ranks):
            added.update({f"forward_s/rank{r}/min": lo, f"forward_s/rank{r}/median": mid, f"forward_s/rank{r}/max": hi})
        medians = [mid for _, mid, _ in ranks]
        ratio = spread(medians)
        if ratio is not None:
            added["forward_s/spread"] = ratio
        logs.update(added)  # what the console and the trackers after this callback see
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)  # the Trainer stored a copy: history.json
        record_line(f"forward time per step, {steps} step(s) to step {state.global_step} (s, min/median/max): "
                    + "; ".join(f"rank {r} {lo:.3g}/{mid:.3g}/{hi:.3g}" for r, (lo, mid, hi) in enumerate(ranks)))
        self.note_window(medians, state.global_step)

    def note_window(self, medians: list[float], step: int) -> None:
        """Count each rank's slow windows in a row; warn once when one reaches `windows`."""
        if self.factor is None:
            return
        slow = set(slow_ranks(medians, self.factor))
        for r in range(len(medians)):
            self._slow_for[r] = self._slow_for.get(r, 0) + 1 if r in slow else 0
            if r not in slow:
                self._warned.discard(r)
            elif self._slow_for[r] >= self.windows and r not in self._warned:
                self._warned.add(r)
                others = statistics.median([m for i, m in enumerate(medians) if i != r])
                self._warn(f"warning: rank {r} is a straggler: its forward time per step ({medians[r]:.3g} s, median) "
                           f"is {medians[r] / others:.2f} times the other ranks' ({others:.3g} s) in the last "
                           f"{self.windows} logging windows to step {step} (train.straggler_factor={self.factor}); "
                           "every rank waits for it: check that host or GPU (run.log has each window's times)")

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._hooks:
            h.remove()
        self._hooks = []
