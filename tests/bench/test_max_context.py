"""`bench --max-context`'s search on the CPU with a fake probe: doubling, then bisection to the
granularity, the fewest probes, and the edge cases (nothing fits, everything fits)."""

import pytest

from mistral_qlora.bench.max_context import Probe, longest_fitting, markdown_table


def fake(longest: int):
    calls = []

    def probe(n):
        calls.append(n)
        return Probe(n, n <= longest, peak_gib=n / 1000, tokens_per_s=1000.0)
    return probe, calls


@pytest.mark.parametrize("longest,start", [(50_000, 4096), (50_000, 200_000), (4096, 4096), (300, 8192)])
def test_search_finds_the_longest_fitting_length_to_the_granularity(longest, start):
    probe, calls = fake(longest)
    best, runs = longest_fitting(probe, start, granularity=256, limit=1 << 20)
    assert best.fits and best.tokens <= longest < best.tokens + 256
    assert [r.tokens for r in runs] == calls and len(calls) == len(set(calls))  # no length probed twice
    assert len(calls) <= 2 * 12  # logarithmic: doubling/halving plus bisection


def test_search_edge_cases():
    probe, _ = fake(100)
    assert longest_fitting(probe, 4096, granularity=256, limit=1 << 20)[0] is None
    probe, calls = fake(10**9)
    best, _ = longest_fitting(probe, 4096, granularity=256, limit=65536)
    assert best.tokens == 65536 and calls == [4096, 8192, 16384, 32768, 65536]


def test_markdown_table_lists_each_budget():
    table = markdown_table({16: Probe(40_960, True, 15.2, 2100.0), 8: None})
    assert "| 16 GiB | 40,960 | 15.2 GiB | 2,100 |" in table and "| 8 GiB | none fits |" in table
