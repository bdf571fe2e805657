"""Files written whole: to a temporary name in the same folder, flushed to disk, then renamed, so
a reader (or the next run after a kill) never sees half of one.

`tempfile` creates its files 0600 and its folders 0700 whatever the umask, and a rename keeps the
mode: a file or folder published that way is given the mode a plain `open` or `mkdir` would have
given it (0666 or 0777 less the process umask, `usual_mode`), so what a run writes is as readable
as the user's other files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process umask, read without changing it where Linux reports it (a change, even undone
    at once, would apply to files other threads create meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(folder: bool = False) -> int:
    """The mode `open` (0666) or `mkdir` (0777) gives under the process umask."""
    return (0o777 if folder else 0o666) & ~umask()


def set_usual_modes(folder: Path) -> None:
    """`folder` and everything in it to the modes of `usual_mode`, before the folder is published:
    the libraries that write into it (safetensors among them) write through temporary files too."""
    folder = Path(folder)
    files, folders = usual_mode(), usual_mode(folder=True)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, folders if path.is_dir() else files)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, usual_mode())  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
