"""Histogram buckets resolve sub-millisecond inter-token gaps and minutes-long TTFTs alike."""

from __future__ import annotations

import bisect
import itertools

import pytest

from gateway.metrics import BYTE_BUCKETS, LATENCY_BUCKETS


@pytest.mark.parametrize("seconds", [0.0002, 0.0005, 0.0018, 0.03, 2.0, 90.0, 300.0])
def test_a_latency_lands_in_a_narrow_bucket(seconds: float) -> None:
    """Bucket edges at most 2.5× apart anywhere from 0.2 ms to 5 min bound a quantile's error."""
    i = bisect.bisect_left(LATENCY_BUCKETS, seconds)
    assert 0 < i < len(LATENCY_BUCKETS)
    lower, upper = LATENCY_BUCKETS[i - 1], LATENCY_BUCKETS[i]
    assert lower < seconds <= upper
    assert upper / lower <= 2.5


def test_latency_buckets_span_a_tenth_of_a_millisecond_to_ten_minutes() -> None:
    assert LATENCY_BUCKETS[0] == 0.0001
    assert LATENCY_BUCKETS[-1] == 600.0
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))


def test_byte_buckets_cover_a_token_to_a_long_prompt_of_a_large_model() -> None:
    assert BYTE_BUCKETS[0] == 64 * 1024
    assert BYTE_BUCKETS[-1] == 64 * 1024**3
    assert all(b / a == 4 for a, b in itertools.pairwise(BYTE_BUCKETS))
