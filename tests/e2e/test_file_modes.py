"""What a run, `merge` and `export` write is as readable as a plain `open` or `mkdir` would make it
under the user's umask (files 0666 & ~umask, folders 0777 & ~umask), not private to the owner as
the temporary files they are written through start out; and a finished run leaves no empty
staging folder behind."""

import json
import os
import stat
from pathlib import Path

import pytest

from testkit import ROOT, story_records

UMASK = 0o027  # neither the 0600/0700 of a temporary file nor the 0644/0755 of the common 022


@pytest.fixture
def umask():
    def set_to(mask: int) -> int:
        os.umask(mask)
        return mask

    previous = os.umask(0o022)
    os.umask(previous)
    yield set_to
    os.umask(previous)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One tiny run (a checkpoint at each of its 2 steps), then `merge` and `export` of its adapter,
    all under UMASK; the folders that hold them."""
    from mistral_qlora.config import load_config
    from mistral_qlora.tools.export import export_model
    from mistral_qlora.tools.merge import merge_adapter
    from mistral_qlora.train import run_training

    tmp = tmp_path_factory.mktemp("modes")
    data = tmp / "qa.json"
    data.write_text(json.dumps(story_records(24)))
    previous = os.umask(UMASK)
    try:
        out = tmp / "run"
        cfg = load_config(ROOT / "configs/tiny.yaml", [
            f"data.train={data}", "data.max_seq_len=64", "data.tokens_per_row=128", "train.max_steps=2",
            "train.gradient_checkpointing=false", "train.logging_steps=1", "train.eval_steps=2",
            "train.save_steps=1", "train.keep_checkpoints=1", "eval.samples=1", "eval.max_new_tokens=2",
            f"output_dir={out}"])
        run_training(cfg)
        merged = merge_adapter(str(out / "adapter"), str(tmp / "merged"), dtype="fp32")
        gguf, modelfile = export_model(str(out / "adapter"), str(tmp / "gguf" / "tiny.gguf"), qtype="f16")
    finally:
        os.umask(previous)
    return {"run": out, "merged": Path(merged), "gguf": Path(gguf), "modelfile": Path(modelfile)}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def everything_under(folder: Path) -> list[Path]:
    return [folder, *sorted(folder.rglob("*"))]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writes_take_the_mode_of_the_umask(tmp_path, umask, mask):
    from mistral_qlora.files import atomic_write_text, usual_mode, write_json

    umask(mask)
    atomic_write_text(tmp_path / "a.txt", "text")
    write_json(tmp_path / "b.json", {"k": 1})
    assert usual_mode() == 0o666 & ~mask and usual_mode(folder=True) == 0o777 & ~mask
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.json") == 0o666 & ~mask


def test_the_builtin_model_folder_takes_the_mode_of_the_umask(tmp_path, umask):
    from mistral_qlora.model.builtin import build_once

    umask(UMASK)
    final = build_once(tmp_path / "model", lambda folder: (folder / "config.json").write_text("{}"))
    assert mode(final) == 0o777 & ~UMASK
    assert mode(final / "config.json") == 0o666 & ~UMASK


def test_every_artifact_of_a_run_takes_the_mode_of_the_umask(written):
    out = written["run"]
    for name in ("config.yaml", "summary.json", "history.json", "loss.png", "samples.md", "run.log",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert mode(out / name) == 0o666 & ~UMASK, name
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2"]
    for path in everything_under(out):
        if "wandb" in path.parts or "tensorboard" in path.parts:
            continue  # the trackers' own files
        expected = 0o777 & ~UMASK if path.is_dir() else 0o666 & ~UMASK
        assert mode(path) == expected, f"{path.relative_to(out)}: {oct(mode(path))}"


def test_a_finished_run_leaves_no_staging_folder(written):
    checkpoints = written["run"] / "checkpoints"
    assert not (checkpoints / ".staging").exists()
    assert not list(checkpoints.glob(".*"))
    assert (checkpoints / "checkpoint-2" / "manifest.json").is_file()


def test_merge_and_export_write_files_of_the_umask_mode(written):
    for path in everything_under(written["merged"]):
        expected = 0o777 & ~UMASK if path.is_dir() else 0o666 & ~UMASK
        assert mode(path) == expected, f"{path}: {oct(mode(path))}"
    assert mode(written["gguf"]) == mode(written["modelfile"]) == 0o666 & ~UMASK
    assert mode(written["gguf"].parent) == 0o777 & ~UMASK
