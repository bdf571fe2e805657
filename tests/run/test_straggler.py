"""The straggler report: per-rank forward times per step into the logs and run.log, and a console
warning for a rank persistently slower than the others by train.straggler_factor."""

import logging
import time
from types import SimpleNamespace

import torch

from mistral_qlora.run.straggler import StragglerCallback, slow_ranks, spread


def test_a_rank_slower_by_the_factor_is_named_and_the_spread_is_its_ratio_to_the_others():
    assert slow_ranks([1.0, 1.1, 2.0, 0.9], factor=1.5) == [2]
    assert slow_ranks([1.0, 1.1, 1.4, 0.9], factor=1.5) == []
    assert spread([1.0, 1.0, 3.0]) == 3.0
    assert spread([1.0]) is None


def test_the_warning_comes_once_after_the_set_number_of_slow_windows_in_a_row_and_again_after_a_recovery():
    warnings = []
    cb = StragglerCallback(rank=0, world_size=3, factor=1.5, warn=warnings.append, windows=3)
    slow, even = [1.0, 2.0, 1.0], [1.0, 1.0, 1.0]
    for step, medians in enumerate([slow, slow, even, slow, slow], start=1):
        cb.note_window(medians, step)
    assert warnings == []  # never 3 slow windows in a row
    cb.note_window(slow, 6)
    assert len(warnings) == 1 and "rank 1 is a straggler" in warnings[0] and "2.00 times" in warnings[0]
    cb.note_window(slow, 7)
    assert len(warnings) == 1  # once while it stays slow
    for step, medians in enumerate([even, slow, slow, slow], start=8):
        cb.note_window(medians, step)
    assert len(warnings) == 2


class _Slow(torch.nn.Module):
    def forward(self, x):
        time.sleep(0.02)
        return x * 2


def test_each_steps_forwards_are_timed_and_reported_in_the_logs_history_and_run_log(caplog):
    cb = StragglerCallback(rank=0, world_size=1, factor=1.5)
    model = torch.nn.Sequential(torch.nn.Linear(1, 1), _Slow())
    state = SimpleNamespace(is_world_process_zero=True, global_step=2, log_history=[{"loss": 1.0, "step": 2}])
    cb.on_train_begin(None, state, None, model=model)
    for micro_batches in (1, 3):  # two steps: one forward, then three (gradient accumulation)
        cb.on_step_begin(None, state, None)
        for _ in range(micro_batches):
            model(torch.ones(1))
        cb.on_step_end(None, state, None)
    logs = {"loss": 1.0}
    with caplog.at_level(logging.INFO, logger="mistral_qlora"):
        cb.on_log(None, state, None, logs=logs)
    assert 0.018 < logs["forward_s/rank0/min"] < logs["forward_s/rank0/max"]
    assert logs["forward_s/rank0/max"] >= 3 * 0.02
    assert state.log_history[-1]["forward_s/rank0/median"] == logs["forward_s/rank0/median"]
    assert "forward time per step, 2 step(s) to step 2 (s, min/median/max): rank 0" in caplog.text
