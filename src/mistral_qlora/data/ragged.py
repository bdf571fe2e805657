"""Ragged id batches: many variable-length sequences as one flat array and its offsets.

Sequence i of a `Ragged` is `values[offsets[i]:offsets[i + 1]]`. The word table of the
SentencePiece encoder (spm.py), the Mistral templates' assembly of a conversation from its pieces
(templates.py) and the truncation of over-long records (tokenize.py) work in this form with numpy
gathers, not with a Python list of ints per sequence, and an Arrow list column is made from it in
one step (`to_arrow`): a batch's tokens never become Python ints.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

ID = np.int32  # token ids and labels (vocabularies are far below 2**31)


def segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices of the ranges [starts[i], starts[i] + lengths[i]), one after another.

    With ends = cumsum(lengths), position p of the output inside range i is starts[i] + (p -
    (ends[i] - lengths[i])): the range's start less where it begins in the output, repeated over
    the range, plus arange(total)."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(total, dtype=np.int64)


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


@dataclass
class Ragged:
    values: np.ndarray  # ID, every sequence one after another
    offsets: np.ndarray  # int64, len(self) + 1, starting at 0

    @classmethod
    def from_lists(cls, lists: list[list[int]]) -> "Ragged":
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        offsets = offsets_of(lengths)
        values = np.fromiter(chain.from_iterable(lists), dtype=ID, count=int(offsets[-1]))
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def lists(self) -> list[list[int]]:
        bounds = self.offsets.tolist()
        values = self.values.tolist()
        return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def take(self, rows: np.ndarray, lengths: np.ndarray | None = None) -> "Ragged":
        """Sequences `rows`, in that order, each cut to its first `lengths[k]` values if given."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows] if lengths is None else np.asarray(lengths, dtype=np.int64)
        return Ragged(self.values[segments(self.offsets[rows], lengths)], offsets_of(lengths))

    def to_arrow(self):
        """A pyarrow list<int32> array over these values (one copy of the flat buffers)."""
        import pyarrow as pa

        return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32)), pa.array(self.values, pa.int32()))
