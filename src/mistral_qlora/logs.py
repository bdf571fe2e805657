"""Where messages go: the console keeps to our own lines, `output_dir/run.log` keeps everything.

- Our lines (`runtime.log` on stderr, the console's step lines on stdout) are printed as before and
  also recorded, through the `mistral_qlora` logger, in run.log.
- Library logs (transformers, datasets, PEFT, accelerate, bitsandbytes, DeepSpeed, Liger, ...) and
  Python warnings are routed through `logging` (each library's own console handler removed,
  warnings captured): WARNING and above go to run.log; the console shows only ERROR and above,
  from every rank, unless `--debug`, which shows them all.
- Progress bars (ours, the Trainer's, `datasets`', huggingface_hub's) are drawn only when stderr,
  where tqdm draws them, is a terminal (`progress_bars`): in a pipe, a file, a SLURM or
  `docker logs` stream each carriage-return redraw would become a line of its own.
  `setup_logging`, which every command runs first, switches the libraries' bars off otherwise;
  our own bars ask `progress_bars`.
- run.log can be written only once `train` has validated its inputs (output_dir is left untouched
  until then): records wait in memory and `open_run_log` writes them out, then appends. Only
  global rank 0 writes it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

RUN_LOG = "run.log"
OURS = "mistral_qlora"
# Libraries whose loggers are routed to the root logger (their own console handlers removed).
LIBRARIES = ("transformers", "datasets", "peft", "accelerate", "bitsandbytes", "DeepSpeed", "deepspeed",
             "torch", "liger_kernel", "huggingface_hub", "wandb", "mlflow", "matplotlib", "urllib3")
_BUFFER_LIMIT = 10_000
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RunLogHandler(logging.Handler):
    """Our records (INFO and up) and everyone's warnings: held in memory until `open` names the
    file, then appended to it line by line. A held record is kept as its formatted line, never as
    the record: a record's arguments and traceback reference live objects (a model, a step's
    frames), which would stay allocated for as long as the process runs without a run.log."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(_FORMAT))
        self.lines: list[str] = []
        self.path: Path | None = None
        self._file = None

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith(OURS)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self._file is None:
                if len(self.lines) < _BUFFER_LIMIT:
                    self.lines.append(line)
                return
            self._file.write(line + "\n")
            self._file.flush()
        except Exception:
            self.handleError(record)

    def open(self, path: Path) -> None:
        if self._file is not None:
            self._file.close()
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._file.write("".join(line + "\n" for line in self.lines))
        self._file.flush()
        self.lines.clear()

    def close_file(self) -> None:
        """Back to holding lines in memory (a next run in this process starts with a clean slate)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.lines.clear()

    def close(self) -> None:
        self.close_file()
        super().close()


class _NotOurs(logging.Filter):
    """Our lines are printed by their callers; the console handler leaves them out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(OURS)


_handler: RunLogHandler | None = None


def progress_bars() -> bool:
    """Whether a progress bar may be drawn: stderr (where tqdm draws) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def setup_logging(debug: bool = False) -> RunLogHandler:
    """Route library logs and warnings as the module docstring says (idempotent)."""
    global _handler
    import warnings

    root = logging.getLogger()
    if _handler is None:
        _handler = RunLogHandler()
        root.addHandler(_handler)
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.INFO if debug else logging.ERROR)
        console.addFilter(_NotOurs())
        root.addHandler(console)
    root.setLevel(logging.INFO if debug else logging.WARNING)
    logging.getLogger(OURS).setLevel(logging.INFO)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    bars = progress_bars()  # the libraries' progress bars (downloads, loading weights, maps): a terminal only
    if not bars:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:  # read by huggingface_hub at its import: switched off here too, should it be imported already
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:
            pass
    try:
        import torch

        if not torch.cuda.is_available():
            # DeepSpeed's own choice without a GPU, made without the warning its logger prints on
            # stdout at import (a logger created with its handler, before anything can route it)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    try:  # transformers and datasets configure their own handler on first use: switch it off
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(logging.INFO if debug else logging.WARNING)
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        if not bars:
            hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from datasets.utils import logging as ds_logging

        ds_logging.get_logger()  # configures its handler, removed below
        ds_logging.enable_propagation()
        if not bars:
            from datasets.utils.tqdm import disable_progress_bars

            disable_progress_bars()
    except ImportError:
        pass
    if os.environ.get("WANDB_MODE") == "offline" and "transformers.integrations.integration_utils" not in sys.modules:
        # transformers prints a line on stdout when this module is first imported in W&B's offline
        # mode (any Trainer import does): imported here, its line goes to run.log
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()) as said:
            try:
                import transformers.integrations.integration_utils  # noqa: F401
            except ImportError:
                pass
        for line in said.getvalue().splitlines():
            record_line(line)
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.propagate = True
        if name not in ("transformers",):
            logger.setLevel(logging.INFO if debug else logging.WARNING)
    logging.captureWarnings(True)
    warnings.simplefilter("default")  # each warning once per place, into run.log (and the console with --debug)
    return _handler


def open_run_log(output_dir: str | Path) -> Path | None:
    """Start writing output_dir/run.log (global rank 0), with what was recorded so far. A run
    started without `setup_logging` (run_training called from Python) gets our lines in it."""
    global _handler
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    if _handler is None:
        _handler = RunLogHandler()
        logging.getLogger().addHandler(_handler)
        logging.getLogger(OURS).setLevel(logging.INFO)
    path = Path(output_dir) / RUN_LOG
    _handler.open(path)
    return path


def close_run_log() -> None:
    if _handler is not None:
        _handler.close_file()


def record_line(line: str) -> None:
    """One of our console lines, into run.log."""
    logging.getLogger(OURS).info(line)
