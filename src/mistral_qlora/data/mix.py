"""Weighted mixing of sources, deterministic for the seed; `data.mix` says when the mix ends.

Each source gives its records in its own order. Draw k of the mix names the source its record
comes from, in one of two ways:

- `first_exhausted` (the default): each draw is source s with probability weight_s / sum(weights),
  drawn from `numpy.random.default_rng(seed)`. The mix stops at the first draw that finds its source
  with no record left: no record is repeated, the weights hold for the whole mix, and the records
  the mix leaves out of the larger sources are reported by `prepare` (drawn vs records).
- `all_exhausted`: the draws follow a golden-ratio (Weyl) sequence from a seeded start,
  x_k = frac(u + k * (sqrt(5) - 1) / 2), source s where x_k falls in its share of [0, 1). Its counts
  after any k draws differ from k * weight_s / sum(weights) by a few records only (a random draw's
  differ by about sqrt(k)), so a source repeated to fill its share gets that share. A source that
  runs out starts again from its first record; the mix stops at the first draw that finds a source
  empty once every other source has been found empty before it: every record of every source is
  drawn at least once (the name and meaning of `datasets.interleave_datasets`' stopping strategy).

The streaming reader draws the same choices chunk by chunk (`Chooser`) and restarts a source the
same way, so a stream mixes as the table would.
"""

from __future__ import annotations

import numpy as np

MIXES = ("first_exhausted", "all_exhausted")
_GOLDEN = (5 ** 0.5 - 1) / 2


def probabilities(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def mix_order(sizes: list[int], weights: list[float], seed: int,
              mix: str = "first_exhausted") -> tuple[np.ndarray, np.ndarray]:
    """(source of each drawn record, its index within that source), up to where `mix` stops."""
    n = len(sizes)
    if n == 1:
        return np.zeros(sizes[0], dtype=np.int32), np.arange(sizes[0], dtype=np.int64)
    chooser = Chooser(weights, seed, mix)
    if mix == "first_exhausted":
        choices = chooser.draw_array(sum(sizes))
    else:  # draw until every source has been drawn once more than it has records
        need = np.asarray(sizes) + 1
        parts = [chooser.draw_array(int(np.max(need / chooser.p)) + n)]
        while (np.bincount(np.concatenate(parts), minlength=n) < need).any():
            parts.append(chooser.draw_array(max(1024, sum(sizes) // 4)))
        choices = np.concatenate(parts)
    local = np.empty(len(choices), dtype=np.int64)
    empty_at = []  # the draw that first finds each source empty
    for s in range(n):
        where = np.flatnonzero(choices == s)
        local[where] = np.arange(len(where)) % sizes[s]
        empty_at.append(int(where[sizes[s]]) if len(where) > sizes[s] else len(choices))
    stop = min(empty_at) if mix == "first_exhausted" else max(empty_at)
    return choices[:stop], local[:stop]


def mix_tables(tables: list, weights: list[float], seed: int, mix: str = "first_exhausted"):
    """(the mixed table, the source of each of its rows, the row of its source each came from).
    One table passes through as it is."""
    if len(tables) == 1:
        return tables[0], np.zeros(len(tables[0]), dtype=np.int32), np.arange(len(tables[0]), dtype=np.int64)
    from datasets import concatenate_datasets

    source, local = mix_order([len(t) for t in tables], weights, seed, mix)
    offsets = np.cumsum([0] + [len(t) for t in tables[:-1]])
    return concatenate_datasets(tables).select(offsets[source] + local), source, local


class Chooser:
    """The mix's source choices, drawn `n` at a time; its state goes into a checkpoint as JSON."""

    def __init__(self, weights: list[float], seed: int, mix: str = "first_exhausted"):
        self.p = probabilities(weights)
        self.mix = mix
        self.rng = np.random.default_rng(seed)
        self.start = float(self.rng.random())  # all_exhausted: u, where the sequence starts
        self.rng = np.random.default_rng(seed)  # first_exhausted: the draws as they always were
        self.k = 0  # all_exhausted: draws so far

    def draw_array(self, n: int) -> np.ndarray:
        if len(self.p) == 1:
            return np.zeros(n, dtype=np.int32)
        if self.mix == "first_exhausted":
            return self.rng.choice(len(self.p), size=n, p=self.p).astype(np.int32)
        x = np.mod(self.start + np.arange(self.k, self.k + n, dtype=np.float64) * _GOLDEN, 1.0)
        self.k += n
        cdf = np.cumsum(self.p)
        cdf /= cdf[-1]
        return np.minimum(np.searchsorted(cdf, x, side="right"), len(self.p) - 1).astype(np.int32)

    def draw(self, n: int) -> list[int]:
        return self.draw_array(n).tolist()

    def state(self) -> dict:
        return self.rng.bit_generator.state if self.mix == "first_exhausted" else {"k": self.k}

    def restore(self, state: dict) -> None:
        if self.mix == "first_exhausted":
            self.rng.bit_generator.state = state
        else:
            self.k = int(state["k"])
