"""The tokenizer: the checkpoint's own, or a real Mistral SentencePiece model that ships inside the
`mistral-common` package (no network needed): v1 (Mistral-7B v0.1/v0.2, 32000 pieces) for the
built-in models, v3 (Mistral-7B v0.3, 32768 pieces with control tokens) and v7 (v3's with
[SYSTEM_PROMPT]) for tests of their templates, and Mistral-Nemo's Tekken vocabulary
(`tekken.json`) for the built-in Tekken model.

The file is located with `importlib.util.find_spec` rather than by importing mistral-common,
whose imports pull in more than a minimal GPU image carries.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from mistral_qlora.errors import UserError

# The Mistral SentencePiece models, as mistral-common names them.
MISTRAL_V1_FILE = "tokenizer.model.v1"
MISTRAL_FILES = {"v1": MISTRAL_V1_FILE, "v3": "mistral_instruct_tokenizer_240323.model.v3",
                 "v7": "mistral_instruct_tokenizer_241114.model.v7", "tekken": "tekken_240718.json"}

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "legacy": True,
    "add_bos_token": True,
    "add_eos_token": False,
    "model_max_length": 32768,
    "padding_side": "right",
}


def mistral_tokenizer_file(version: str = "v1") -> Path:
    name = MISTRAL_FILES[version]
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        raise UserError("the embedded tokenizer needs the 'mistral-common' package: pip install mistral-common")
    path = Path(spec.origin).parent / "data" / name
    if not path.is_file():
        raise UserError(f"mistral-common is installed but has no {name} (looked in {path.parent})")
    return path


def mistral_v1_tokenizer_file() -> Path:
    return mistral_tokenizer_file("v1")


def write_mistral_tokenizer(directory: Path, version: str = "v1") -> None:
    """Write tokenizer.model + tokenizer_config.json so AutoTokenizer loads the real Mistral tokenizer;
    for `tekken`, tekken.json, which transformers loads through mistral-common (MistralCommonBackend)
    in a folder whose config.json is a Mistral model's."""
    directory.mkdir(parents=True, exist_ok=True)
    if version == "tekken":
        shutil.copyfile(mistral_tokenizer_file(version), directory / "tekken.json")
        return
    shutil.copyfile(mistral_tokenizer_file(version), directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))


def write_mistral_v1_tokenizer(directory: Path) -> None:
    write_mistral_tokenizer(directory, "v1")


def load_tokenizer(path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except OSError as exc:
        raise UserError(f"model.name_or_path={path!r}: cannot load its tokenizer: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        # Mistral has no pad token; <unk> never occurs in real text and padding is masked anyway.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
