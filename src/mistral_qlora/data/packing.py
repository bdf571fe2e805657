"""Pack variable-length sequences into rows of a token budget (best-fit decreasing).

Each row is a list of example indices whose lengths sum to at most the budget. Sequences are
placed longest first, each into the open row with the least room that still fits it; ties in
length are broken by a seeded shuffle, so the result is deterministic for a seed. Rows are packed
once per run; the Trainer's seeded sampler reshuffles their order every epoch. The collator then
concatenates a row's sequences with position ids restarting at 0, so none of them can attend to
another.
"""

from __future__ import annotations

import bisect
import random


def pack_best_fit_decreasing(lengths: list[int], budget: int, seed: int = 0) -> list[list[int]]:
    """Return rows (lists of indices into `lengths`); every row's total length is <= budget."""
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if too_long:
        raise ValueError(f"sequence {too_long[0]} has {lengths[too_long[0]]} tokens, more than the row budget {budget}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the shuffled order

    rows: list[list[int]] = []
    # Open rows as a sorted list of (room left, row id); bisect finds the tightest fit.
    room: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            left, row_id = room.pop(k)
            rows[row_id].append(i)
            left -= n
        else:
            row_id = len(rows)
            rows.append([i])
            left = budget - n
        if left > 0:
            bisect.insort(room, (left, row_id))
    return rows


def packing_efficiency(lengths: list[int], rows: list[list[int]], budget: int) -> float:
    """Real tokens over row slots (1.0 = no slot wasted)."""
    if not rows:
        return 0.0
    return sum(lengths) / (len(rows) * budget)

