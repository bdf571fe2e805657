"""What a user watching a run sees: the console in a pipe, run.log, and each experiment tracker
(W&B offline files; a real local MLflow server read back through its client; TensorBoard)."""

import json
import re

import pytest

from testkit import ROOT

STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| epoch [\d.]+ \| loss [\d.]+ \| lr [\d.e+-]+ \| grad norm \S+ \| "
                       r"(?:[\d,]+ tok/s \| MFU [\d.]+% \| )?\d+:\d\d:\d\d \| ETA (?:\d+:\d\d:\d\d|\?)$")
EVAL_LINE = re.compile(r"^eval step (\d+)/(\d+) \| loss [\d.]+ \| perplexity \S+$")


def history(out):
    return json.loads((out / "history.json").read_text())


def test_console_in_a_pipe_prints_one_plain_line_per_log_step(tracked_run):
    out, stdout, stderr = tracked_run["out"], tracked_run["stdout"], tracked_run["stderr"]
    assert "\r" not in stdout and "\r" not in stderr  # no progress bar redraws
    lines = stdout.splitlines()
    steps = [int(m.group(1)) for m in map(STEP_LINE.match, lines) if m]
    evals = [int(m.group(1)) for m in map(EVAL_LINE.match, lines) if m]
    logged = [e["step"] for e in history(out) if "loss" in e]
    assert steps == logged == [1, 2, 3]
    assert evals == [e["step"] for e in history(out) if "eval_loss" in e] and evals[0] == 0 and evals[-1] == 3
    assert not any(line.startswith("{") for line in lines)  # the Trainer's raw dicts are gone
    # the tokens/s and MFU of our throughput callback reach the line
    assert any("tok/s | MFU" in line for line in lines if STEP_LINE.match(line))


def test_a_console_in_a_pipe_names_each_phase_before_it_starts(tracked_run):
    """config, data, model (after the plan's lines), then the evaluation before training: a pipe shows
    where the run is while nothing else prints."""
    out = tracked_run["stdout"].splitlines()
    starts = {phase: next((i for i, line in enumerate(out) if line.startswith(phase)), None)
              for phase in ("config: checked", "data: reading", "model: loading")}
    assert None not in starts.values() and starts["config: checked"] < starts["data: reading"] < starts["model: loading"]
    first_eval = next(i for i, line in enumerate(out) if EVAL_LINE.match(line))
    assert out.index("eval: the held-out set before training (the first line's loss)") < first_eval


def test_library_warnings_go_to_run_log_not_the_console(tracked_run):
    out, stdout, stderr = tracked_run["out"], tracked_run["stdout"], tracked_run["stderr"]
    log = (out / "run.log").read_text()
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert warnings, "the libraries' warnings are kept in run.log"
    assert "Warning:" not in stdout + stderr  # Python warnings (FutureWarning: ...) stay off the console
    # nor do the trackers' own lines (wandb: Syncing run ..., MLflow's run and experiment links,
    # transformers' "Running in WANDB offline mode"): where each run is goes to run.log
    chatter = [line for line in (stdout + stderr).splitlines() if re.search(r"wandb|mlflow|🏃|🧪", line, re.I)]
    assert not chatter, chatter
    assert "W&B run tracked-tiny: " in log and "MLflow run tracked-tiny (" in log
    # run.log keeps our lines too: the plan and every console line
    assert "mistral_qlora: train.strategy=" in log
    for line in stdout.splitlines():
        if STEP_LINE.match(line) or EVAL_LINE.match(line):
            assert line in log


def wandb_records(path):
    """The records of an offline run file (`run-ID.wandb`, what `wandb sync` uploads): LevelDB's log
    format (32 KiB blocks of chunks: CRC, length, type) after a 7-byte W&B header, each record one
    protobuf `Record` of wandb's own schema."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk  # FULL, FIRST start; MIDDLE, LAST continue
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def test_wandb_offline_run_holds_config_metrics_and_artifacts(tracked_run):
    out = tracked_run["out"]
    (run_dir,) = (out / "wandb").glob("offline-run-*")  # WANDB_DIR: output_dir
    (run_file,) = run_dir.glob("run-*.wandb")
    records = wandb_records(run_file)
    kind = lambda r: r.WhichOneof("record_type")  # noqa: E731
    (run,) = [r.run for r in records if kind(r) == "run"]
    assert (run.display_name, run.project, list(run.tags)) == ("tracked-tiny", "qlora-ci", ["ci", "tiny"])
    config = {u.key: json.loads(u.value_json) for r in records if kind(r) == "config" for u in r.config.update}
    assert config["run_config"]["lora"]["plus_lr_ratio"] == 16 and config["run_config"]["output_dir"] == str(out)
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if kind(r) == "history"]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"):
        logged = {row["train/global_step"]: row[f"train/{key}"] for row in rows if f"train/{key}" in row}
        expected = {e["step"]: e[key] for e in history(out) if key in e}
        assert expected and logged == pytest.approx(expected), key
    evals = {row["train/global_step"]: row["eval/perplexity"] for row in rows if "eval/loss" in row}
    assert evals == pytest.approx({e["step"]: e["eval_perplexity"] for e in history(out) if "eval_loss" in e})
    uploaded = [f.path for r in records if kind(r) == "files" for f in r.files.files]
    for name in ("summary.json", "loss.png", "samples.md"):
        assert name in uploaded and (run_dir / "files" / name).read_bytes() == (out / name).read_bytes(), name
    (exit_record,) = [r.exit for r in records if kind(r) == "exit"]
    assert exit_record.exit_code == 0


def test_mlflow_server_holds_params_metrics_and_artifacts(tracked_run, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked_run["mlflow_uri"])
    experiment = client.get_experiment_by_name("qlora-ci")  # train.project
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked-tiny" and run.info.status == "FINISHED"
    assert run.data.tags["ci"] == "true" and run.data.tags["tiny"] == "true"
    params = run.data.params
    assert params["config.lora.rslora"] == "True" and params["config.lora.plus_lr_ratio"] == "16.0"
    assert params["config.train.report_to"] == '["tensorboard", "wandb", "mlflow"]'
    out = tracked_run["out"]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        expected = {e["step"]: e[key] for e in history(out) if key in e}
        assert logged.keys() == expected.keys() and expected, key
        assert all(logged[s] == pytest.approx(v, rel=1e-6) for s, v in expected.items()), key
    evals = client.get_metric_history(run.info.run_id, "eval_perplexity")
    assert [m.step for m in evals] == [e["step"] for e in history(out) if "eval_loss" in e]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "loss.png", "samples.md"} <= names
    got = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(open(got).read()) == json.loads((out / "summary.json").read_text())


def test_tensorboard_gets_the_config_and_the_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run["out"] / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/tokens_per_second", "train/mfu", "eval/perplexity"} <= set(tags["scalars"])
    assert "run_config/text_summary" in tags["tensors"] and "summary.json/text_summary" in tags["tensors"]
    assert "loss" in tags["images"]


def test_a_tracker_not_installed_is_one_line_before_anything_runs(tmp_path, monkeypatch):
    from mistral_qlora.config import load_config
    from mistral_qlora.errors import UserError
    from mistral_qlora.run import trackers
    from mistral_qlora.train import run_training

    monkeypatch.setattr(trackers, "find_spec", lambda name: None if name == "wandb" else object())
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.report_to=[tensorboard, wandb]",
                                                   f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match=r"train.report_to names wandb, which is not installed: "
                                        r"pip install 'mistral-qlora\[trackers\]'"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()


def test_the_environment_wins_over_the_config_and_the_log_says_so(tmp_path):
    from mistral_qlora.config import load_config
    from mistral_qlora.run.trackers import run_name, tracker_env

    cfg = load_config(None, ["train.report_to=[wandb, mlflow]", "train.project=from-config", "train.tags=[a, b]",
                             f"output_dir={tmp_path / 'my-run'}"])
    env = {"WANDB_PROJECT": "from-env"}
    notes = tracker_env(cfg, env)
    assert env["WANDB_PROJECT"] == "from-env" and env["MLFLOW_EXPERIMENT_NAME"] == "from-config"
    assert notes == ["$WANDB_PROJECT='from-env' from the environment wins over train.project ('from-config')"]
    assert env["WANDB_TAGS"] == "a,b" and json.loads(env["MLFLOW_TAGS"]) == {"a": "true", "b": "true"}
    assert env["WANDB_DIR"] == str((tmp_path / "my-run").resolve())
    assert run_name(cfg) == "my-run"
    assert tracker_env(load_config(None, ["train.report_to=[none]"]), env := {}) == [] and env == {}


@pytest.mark.parametrize("value,message", [
    ("[tensorboard, tensorboard]", "names a tracker twice"),
    ("[none, wandb]", "`none` cannot be combined"),
    ("[comet]", "must be one of"),
])
def test_bad_report_to_is_refused(value, message):
    from mistral_qlora.config import load_config
    from mistral_qlora.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, [f"train.report_to={value}"])


def test_run_log_buffer_keeps_lines_not_the_objects_a_record_names(tmp_path):
    """Records logged before run.log opens are held as text: a record's arguments (a model, say)
    and its traceback's frames are free to go, and the lines still reach run.log."""
    import gc
    import logging
    import weakref

    from mistral_qlora.logs import RunLogHandler

    class Big:
        def __repr__(self):
            return "<big model>"

    handler = RunLogHandler()
    logger = logging.getLogger("mistral_qlora.test_buffer")
    logger.addHandler(handler)
    logger.propagate = False  # pytest's own capture keeps the records it sees
    try:
        big = Big()
        alive = weakref.ref(big)
        logger.warning("loaded %r", big)
        try:
            raise ValueError(big)
        except ValueError:
            logger.exception("failed")
        del big
        gc.collect()
        assert alive() is None
        handler.open(tmp_path / "run.log")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        handler.close()
    text = (tmp_path / "run.log").read_text()
    assert "loaded <big model>" in text and "ValueError: <big model>" in text
