"""The tokenizer: the checkpoint's own, or the real Mistral v1 SentencePiece model that ships
inside the `mistral-common` package (no network needed).

The file is located with `importlib.util.find_spec` rather than by importing mistral-common,
whose imports pull in more than a minimal GPU image carries.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from mistral_qlora.errors import UserError

# The Mistral-7B v0.1/v0.2 SentencePiece model (32000 tokens), as mistral-common names it.
MISTRAL_V1_FILE = "tokenizer.model.v1"

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


def mistral_v1_tokenizer_file() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        raise UserError("the embedded tokenizer needs the 'mistral-common' package: pip install mistral-common")
    path = Path(spec.origin).parent / "data" / MISTRAL_V1_FILE
    if not path.is_file():
        raise UserError(f"mistral-common is installed but has no {MISTRAL_V1_FILE} (looked in {path.parent})")
    return path


def write_mistral_v1_tokenizer(directory: Path) -> None:
    """Write tokenizer.model + tokenizer_config.json so AutoTokenizer loads the real v1 tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mistral_v1_tokenizer_file(), directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))


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
