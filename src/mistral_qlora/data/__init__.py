"""Data: files -> records -> conversations -> token ids + labels -> packed rows -> batches."""

from mistral_qlora.data.dataset import TrainingData, build_data

__all__ = ["TrainingData", "build_data"]
