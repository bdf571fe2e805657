"""Weighted mixing of sources, deterministic for the seed.

Each drawn record comes from source s with probability weight_s / sum(weights), the choices drawn
from `numpy.random.default_rng(seed)`; each source gives its records in its own order. The mix
stops when a drawn source has no record left ("first exhausted"): no record is repeated, the
weights hold for the whole mix, and the records the mix leaves out of the larger sources are
reported by `prepare` (records vs drawn). The streaming reader draws the same choices chunk by
chunk (`Chooser`), so a stream mixes as the table would.
"""

from __future__ import annotations

import numpy as np


def probabilities(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def mix_order(sizes: list[int], weights: list[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each drawn record, its index within that source), up to the first exhausted source."""
    n = len(sizes)
    if n == 1:
        return np.zeros(sizes[0], dtype=np.int32), np.arange(sizes[0], dtype=np.int64)
    choices = np.random.default_rng(seed).choice(n, size=sum(sizes), p=probabilities(weights)).astype(np.int32)
    local = np.empty(len(choices), dtype=np.int64)
    stop = len(choices)
    for s in range(n):
        where = np.flatnonzero(choices == s)
        local[where] = np.arange(len(where))
        if len(where) > sizes[s]:
            stop = min(stop, int(where[sizes[s]]))  # the draw that finds source s empty
    return choices[:stop], local[:stop]


def mix_tables(tables: list, weights: list[float], seed: int):
    """(the mixed table, the source of each of its rows). One table passes through as it is."""
    if len(tables) == 1:
        return tables[0], np.zeros(len(tables[0]), dtype=np.int32)
    from datasets import concatenate_datasets

    source, local = mix_order([len(t) for t in tables], weights, seed)
    offsets = np.cumsum([0] + [len(t) for t in tables[:-1]])
    return concatenate_datasets(tables).select(offsets[source] + local), source


class Chooser:
    """The mix's source choices, drawn `n` at a time; its state goes into a checkpoint as JSON."""

    def __init__(self, weights: list[float], seed: int):
        self.p = probabilities(weights)
        self.rng = np.random.default_rng(seed)

    def draw(self, n: int) -> list[int]:
        if len(self.p) == 1:
            return [0] * n
        return self.rng.choice(len(self.p), size=n, p=self.p).tolist()

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state
