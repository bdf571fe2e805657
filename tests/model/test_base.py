"""The checkpoint's config (model/base.py) on an architecture without a sliding window."""

import pytest

from mistral_qlora.config import ModelSection
from mistral_qlora.errors import UserError
from mistral_qlora.model.base import load_model_config

from testkit.llama import build_tiny_llama


def test_a_window_asked_of_a_llama_checkpoint_is_refused_and_none_is_kept(tmp_path):
    path = str(build_tiny_llama(tmp_path / "llama"))
    with pytest.raises(UserError, match=r"model.sliding_window=128: .* \(llama\) has no sliding window"):
        load_model_config(path, ModelSection(name_or_path=path, sliding_window=128))
    for window in ("auto", None):
        config = load_model_config(path, ModelSection(name_or_path=path, sliding_window=window))
        assert getattr(config, "sliding_window", None) is None
