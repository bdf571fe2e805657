"""A checkpoint resumed on another number of processes, with nothing to do by hand.

- The global batch (`micro_batch_size x grad_accum x world_size` rows) is what the run's order
  (run/sampler.py), its losses and its learning rates depend on; `adapt_to_world_size` keeps it by
  changing `train.grad_accum`, or refuses in one line when the new process count cannot make it.
- The trainable state is read in a form that does not depend on the world size. The adapter,
  the optimizer (one `optimizer.pt` without DeepSpeed) and the scheduler are whole in every
  checkpoint; DeepSpeed's ZeRO files are per rank, so they are converted with DeepSpeed's own
  `ds_to_universal` into its universal checkpoint, which any process count loads
  (`checkpoint.load_universal`). The random generators are per rank: rank r takes rank
  r mod N's of the N saved.
- All of it goes into a resume view (`resume_view`): a folder beside the checkpoints whose files
  link to the committed checkpoint's, plus the converted and mapped files. The checkpoint itself
  is never written; the view is discarded with the staging folders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mistral_qlora.config import RunConfig
from mistral_qlora.errors import UserError
from mistral_qlora.run.checkpoints import FINGERPRINT, MANIFEST, STAGING, step_of

VIEW = f"{STAGING}-resume"
RESUMES_FILE = "resumes.json"


def saved_geometry(ckpt: Path) -> dict:
    return json.loads((ckpt / FINGERPRINT).read_text())


def adapt_to_world_size(cfg: RunConfig, ckpt: Path, world_size: int, force: bool = False) -> dict:
    """The resume's record (step, world sizes, what changed); `cfg.train.grad_accum` set so the
    global batch stays the checkpoint's, whatever grad_accum the config gives (a config written
    for one world size resumes on another, and back). With --force a changed micro-batch or
    grad_accum is the user's new geometry and is kept."""
    saved = saved_geometry(ckpt)
    before = saved.get("world_size", world_size)
    record = {"step": step_of(ckpt), "checkpoint": ckpt.name, "from_world_size": before,
              "to_world_size": world_size, "changed": {}}
    t = cfg.train
    if before == world_size or saved.get("micro_batch_size") != t.micro_batch_size \
            or (force and saved.get("grad_accum") != t.grad_accum):
        return record
    configured = t.grad_accum
    global_batch = t.micro_batch_size * saved["grad_accum"] * before
    per_step = t.micro_batch_size * world_size
    if global_batch % per_step:
        fits = sorted(n for n in range(1, global_batch // t.micro_batch_size + 1)
                      if (global_batch // t.micro_batch_size) % n == 0)
        raise UserError(
            f"cannot resume {ckpt} on {world_size} processes: its global batch of {global_batch} rows "
            f"(micro_batch_size {t.micro_batch_size} x grad_accum {saved['grad_accum']} x {before} processes) is no "
            f"multiple of {t.micro_batch_size} x {world_size}; use {', '.join(map(str, fits))} processes, "
            "or --force with another train.grad_accum to change the global batch")
    t.grad_accum = global_batch // per_step
    if t.grad_accum != configured:
        record["changed"] = {"train.grad_accum": [configured, t.grad_accum]}
    return record


def describe(record: dict) -> str:
    what = "; ".join(f"{k} {a} -> {b}" for k, (a, b) in record["changed"].items()) or "nothing changed"
    return (f"resuming {record['checkpoint']} (step {record['step']}) saved by {record['from_world_size']} "
            f"process(es) on {record['to_world_size']}: {what}")


def record_resume(out: Path, record: dict) -> list[dict]:
    """Append the resume to output_dir/resumes.json (rank 0) and return every resume so far."""
    from mistral_qlora.files import atomic_write_text

    path = out / RESUMES_FILE
    resumes = json.loads(path.read_text()) if path.is_file() else []
    resumes.append(record)
    atomic_write_text(path, json.dumps(resumes, indent=1))
    return resumes


def needs_view(record: dict | None) -> bool:
    return record is not None and record["from_world_size"] != record["to_world_size"]


def universal_ds_config(ds_config: Path) -> dict:
    """The strategy's DeepSpeed config, told to load the universal checkpoint."""
    config = json.loads(Path(ds_config).read_text())
    config.setdefault("checkpoint", {})["load_universal"] = True
    return config


def _rng_source(ckpt: Path, rank: int, saved_world: int) -> Path | None:
    for name in (f"rng_state_{rank % saved_world}.pth", "rng_state.pth", "rng_state_0.pth"):
        if (ckpt / name).is_file():
            return ckpt / name
    return None


def resume_view(ckpt: Path, world_size: int, saved_world: int, deepspeed: bool) -> Path:
    """Build (rank 0 only; the others wait) the folder the Trainer resumes from (module docstring)."""
    view = ckpt.parent / VIEW / ckpt.name
    shutil.rmtree(view.parent, ignore_errors=True)
    view.mkdir(parents=True)
    for item in ckpt.iterdir():
        if item.name.startswith("rng_state") or item.name in (MANIFEST, "latest_universal"):
            continue
        os.symlink(item.resolve(), view / item.name)
    for rank in range(world_size):
        source = _rng_source(ckpt, rank, saved_world)
        if source is not None:
            os.symlink(source.resolve(), view / (f"rng_state_{rank}.pth" if world_size > 1 else "rng_state.pth"))
    if deepspeed:
        tag = (ckpt / "latest").read_text().strip()
        universal = f"{tag}_universal"
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                               "--input_folder", str(ckpt / tag), "--output_folder", str(view / universal),
                               "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"DeepSpeed's ds_to_universal failed on {ckpt / tag}:\n{proc.stderr[-3000:]}")
        (view / "latest_universal").write_text(universal)
    return view


def discard_view(root: Path) -> None:
    shutil.rmtree(root / VIEW, ignore_errors=True)
