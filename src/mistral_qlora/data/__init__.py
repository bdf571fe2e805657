"""Data: files -> records -> conversations -> token ids + labels -> packed rows -> batches."""

from mistral_qlora.data.dataset import PreparedData, prepare_data

__all__ = ["PreparedData", "prepare_data"]
