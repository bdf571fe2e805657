"""Loads this folder's JSONL files wherever the folder lies (lm-eval's `custom_dataset` hook), so
`--include-path dataset/tasks` works from any working directory."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str, **kwargs):
    return datasets.load_dataset("json", data_files={"test": str(HERE / name)})


def story_mc(**kwargs):
    return _load("story_mc.jsonl")


def story_gen(**kwargs):
    return _load("story_gen.jsonl")
