"""The tiny model's tokenizer (the real Mistral v1 vocabulary), loaded once for the data tests."""

import pytest

from testkit import tiny_path


@pytest.fixture(scope="session")
def tok():
    from mistral_qlora.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_path())
