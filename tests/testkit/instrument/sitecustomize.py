"""Per-rank facts for the multi-process tests (tests/test_distributed.py), gathered from outside
the package: Python imports this module at the start of every process whose PYTHONPATH holds this
folder (the launcher's children inherit it). With MISTRAL_QLORA_DIST_STATS=DIR set, every
`transformers.Trainer` built in the process gets a callback, and at the end of training each rank
writes DIR/rank<R>.json: what its engine is, what it holds of the ZeRO-3 partitioned parameters,
which packed rows its data loader read.

Nothing is imported until transformers' trainer module is: an import hook patches it then.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
from pathlib import Path

STATS_ENV = "MISTRAL_QLORA_DIST_STATS"


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then(module)` right after `name` is first imported."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # find the real module with the other finders, once
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            self.then(module)

        spec.loader.exec_module = exec_then_patch
        return spec


class _RecordingDataset:
    """A dataset that remembers which items this rank's data loader asked for."""

    def __init__(self, dataset):
        self.dataset, self.seen = dataset, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.dataset[i]


def partition_stats(model) -> dict:
    """What this rank holds of the ZeRO-3 partitioned parameters: base (frozen) and adapter
    (trainable), as full element counts (ds_numel) against local partition sizes (ds_tensor)."""
    out = {}
    for group, trainable in (("base", False), ("lora", True)):
        full = local = persistent = count = 0
        for p in model.parameters():
            if p.requires_grad != trainable or not hasattr(p, "ds_numel"):
                continue
            count += 1
            if getattr(p, "ds_persist", False):
                persistent += p.ds_numel
                continue
            full += p.ds_numel
            local += p.ds_tensor.numel()
        out[group] = {"params": count, "partitioned_numel": full, "local_numel": local,
                      "persistent_numel": persistent, "local_fraction": local / full if full else None}
    return out


def _instrument(trainer_module) -> None:
    from transformers import TrainerCallback

    class StatsCallback(TrainerCallback):
        def __init__(self, trainer):
            self.trainer, self.engine = trainer, {}

        def on_train_begin(self, args, state, control, **kwargs):
            wrapped = self.trainer.model_wrapped
            module = getattr(wrapped, "module", wrapped)
            self.engine = {"type": type(wrapped).__name__, "world_size": args.world_size}
            if hasattr(wrapped, "zero_optimization_stage"):
                self.engine["zero_stage"] = wrapped.zero_optimization_stage()
                self.engine["dp_world_size"] = wrapped.dp_world_size
            if any(hasattr(p, "ds_numel") for p in module.parameters()):
                self.engine["partition"] = partition_stats(module)

        def on_train_end(self, args, state, control, **kwargs):
            dataset = self.trainer.train_dataset
            record = {"rank": args.process_index, "world_size": args.world_size, "engine": self.engine,
                      "steps": state.global_step, "pid": os.getpid(),
                      "rows_read": dataset.seen if isinstance(dataset, _RecordingDataset) else None}
            folder = Path(os.environ[STATS_ENV])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"rank{args.process_index}.json").write_text(json.dumps(record, indent=1))

    trainer_class = trainer_module.Trainer
    original = trainer_class.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.train_dataset is not None:
            self.train_dataset = _RecordingDataset(self.train_dataset)
        self.add_callback(StatsCallback(self))

    trainer_class.__init__ = __init__


if os.environ.get(STATS_ENV):
    sys.meta_path.insert(0, _AfterImport("transformers.trainer", _instrument))
