"""data/ragged.py: a batch of sequences as one flat array and offsets, cut and gathered in numpy."""

import random

import numpy as np
import pyarrow as pa

from mistral_qlora.data.ragged import Ragged, segments


def _lists(seed: int, n: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(32000) for _ in range(rng.choice([0, 1, 2, rng.randrange(60)]))] for _ in range(n)]


def test_segments_are_the_ranges_one_after_another():
    rng = random.Random(0)
    starts = [rng.randrange(1000) for _ in range(300)]
    lengths = [rng.choice([0, 1, rng.randrange(40)]) for _ in range(300)]
    expected = [i for s, n in zip(starts, lengths) for i in range(s, s + n)]
    assert segments(np.array(starts), np.array(lengths)).tolist() == expected
    assert segments(np.array([5]), np.array([0])).tolist() == []


def test_a_ragged_batch_round_trips_and_takes_rows_cut_to_lengths():
    lists = _lists(1)
    r = Ragged.from_lists(lists)
    assert len(r) == len(lists) and r.lists() == lists and r.lengths.tolist() == [len(x) for x in lists]
    rows = [7, 3, 3, 150, 0]
    cut = [min(len(lists[i]), 5) for i in rows]
    assert r.take(np.array(rows), np.array(cut)).lists() == [lists[i][:n] for i, n in zip(rows, cut)]
    assert r.take(np.array(rows)).lists() == [lists[i] for i in rows]
    assert Ragged.from_lists([]).lists() == []


def test_to_arrow_is_the_list_column_of_the_sequences():
    lists = _lists(2)
    arr = Ragged.from_lists(lists).to_arrow()
    assert arr.type == pa.list_(pa.int32())
    assert arr.to_pylist() == lists
