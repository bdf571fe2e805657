"""What the plan tests size: Mistral-7B-Instruct-v0.2's shapes (the config fields the estimate reads)
and a run config of 8192-token rows of records up to 4096 tokens, one row per micro-batch."""

from __future__ import annotations

from types import SimpleNamespace

from mistral_qlora.config import RunConfig

MISTRAL_7B = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=32000,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)


def config_7b(**train) -> RunConfig:
    """The run config with `train` keys set (validated, so a bad value raises)."""
    return RunConfig.model_validate({"data": {"tokens_per_row": 8192, "max_seq_len": 4096},
                                     "train": {"micro_batch_size": 1, **train}})
