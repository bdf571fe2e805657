"""SentencePiece's own encoder for the Mistral templates' text spans.

mistral-common, the reference of the Mistral templates (templates.py), encodes Mistral's v1 and
v3 text with SentencePiece on the checkpoint's `tokenizer.model`. transformers' tokenizer reaches
ids from its own conversion of the same model: for the v1 vocabulary the same ids, for the v3 one
not always (runs of spaces come out as other pieces), and in either case at well under
SentencePiece's speed, since it also builds offsets and per-token metadata that the templates
never read. So the Mistral templates tokenize with SentencePiece itself (`spm_encoder`) when the
tokenizer was loaded from a SentencePiece model file (its `vocab_file`) with exactly that file's
vocabulary: every id the same piece, and no tokens added beyond it (an added token is one id to
the tokenizer and several pieces to SentencePiece). Otherwise they tokenize with the tokenizer,
special-token strings read as text (`tokenizer_ids`).

Threads: one per available core, or one where TOKENIZERS_PARALLELISM=false, the switch the fast
tokenizer honours too (the data pipeline sets it in its worker processes, which each tokenize
their own batches).
"""

from __future__ import annotations

import os
from pathlib import Path


class SpmEncoder:
    """Batches of text -> ids with a SentencePiece model (no BOS/EOS added)."""

    def __init__(self, model_file: str):
        self.model_file = model_file
        self._processor = None

    def __getstate__(self):  # worker processes load the model themselves
        return {"model_file": self.model_file, "_processor": None}

    @property
    def processor(self):
        if self._processor is None:
            import sentencepiece

            self._processor = sentencepiece.SentencePieceProcessor(model_file=self.model_file)
        return self._processor

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, num_threads=_threads())


def _threads() -> int:
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("false", "0", "off", "no"):
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def tokenizer_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The tokenizer's ids for each text, special-token strings read as text, nothing added."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def spm_encoder(tokenizer) -> SpmEncoder | None:
    """SentencePiece on the tokenizer's own model file, where its vocabulary is exactly that
    file's (module docstring); else None."""
    model_file = getattr(tokenizer, "vocab_file", None)
    if not model_file or not str(model_file).endswith(".model") or not Path(model_file).is_file():
        return None
    encoder = SpmEncoder(str(model_file))
    try:
        sp = encoder.processor
        n = sp.get_piece_size()
        if len(tokenizer) != n:
            return None
        if tokenizer.convert_ids_to_tokens(list(range(n))) != [sp.id_to_piece(i) for i in range(n)]:
            return None
    except Exception:  # a file SentencePiece does not read: the tokenizer encodes
        return None
    return encoder
