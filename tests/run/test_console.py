"""The console's step line: its ETA from the steady time of a step (not the first step's warm-up,
not evaluations or saves), on a fake clock; and a stream's rows in place of an epoch."""

from __future__ import annotations

import io

from transformers import TrainerControl, TrainerState, TrainingArguments

from mistral_qlora.run.callbacks import StreamPositionCallback, ThroughputCallback
from mistral_qlora.run.console import ConsoleCallback


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)


def _console(tmp_path, clock):
    out = io.StringIO()
    console = ConsoleCallback(bars=False, stream=out, clock=clock)
    state, control, args = TrainerState(), TrainerControl(), _args(tmp_path)
    state.max_steps = 100
    console.on_train_begin(args, state, control)
    return console, state, control, args, out


def _step(console, state, control, args, clock, seconds):
    clock.now += seconds
    state.global_step += 1
    console.on_step_end(args, state, control)


def _log(console, state, control, args, out) -> str:
    console.on_log(args, state, control, logs={"loss": 1.0, "epoch": 0.1})
    return out.getvalue().splitlines()[-1]


def test_eta_is_the_steady_time_per_step_not_the_first_steps_warm_up(tmp_path):
    clock = FakeClock()
    console, state, control, args, out = _console(tmp_path, clock)
    _step(console, state, control, args, clock, 300.0)  # compilation and warm-up: 5 minutes
    assert _log(console, state, control, args, out).endswith("| ETA ?")  # no steady step measured yet
    for _ in range(3):
        _step(console, state, control, args, clock, 2.0)
    line = _log(console, state, control, args, out)
    assert line.endswith("0:05:06 | ETA 0:03:12"), line  # 96 steps left at 2 s each; 306 s elapsed


def test_eta_leaves_out_the_time_spent_evaluating_and_saving(tmp_path):
    clock = FakeClock()
    console, state, control, args, out = _console(tmp_path, clock)
    _step(console, state, control, args, clock, 60.0)
    _step(console, state, control, args, clock, 1.0)
    console.on_evaluate(args, state, control, metrics={})
    _step(console, state, control, args, clock, 120.0)  # the step whose interval held the evaluation
    console.on_save(args, state, control)
    _step(console, state, control, args, clock, 90.0)  # ... and the save
    _step(console, state, control, args, clock, 1.0)
    assert state.global_step == 5
    assert _log(console, state, control, args, out).endswith("| ETA 0:01:35")  # 95 steps at 1 s


def test_throughput_and_mfu_are_stored_unrounded(tmp_path):
    """A slow machine's MFU is a tiny number: history.json keeps it as measured, rounding is the console's."""
    throughput = ThroughputCallback(flops_per_token=3.0e6, peak_flops_all_gpus=1.0e12)
    state, control, args = TrainerState(), TrainerControl(), _args(tmp_path)
    throughput._window_seconds, throughput._window_tokens = 7.0, 123  # 17.571428... tokens/s
    logs = {"loss": 1.0}
    state.log_history = [{**logs, "step": 0}]
    throughput.on_log(args, state, control, logs=logs)
    assert logs["tokens_per_second"] == 123 / 7.0 and state.log_history[-1]["tokens_per_second"] == 123 / 7.0
    assert logs["mfu"] == 123 / 7.0 * 3.0e6 / 1.0e12  # 5.27e-5: 4 decimals would keep 0.0001


def test_a_stream_logs_its_rows_read_in_place_of_an_epoch(tmp_path):
    stream = StreamPositionCallback(stream=None, rows_per_step=6)
    state, control, args = TrainerState(), TrainerControl(), _args(tmp_path)
    state.global_step = 7  # a resumed run: the Trainer's epoch would restart from zero here
    logs = {"loss": 1.0, "epoch": 0.03}
    state.log_history = [{**logs, "step": 7}]
    stream.on_log(args, state, control, logs=logs)
    assert logs == {"loss": 1.0, "stream_rows": 42} and state.log_history[-1] == {**logs, "step": 7}
    out = io.StringIO()
    console = ConsoleCallback(bars=False, stream=out)
    state.max_steps = 10
    console.on_train_begin(args, state, control)
    console.on_log(args, state, control, logs=logs)
    assert out.getvalue().startswith("step 7/10 | rows 42 | loss 1.0000 |")
