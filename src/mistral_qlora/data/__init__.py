"""Data: files -> records -> conversations -> token ids + labels -> packed rows -> batches.

- dataset.py: the data step of a run (`build_data`): sources -> tokenized tables -> train mix, eval set
- sources.py: where records come from, opened as `datasets` tables or streams
- load.py: a dataset file or folder read into plain dict records
- formats.py: records of any accepted form -> conversations (raw records: their documents)
- templates.py: chat templates: conversations -> token ids and labels, and the prompt to answer
- spm.py: SentencePiece's own encoder for the templates' text spans
- tokenize.py: conversations -> token ids and labels, over-long records truncated or dropped
- raw.py: raw documents -> token ids and labels (BOS + text + EOS, every token a target), split into chunks
- token_cache.py: records -> tokenized rows once, on worker processes, cached on disk
- ragged.py: many variable-length sequences as one flat array and its offsets
- mix.py: weighted mixing of sources, deterministic for the seed
- packing.py: sequences packed into rows of a token budget (best-fit decreasing)
- stream.py: streaming: sources mixed, tokenized and packed on the fly
- collator.py: batches for the Trainer: packed rows or padded batches

`build_data` and `TrainingData` are imported on first use (PEP 562): they bring torch, and the
light modules of data/ that the command line reads before it has checked the config must not.
"""

__all__ = ["TrainingData", "build_data"]


def __getattr__(name: str):
    if name in __all__:
        from mistral_qlora.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
