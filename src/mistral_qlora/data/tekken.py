"""Tekken, the tiktoken-style byte-level BPE vocabulary of Mistral-Nemo and later checkpoints.

A Tekken checkpoint carries `tekken.json`: the byte pieces by rank, the pre-tokenizer's regex, the
number of special tokens (control tokens first, then the pieces shifted by that number) and the
instruct version its chat format follows (`config.version`). mistral-common, the reference of
the Mistral templates, encodes text with its `Tekkenizer` on that file; the Tekken template does
the same through `TekkenEncoder`, which holds mistral-common's Tekkenizer and sends a batch of
texts through its tiktoken encoding at once (no special tokens read in the text: a `[INST]`
written in a message is text, as mistral-common reads it).

transformers loads such a checkpoint's tokenizer with mistral-common too (`MistralCommonBackend`,
when `tekken.json` is there and mistral-common is installed), so the ids are the same everywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mistral_qlora.data.ragged import Ragged

TEKKEN_FILE = "tekken.json"


def tekken_file(tokenizer) -> Path | None:
    """The tokenizer's `tekken.json`: the file mistral-common loaded (transformers'
    MistralCommonBackend), else one in the checkpoint's folder; None for other tokenizers."""
    inner = getattr(getattr(getattr(tokenizer, "tokenizer", None), "instruct_tokenizer", None), "tokenizer", None)
    path = getattr(inner, "_file_path", None)
    if path is not None and Path(path).is_file() and Path(path).suffix == ".json":
        return Path(path)
    folder = getattr(tokenizer, "name_or_path", None)
    if folder and (Path(folder) / TEKKEN_FILE).is_file():
        return Path(folder) / TEKKEN_FILE
    return None


def tekken_version(path: Path) -> str:
    """The instruct version a tekken.json declares ('v3' for Mistral-Nemo, 'v7', ...)."""
    with open(path, encoding="utf-8") as f:
        return str(json.load(f).get("config", {}).get("version", ""))


class TekkenEncoder:
    """Batches of text -> ids with mistral-common's Tekkenizer on one tekken.json (no BOS/EOS);
    picklable (a data worker loads the file itself)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._tekkenizer = None

    def __getstate__(self):
        return dict(self.__dict__, _tekkenizer=None)

    @property
    def tekkenizer(self):
        if self._tekkenizer is None:
            from mistral_common.tokens.tokenizers.tekken import Tekkenizer

            self._tekkenizer = Tekkenizer.from_file(self.path)
        return self._tekkenizer

    @property
    def n_words(self) -> int:
        return self.tekkenizer.n_words

    def special_id(self, name: str) -> int:
        return self.tekkenizer.get_special_token(name)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.encode_ragged(texts).lists()

    def encode_ragged(self, texts: list[str]) -> Ragged:
        tek = self.tekkenizer
        threads = 1 if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("false", "0", "off", "no") else 8
        # Tekkenizer.encode is the model's ordinary encoding with ids shifted past the special tokens
        ragged = Ragged.from_lists(tek._model.encode_ordinary_batch(texts, num_threads=threads))
        ragged.values += tek.num_special_tokens
        return ragged
