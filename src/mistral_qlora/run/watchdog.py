"""The hang watchdog: a rank on which no training step completes within `train.hang_timeout`
writes its Python stacks to run.log and ends with EXIT_HUNG, so a scheduler can requeue the job.

A step is progress; so are the Trainer's other events (a micro-step, a log, each evaluation batch,
a save), so a long evaluation is no hang. A saving step is allowed SAVE_FACTOR times the timeout
(the commit hashes and fsyncs every file). `auto` is AUTO_FACTOR times the median step time so far,
at least AUTO_FLOOR seconds (the floor alone until a step has been measured).

What is saved: nothing new. A hung rank may be inside a collective or a checkpoint write, and any
new checkpoint could hold the partial state of a step; the last committed checkpoint stays as it
is (the watchdog waits for a commit in progress to finish its renames, checkpoints.COMMIT_LOCK),
a checkpoint being staged is discarded by the next start, which resumes from the last committed
one. Every rank's watchdog is independent: each one that is still running dumps its own stacks
(lines marked `[rank R]`) and exits; the launcher then stops the rest (relaunch.py maps its exit
to EXIT_HUNG through the `hang.json` the first rank to fire writes).

A thread of the interpreter cannot run while a C call holds the interpreter lock forever, so
faulthandler's own timer (which needs no lock) is armed too, at twice the limit, as a backstop:
it writes the stacks to `hang-rank<R>.txt` in output_dir and ends the process (exit code 1).
"""

from __future__ import annotations

import faulthandler
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from mistral_qlora.errors import EXIT_HUNG
from mistral_qlora.run.checkpoints import COMMIT_LOCK

AUTO_FACTOR = 20
AUTO_FLOOR = 300.0
SAVE_FACTOR = 10
HANG_FILE = "hang.json"


class HangWatchdog(TrainerCallback):
    """See the module docstring. `timeout`: seconds, or "auto"; None turns the watchdog off."""

    def __init__(self, timeout, output_dir: str | Path, rank: int, log=print, poll: float = 0.5):
        self.timeout, self.out, self.rank, self._log, self.poll = timeout, Path(output_dir), rank, log, poll
        self._step_times: list[float] = []
        self._deadline = None
        self._step_started = None
        self._stop = threading.Event()
        self._thread = None
        self._backstop = None

    def limit(self) -> float:
        if self.timeout != "auto":
            return float(self.timeout)
        if not self._step_times:
            return AUTO_FLOOR
        return max(AUTO_FLOOR, AUTO_FACTOR * statistics.median(self._step_times[-50:]))

    def _progress(self, factor: float = 1.0, extend_only: bool = False) -> None:
        limit = self.limit() * factor
        deadline = time.monotonic() + limit
        if extend_only and self._deadline is not None and self._deadline > deadline:
            return  # a saving step's allowance is not cut short by the events inside it
        self._deadline = deadline
        if self._backstop is not None:
            faulthandler.dump_traceback_later(2 * limit, exit=True, file=self._backstop)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.timeout is None or self._thread is not None:
            return
        self._backstop = open(self.out / f"hang-rank{self.rank}.txt", "w")  # noqa: SIM115 - open for the run
        self._progress()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.monotonic()
        self._progress()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_started is not None:
            self._step_times.append(time.monotonic() - self._step_started)
        self._progress(SAVE_FACTOR if control.should_save else 1.0)

    def _event(self, *args, **kwargs):
        if self._deadline is not None:
            self._progress(extend_only=True)

    on_substep_end = on_log = on_prediction_step = on_evaluate = on_save = _event

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self) -> None:
        """Disarm the thread and the backstop. The Trainer calls on_train_end only when training
        returns; run_training calls this on every way out, so a run that raised (in a process that
        lives on: an API call, a test session) leaves no timer that would end the process later."""
        self._stop.set()
        self._deadline = None
        if self._backstop is not None:
            faulthandler.cancel_dump_traceback_later()
            self._backstop.close()
            (self.out / self._backstop.name).unlink(missing_ok=True)
            self._backstop = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self.fire()

    def fire(self) -> None:
        """Stacks to run.log, the hang recorded, and out with EXIT_HUNG (never returns)."""
        limit = self.limit()
        with tempfile.TemporaryFile("w+") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            stacks = f.read()
        header = (f"hang: no training step finished on rank {self.rank} within {limit:.0f} s "
                  f"(train.hang_timeout={self.timeout}); its Python stacks:")
        lines = [header, *stacks.rstrip("\n").splitlines()]
        block = "".join(f"[rank {self.rank}] {line}\n" for line in lines).encode()
        try:  # one append per rank: the ranks' blocks do not interleave
            fd = os.open(self.out / "run.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, block)
                os.fsync(fd)
            finally:
                os.close(fd)
            marker = self.out / HANG_FILE
            if not marker.exists():
                marker.write_text(json.dumps({"rank": self.rank, "timeout": limit, "time": time.time()}))
        except OSError:
            pass
        print(f"mistral-qlora: rank {self.rank}: {header.split(';')[0]}; stacks in {self.out / 'run.log'}; "
              f"exiting with {EXIT_HUNG}; run the same command again to resume from the last checkpoint",
              flush=True)
        with COMMIT_LOCK:  # never between a commit's renames
            os._exit(EXIT_HUNG)


def hang_in_run(output_dir: str | Path, since: float) -> bool:
    """Whether a rank of the run started at `since` (time.time()) ended on a hang."""
    marker = Path(output_dir) / HANG_FILE
    try:
        return marker.stat().st_mtime >= since
    except OSError:
        return False
