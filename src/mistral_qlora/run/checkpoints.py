"""Checkpoints that survive kills: staged, fsynced, renamed into place, verified before resume.

The Trainer writes `checkpoint-N` into `checkpoints/.staging/` (its `output_dir`). When every rank
has finished writing, rank 0 records a manifest (size and SHA-256 of every file) and the run's
fingerprint, fsyncs every file and folder, and renames the folder to `checkpoints/checkpoint-N`.
A kill at any moment leaves either the previous complete checkpoints or a staging folder that
the next start discards; a checkpoint whose files no longer match its manifest is skipped on
resume with a warning that names it.

Each checkpoint also records the run's fingerprint (`run_fingerprint`): a resume with another
model, quantization or LoRA shape is refused, one with other data, batch geometry or seed only
with --force (`find_resume_checkpoint`). Another world size alone is no change of the run: the
global batch is kept by train.grad_accum (run/elastic.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

from mistral_qlora.config import RunConfig
from mistral_qlora.errors import UserError
from mistral_qlora.files import set_usual_modes

STAGING = ".staging"
MANIFEST = "manifest.json"
FINGERPRINT = "run.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")

# Held while a checkpoint is renamed into place: the hang watchdog (run/watchdog.py) takes it
# before it ends the process, so a commit is never cut between its two renames.
COMMIT_LOCK = threading.Lock()

# Fingerprint keys that change what the saved tensors mean: a resume across them cannot work.
SHAPE_KEYS = ("model", "revision", "quantization", "lora")


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def staging_root(output_dir: str | Path) -> Path:
    return checkpoints_root(output_dir) / STAGING


def step_of(path: Path) -> int:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else -1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(staged: Path, fingerprint: dict) -> Path:
    """Seal a staged checkpoint (fingerprint, manifest, fsync) and rename it into place."""
    with COMMIT_LOCK:
        return _commit(staged, fingerprint)


def _commit(staged: Path, fingerprint: dict) -> Path:
    (staged / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    manifest = {str(p.relative_to(staged)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(staged)}
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    set_usual_modes(staged)
    for p in _files(staged) + [staged / MANIFEST]:
        _fsync_path(p)
    for d in sorted({p.parent for p in _files(staged)} | {staged}, key=lambda d: -len(d.parts)):
        _fsync_path(d)
    root = staged.parent.parent
    final = root / staged.name
    if final.exists():  # the same step saved again (after a resume): replace it whole
        trash = root / f"{STAGING}-replaced-{staged.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        os.rename(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staged, final)
    _fsync_path(root)
    return final


def verify(ckpt: Path) -> str | None:
    """None when the checkpoint is complete and intact, else why not."""
    manifest_file = ckpt / MANIFEST
    if not manifest_file.is_file():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "manifest is damaged"
    for rel, meta in manifest.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{rel} has {p.stat().st_size} bytes, expected {meta['size']}"
        if _sha256(p) != meta["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint folders, oldest first (not verified)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) >= 0), key=step_of)


def newest_valid(root: Path, warn) -> Path | None:
    for ckpt in reversed(complete_checkpoints(root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warn(f"skipping checkpoint {ckpt}: {problem}")
    return None


def rotate(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def discard_staging(root: Path) -> None:
    for p in root.glob(f"{STAGING}*") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


def remove_empty_staging(root: Path) -> None:
    """The staging folder, once a finished run has committed every checkpoint out of it (left as it
    is when it still holds something)."""
    try:
        (root / STAGING).rmdir()
    except OSError:  # absent, or not empty
        pass


def check_fingerprint(ckpt: Path, current: dict, force: bool, warn) -> None:
    """Refuse to resume a checkpoint made by a different run (model, LoRA shape, data...)."""
    try:
        saved = json.loads((ckpt / FINGERPRINT).read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"checkpoint {ckpt} has no readable {FINGERPRINT}; resume from another or pass --overwrite") from None
    changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if "world_size" in changed and set(changed) <= {"world_size", "grad_accum"}:
        # another number of processes (and the grad_accum written for it): run/elastic.py keeps the
        # checkpoint's global batch
        return
    if not changed:
        return
    detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
    shape = [k for k in changed if k in SHAPE_KEYS]
    if shape:
        raise UserError(
            f"cannot resume {ckpt}: it was made with a different {', '.join(shape)} ({detail}); "
            "use a new output_dir or pass --overwrite"
        )
    if not force:
        raise UserError(
            f"refusing to resume {ckpt}: the run changed ({detail}); pass --force to resume anyway, "
            "or --overwrite to start again"
        )
    warn(f"resuming {ckpt} although the run changed ({detail}) because of --force")


def run_fingerprint(cfg: RunConfig, data_digest: str, world_size: int) -> dict:
    """What a checkpoint must agree with to be resumed: model and LoRA shape, data (the digest of
    its tokens: data.TrainingData.digest), batch geometry."""
    return {
        "model": cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "quantization": cfg.quantization.model_dump(),
        "lora": {"r": cfg.lora.r, "target_modules": cfg.lora.target_modules},
        "data": data_digest,
        "packing": cfg.data.tokens_per_row if cfg.data.packing else None,
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum": cfg.train.grad_accum,
        "world_size": world_size,
        "seed": cfg.train.seed,
    }


def find_resume_checkpoint(cfg: RunConfig, fingerprint: dict, overwrite: bool, force: bool, warn) -> Path | None:
    """The checkpoint `train.resume` names (auto: the newest complete one), checked against the
    run's fingerprint; None to start afresh."""
    root = checkpoints_root(cfg.output_dir)
    if overwrite:
        return None
    resume = cfg.train.resume
    if resume == "never":
        if complete_checkpoints(root):
            raise UserError(
                f"output_dir={cfg.output_dir!r} has checkpoints of an unfinished run and train.resume=never; "
                "set train.resume=auto to continue it or pass --overwrite to start again"
            )
        return None
    if resume == "auto":
        ckpt = newest_valid(root, warn=warn)
    else:
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise UserError(f"train.resume={resume!r}: no such checkpoint folder")
        problem = verify(ckpt)
        if problem:
            raise UserError(f"train.resume={resume!r}: checkpoint is incomplete or corrupt: {problem}")
    if ckpt is not None:
        check_fingerprint(ckpt, fingerprint, force, warn=warn)
    return ckpt


def restore_rng_state(ckpt: Path, world_size: int, process_index: int) -> bool:
    """Set the Python, NumPy, torch and CUDA generators to a checkpoint's (the Trainer's own
    `rng_state[_<rank>].pth`), as the Trainer does when it resumes by skipping batches. A
    streaming run resumes without that skip (the stream starts at its position), so it restores
    them itself before its first step. False when the checkpoint has no such file."""
    import random

    import numpy as np
    import torch
    from transformers.trainer_pt_utils import safe_globals

    path = ckpt / (f"rng_state_{process_index}.pth" if world_size > 1 else "rng_state.pth")
    if not path.is_file():
        return False
    with safe_globals():
        state = torch.load(path, weights_only=True)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        if world_size > 1:
            torch.cuda.random.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.random.set_rng_state(state["cuda"])
    return True
