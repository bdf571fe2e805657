"""Data: files -> records -> conversations -> token ids + labels -> packed rows -> batches.

`build_data` and `TrainingData` are imported on first use (PEP 562): they bring torch, and a
light module of the package (`data.synthetic`, whose defaults the command line shows) must not.
"""

__all__ = ["TrainingData", "build_data"]


def __getattr__(name: str):
    if name in __all__:
        from mistral_qlora.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
