"""Histogram buckets resolve sub-millisecond inter-token gaps and minutes-long TTFTs alike,
and the lock-free counters and histograms export what they recorded."""

from __future__ import annotations

import bisect
import itertools

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import BYTE_BUCKETS, LATENCY_BUCKETS, GatewayMetrics


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


def _samples(metrics: GatewayMetrics, name: str) -> dict[tuple[str, str], float]:
    """``(sample name, le)`` -> value, for one metric family, parsed from the exposition."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        if family.name == name:
            for s in family.samples:
                out[s.name, s.labels.get("le", "")] = s.value
    return out


def test_a_histogram_counts_an_observation_in_every_bucket_at_or_above_it() -> None:
    """Prometheus buckets are cumulative and "le": a value equal to a bound is in that bucket."""
    metrics = GatewayMetrics()
    for seconds in (0.0001, 0.00011, 0.5, 600.0, 601.0):
        metrics.observe_ttft("m", "disaggregated", seconds)
    s = _samples(metrics, "pdgate_time_to_first_token_seconds")
    bucket = "pdgate_time_to_first_token_seconds_bucket"
    assert s[bucket, "0.0001"] == 1
    assert s[bucket, "0.0002"] == 2
    assert s[bucket, "0.3"] == 2
    assert s[bucket, "0.5"] == 3
    assert s[bucket, "600.0"] == 4
    assert s[bucket, "+Inf"] == 5
    assert s["pdgate_time_to_first_token_seconds_count", ""] == 5
    assert s["pdgate_time_to_first_token_seconds_sum", ""] == pytest.approx(1201.50021)
    assert len([k for k in s if k[0] == bucket]) == len(LATENCY_BUCKETS) + 1


def test_counters_add_up_per_label_set_and_refuse_to_go_down() -> None:
    metrics = GatewayMetrics()
    metrics.count_tokens("a", 10, 3)
    metrics.count_tokens("a", 5, 2)
    metrics.count_tokens("b", 1, 1)
    text = metrics.render().decode()
    totals = {
        s.labels["model"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "pdgate_prompt_tokens"
        for s in f.samples
        if s.name == "pdgate_prompt_tokens_total"
    }
    assert totals == {"a": 15, "b": 1}
    with pytest.raises(ValueError, match="only go up"):
        metrics.prompt_tokens.labels("a").inc(-1)
    with pytest.raises(ValueError, match="expected labels"):
        metrics.requests.labels("a", "disaggregated")
