"""The hang watchdog (run/watchdog.py) on its own: it fires when no step comes, and once stopped
it never fires, in a process that lives on after a run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from mistral_qlora.errors import EXIT_HUNG
from mistral_qlora.run.watchdog import HANG_FILE, HangWatchdog


def test_no_step_within_the_timeout_writes_the_stacks_and_exits_with_the_hang_code(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from mistral_qlora.run.watchdog import HangWatchdog
        HangWatchdog(0.5, {str(tmp_path)!r}, 3, poll=0.05).on_train_begin(None, None, None)
        time.sleep(30)
    """)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_HUNG, proc.stderr
    log = (tmp_path / "run.log").read_text()
    assert log.startswith("[rank 3] hang: no training step finished on rank 3 within 0 s")
    lines = log.splitlines()
    assert all(line.startswith("[rank 3] ") for line in lines)
    assert any('File "<string>", line 5' in line for line in lines)  # the main thread's stack, in its sleep
    assert (tmp_path / HANG_FILE).exists()
    assert time.monotonic() - started < 25  # fired, not slept out


def test_a_stopped_watchdog_never_fires(tmp_path):
    dog = HangWatchdog(0.2, tmp_path, 0, poll=0.02)
    dog.on_train_begin(None, None, None)
    assert (tmp_path / "hang-rank0.txt").exists()  # the backstop's file while armed
    dog.stop()
    time.sleep(0.8)  # four times the timeout: this process is still here
    dog._thread.join(1)
    assert not dog._thread.is_alive()
    assert not (tmp_path / "hang-rank0.txt").exists() and not (tmp_path / "run.log").exists()
