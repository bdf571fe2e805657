"""`bench --max-context`'s search: the longest single row that trains one full step in a budget.

A probe trains one step (forward, backward, optimizer) on one row of n tokens and says whether it
fit, with its peak memory and tokens/s. Whether a length fits is monotone in n, so the search
doubles from a start (the planner's estimate) until a probe fails, then bisects between the last
length that fit and the first that did not until they are `granularity` tokens apart. Each probe
runs in a child process of its own (the caller's `probe`), so an out-of-memory error cannot leave
the allocator of the next probe fragmented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Probe:
    tokens: int
    fits: bool
    peak_gib: float = 0.0
    tokens_per_s: float = 0.0


def longest_fitting(probe: Callable[[int], Probe], start: int, granularity: int, limit: int) -> tuple[Probe | None,
                                                                                                      list[Probe]]:
    """(the longest probe that fit, or None if even `granularity` tokens did not; every probe run,
    in order). Lengths are multiples of `granularity`, between it and `limit`."""
    def rounded(n: int) -> int:
        return max(granularity, min(limit, n // granularity * granularity))

    runs: list[Probe] = []

    def run(n: int) -> Probe:
        result = probe(n)
        runs.append(result)
        return result

    best, n = None, rounded(start)
    first = run(n)
    if first.fits:  # double until a probe fails or the limit fits
        best = first
        while n < limit:
            n = rounded(2 * n)
            result = run(n)
            if not result.fits:
                break
            best = result
        else:
            return best, runs
        low, high = best.tokens, n
    else:  # halve until a probe fits
        high = n
        while n > granularity:
            n = rounded(n // 2)
            result = run(n)
            if result.fits:
                best = result
                break
            high = n
        if best is None:
            return None, runs
        low = best.tokens
    while high - low > granularity:  # bisect: `low` fits, `high` does not
        mid = rounded((low + high) // 2)
        if mid in (low, high):
            break
        result = run(mid)
        if result.fits:
            best, low = result, mid
        else:
            high = mid
    return best, runs


def markdown_table(found: dict[float, Probe | None]) -> str:
    """budget (GiB) -> the longest row, as the report's Markdown table."""
    lines = ["| budget | longest row (tokens) | peak GPU memory | tokens/s |", "|---|---:|---:|---:|"]
    for budget, probe in found.items():
        if probe is None:
            lines.append(f"| {budget:g} GiB | none fits | | |")
        else:
            lines.append(f"| {budget:g} GiB | {probe.tokens:,} | {probe.peak_gib:.1f} GiB | {probe.tokens_per_s:,.0f} |")
    return "\n".join(lines)
