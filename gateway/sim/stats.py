"""Latency statistics of a simulation: summaries, weighted percentiles, token-gap recording.

Percentiles use the *nearest-rank* definition (the smallest sample with at least ``q`` of the
weight at or below it), the one latency benchmarks report, so a p99 is always a latency some
request actually saw. Inter-token gaps are recorded with weights (:class:`GapRecorder`): an
engine step adds one entry for all the sequences that got a token in it after a token in the
step before, so memory and time grow with steps, not tokens.

Example::

    summary([0.2, 0.3, 0.9])                    # Summary(mean=0.466..., p50=0.3, ...)
    gaps = GapRecorder(); gaps.add(0.01, 250)   # 250 tokens, each 10 ms after the last
    gaps.summary().p99
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True, slots=True)
class Summary:
    """Mean and percentiles of a latency, in seconds (NaN when there were no samples)."""

    mean: float
    p50: float
    p90: float
    p99: float

    def as_dict(self) -> dict[str, float | None]:
        return {k: (None if math.isnan(v) else v) for k, v in asdict(self).items()}


EMPTY = Summary(math.nan, math.nan, math.nan, math.nan)


def weighted_quantiles(
    values: Sequence[float], weights: Sequence[float], qs: Iterable[float]
) -> list[float]:
    """Nearest-rank quantiles of weighted samples (the samples are sorted by index, not as
    (value, weight) pairs: a simulation has hundreds of thousands of them; each quantile is
    then a bisection of the running weight sums)."""
    if len(values) != len(weights):
        raise ValueError("values and weights differ in length")
    order = sorted(range(len(values)), key=values.__getitem__)
    total = math.fsum(weights)
    wanted = sorted((q, i) for i, q in enumerate(qs))
    out = [values[order[-1]]] * len(wanted)
    if min(weights, default=0.0) >= 0:  # the running sums never fall: bisect them
        running = list(itertools.accumulate(map(weights.__getitem__, order)))
        for q, i in wanted:
            k = bisect.bisect_left(running, q * total * (1 - 1e-12))
            if k < len(running):
                out[i] = values[order[k]]
        return out
    acc = 0.0
    k = 0
    for j in order:
        acc += weights[j]
        while k < len(wanted) and acc >= wanted[k][0] * total * (1 - 1e-12):
            out[wanted[k][1]] = values[j]
            k += 1
        if k == len(wanted):
            break
    return out


def summary(values: Sequence[float]) -> Summary:
    """Mean, p50, p90 and p99 of unweighted samples."""
    if not values:
        return EMPTY
    ordered = sorted(values)
    n = len(ordered)
    pick = [ordered[max(0, math.ceil(q * n) - 1)] for q in QUANTILES]
    return Summary(math.fsum(ordered) / n, *pick)


def weighted_summary(values: Sequence[float], weights: Sequence[float]) -> Summary:
    total = math.fsum(weights)
    if not values or total <= 0:
        return EMPTY
    mean = math.fsum(map(operator.mul, values, weights)) / total
    return Summary(mean, *weighted_quantiles(values, weights, QUANTILES))


class GapRecorder:
    """Inter-token gaps with weights (implements :class:`backends.emulator.engine.GapRecorder`)."""

    def __init__(self) -> None:
        self.gaps = array("d")
        self.weights = array("d")

    def add(self, gap: float, weight: int) -> None:
        self.gaps.append(gap)
        self.weights.append(weight)

    @property
    def tokens(self) -> int:
        return int(math.fsum(self.weights))

    def summary(self) -> Summary:
        return weighted_summary(self.gaps, self.weights)
