"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow.

Each is transformers' own integration callback (`TensorBoardCallback`, `WandbCallback`,
`MLflowCallback`), installed on global rank 0 only and placed after ThroughputCallback and
EvalPerplexityCallback, so the logs it sends carry tokens/s, MFU and eval perplexity. (Through
`TrainingArguments.report_to` the Trainer would put them before our callbacks, so they are added
explicitly and `report_to` stays "none".) The subclasses add what the integrations leave out:

- the run config (resolved, every key) as parameters: W&B's config under `run_config`, MLflow
  params named `config.<section>.<key>`, TensorBoard a text entry `run_config`;
- `finish`: after the run's last evaluation and artifacts, `summary.json`, `loss.png` and
  `samples.md` uploaded (W&B files, MLflow artifacts, TensorBoard text and image), then the run
  closed. MLflow's integration would end its run when training ends, before the final evaluation
  and artifacts; here the run stays open until `finish`.

Names: `train.run_name` (default: output_dir's last folder) through `TrainingArguments.run_name`;
`train.project` and `train.tags` through the environment variables the integrations read
(`WANDB_PROJECT`, `WANDB_TAGS`, `MLFLOW_EXPERIMENT_NAME`, `MLFLOW_TAGS`); a variable the user set
wins, and the log says so. W&B writes its run folder into output_dir/wandb (`WANDB_DIR`), which
`WANDB_MODE=offline` leaves there for `wandb sync`.

The console keeps to the run's own lines: W&B's terminal messages are off (`WANDB_SILENT`; they
stay in its run folder's logs/debug.log) and MLflow's run and experiment links are not printed
(`MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT`), nor do its loggers get a console handler of their own
(`MLFLOW_CONFIGURE_LOGGING=false`: they are routed as every library's, mistral_qlora/logs.py);
where each tracker's run is goes to run.log instead.
"""

from __future__ import annotations

import json
import os
from importlib.util import find_spec
from pathlib import Path

from mistral_qlora.config import RunConfig
from mistral_qlora.errors import UserError
from mistral_qlora.logs import record_line
from mistral_qlora.runtime import log

TRACKERS = ("tensorboard", "wandb", "mlflow")
ARTIFACTS = ("summary.json", "loss.png", "samples.md")


def active_trackers(cfg: RunConfig) -> list[str]:
    return [t for t in cfg.train.report_to if t != "none"]


def check_trackers(cfg: RunConfig) -> None:
    """A tracker named in train.report_to whose client is not installed: one line, before anything runs."""
    missing = [t for t in active_trackers(cfg) if find_spec(t) is None]
    if missing:
        raise UserError(f"train.report_to names {', '.join(missing)}, which is not installed: "
                        f"pip install 'mistral-qlora[trackers]' (or {' '.join(missing)}), "
                        "or leave it out of train.report_to")


def run_name(cfg: RunConfig) -> str:
    return cfg.train.run_name or Path(cfg.output_dir).resolve().name


def tracker_env(cfg: RunConfig, env=None) -> list[str]:
    """Set the environment variables the integrations read from the config; a variable already set
    wins. Returns one note per variable the environment kept against the config, for the log."""
    env = os.environ if env is None else env  # read now: `datasets` rebinds os.environ
    t = cfg.train
    trackers = active_trackers(cfg)
    wanted: list[tuple[str, str, str]] = []  # (variable, value, where the value comes from)
    if "wandb" in trackers:
        wanted.append(("WANDB_DIR", str(Path(cfg.output_dir).resolve()), "output_dir"))
        wanted.append(("WANDB_SILENT", "true", "the console's own lines only"))
        if t.project:
            wanted.append(("WANDB_PROJECT", t.project, "train.project"))
        if t.tags:
            wanted.append(("WANDB_TAGS", ",".join(t.tags), "train.tags"))
    if "mlflow" in trackers:
        wanted.append(("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true", "the console's own lines only"))
        # MLflow's loggers without the stderr handler it installs at import: routed as the others (logs.py)
        wanted.append(("MLFLOW_CONFIGURE_LOGGING", "false", "the console's own lines only"))
        if t.project:
            wanted.append(("MLFLOW_EXPERIMENT_NAME", t.project, "train.project"))
        if t.tags:
            wanted.append(("MLFLOW_TAGS", json.dumps({tag: "true" for tag in t.tags}), "train.tags"))
    notes = []
    for var, value, source in wanted:
        if env.get(var) not in (None, "", value):
            notes.append(f"${var}={env[var]!r} from the environment wins over {source} ({value!r})")
        elif not env.get(var):
            env[var] = value
    return notes


def flat_config(cfg: RunConfig) -> dict[str, str | int | float | bool | None]:
    """`section.key` -> value; lists as JSON text (trackers' parameters are scalars)."""
    flat = {}
    for section, values in cfg.model_dump(mode="json").items():
        if not isinstance(values, dict):
            flat[section] = values
            continue
        for key, value in values.items():
            flat[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def tracker_callbacks(cfg: RunConfig) -> list:
    """The callbacks of train.report_to, for global rank 0 (run/trainer.py installs them)."""
    trackers = active_trackers(cfg)
    callbacks = []
    # on other ranks nothing is installed (run/trainer.py), so only global rank 0 logs
    if "tensorboard" in trackers:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(cfg.output_dir) / "tensorboard")
        callbacks.append(_tensorboard(cfg))
    if "wandb" in trackers:
        callbacks.append(_wandb(cfg))
    if "mlflow" in trackers:
        callbacks.append(_mlflow(cfg))
    return callbacks


def finish_trackers(callbacks: list, out: Path | None, ok: bool) -> None:
    """Upload the final artifacts from `out` (None: the run failed before them) and close each run.
    A tracker that fails here (a server gone) is logged: the run itself is done."""
    for cb in callbacks:
        finish = getattr(cb, "finish_run", None)
        if finish is None:
            continue
        try:
            finish(out, ok)
        except Exception as exc:
            log(f"{type(cb).__name__}: could not finish the tracker's run: {type(exc).__name__}: {exc}")


def _artifacts(out: Path | None) -> list[Path]:
    return [] if out is None else [out / name for name in ARTIFACTS if (out / name).is_file()]


def _tensorboard(cfg: RunConfig):
    from transformers.integrations import TensorBoardCallback

    class RunTensorBoardCallback(TensorBoardCallback):
        """TensorBoard: the run config as text; at the end summary.json and samples.md as text and
        loss.png as an image."""

        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.tb_writer is not None:
                self.tb_writer.add_text("run_config", "```\n" + cfg.to_yaml() + "```")

        def finish_run(self, out: Path | None, ok: bool) -> None:
            files = _artifacts(out)
            if not files:
                if self.tb_writer is not None:
                    self.tb_writer.close()
                    self.tb_writer = None
                return
            if self.tb_writer is None:
                self._init_summary_writer(None)  # the log dir is TENSORBOARD_LOGGING_DIR, read at __init__
            for path in files:
                if path.suffix == ".png":
                    import matplotlib.image as mpimg

                    self.tb_writer.add_image(path.stem, mpimg.imread(str(path))[..., :3], dataformats="HWC")
                else:
                    self.tb_writer.add_text(path.name, "```\n" + path.read_text(encoding="utf-8") + "\n```")
            self.tb_writer.close()
            self.tb_writer = None

    return RunTensorBoardCallback()


def _wandb(cfg: RunConfig):
    from transformers.integrations import WandbCallback

    class RunWandbCallback(WandbCallback):
        """W&B: the run config under `run_config`; at the end the artifacts as run files, then finish."""

        def setup(self, args, state, model, **kwargs):
            super().setup(args, state, model, **kwargs)
            if state.is_world_process_zero and self._wandb.run is not None:
                self._wandb.config.update({"run_config": cfg.model_dump(mode="json")}, allow_val_change=True)
                run = self._wandb.run
                record_line(f"W&B run {run.name}: {run.url or run.dir}")

        def finish_run(self, out: Path | None, ok: bool) -> None:
            if self._wandb is None or self._wandb.run is None:
                return
            for path in _artifacts(out):
                self._wandb.save(str(path), base_path=str(out), policy="now")
            self._wandb.finish(exit_code=0 if ok else 1)

    return RunWandbCallback()


def _mlflow(cfg: RunConfig):
    from transformers.integrations import MLflowCallback

    class RunMLflowCallback(MLflowCallback):
        """MLflow: the run config as `config.*` params; the run stays open past training for the
        final evaluation, then gets the artifacts and ends (`finish_run`)."""

        def setup(self, args, state, model):
            super().setup(args, state, model)
            if state.is_world_process_zero and self._ml_flow.active_run() is not None:
                info = self._ml_flow.active_run().info
                record_line(f"MLflow run {info.run_name} ({info.run_id}) of experiment {info.experiment_id} "
                            f"at {self._ml_flow.get_tracking_uri()}")
                params = [(f"config.{k}", v) for k, v in flat_config(cfg).items()]
                for i in range(0, len(params), self._MAX_PARAMS_TAGS_PER_BATCH):
                    self._ml_flow.log_params(dict(params[i:i + self._MAX_PARAMS_TAGS_PER_BATCH]))

        def on_train_end(self, args, state, control, **kwargs):
            pass  # the final evaluation and artifacts come after training: finish_run ends the run

        def finish_run(self, out: Path | None, ok: bool) -> None:
            if not self._initialized or self._ml_flow.active_run() is None:
                return
            for path in _artifacts(out):
                self._ml_flow.log_artifact(str(path))
            if self._auto_end_run:
                self._ml_flow.end_run(status="FINISHED" if ok else "FAILED")

    return RunMLflowCallback()
