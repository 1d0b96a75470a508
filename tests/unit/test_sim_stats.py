"""Simulation statistics and economics (gateway/sim/stats.py, economics.py, gateway/sim/run.py)."""

from __future__ import annotations

import math
import random

import pytest

from gateway.sim.economics import (
    FleetItem,
    joules_per_token,
    missing_prices,
    usd_per_million_tokens,
)
from gateway.sim.run import RequestRecord, steady_throughput
from gateway.sim.stats import GapRecorder, summary, weighted_quantiles, weighted_summary


def test_summary_uses_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    s = summary(values)
    assert s.mean == pytest.approx(50.5)
    assert (s.p50, s.p90, s.p99) == (50.0, 90.0, 99.0)
    assert summary([3.0]) == summary([3.0])
    assert summary([3.0]).p99 == 3.0


def test_empty_summary_is_null_in_json() -> None:
    assert summary([]).as_dict() == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_weighted_quantiles_equal_the_expanded_samples() -> None:
    values, weights = [0.01, 0.05, 0.02], [90, 1, 9]
    expanded = [0.01] * 90 + [0.05] * 1 + [0.02] * 9
    assert weighted_summary(values, weights) == summary(expanded)
    assert weighted_quantiles(values, weights, [0.99, 0.5]) == [0.02, 0.01]


def test_weighted_quantiles_of_many_samples_equal_the_expanded_samples() -> None:
    """Random samples with integer weights (as a gap recorder keeps them), ties included:
    each quantile is the one of the samples repeated by their weights."""
    rng = random.Random(4)
    for n in (1, 2, 7, 500):
        values = [round(rng.uniform(0.0, 0.05), 3) for _ in range(n)]
        weights = [float(rng.randint(1, 30)) for _ in range(n)]
        expanded = [v for v, w in zip(values, weights, strict=True) for _ in range(int(w))]
        qs = [0.99, 0.0, 0.5, 0.9, 1.0, 0.01]
        ranked = sorted(expanded)
        want = [ranked[max(0, math.ceil(q * len(ranked)) - 1)] for q in qs]
        assert weighted_quantiles(values, weights, qs) == want


def test_gap_recorder_summarises_weighted_gaps() -> None:
    gaps = GapRecorder()
    gaps.add(0.010, 990)
    gaps.add(0.300, 10)
    s = gaps.summary()
    assert gaps.tokens == 1000
    assert s.mean == pytest.approx((0.010 * 990 + 0.3 * 10) / 1000)
    assert s.p50 == 0.010
    assert s.p99 == 0.010  # 99.0% of tokens had a 10 ms gap
    gaps.add(0.300, 1)
    assert gaps.summary().p99 == 0.300


def test_cost_per_million_output_tokens_and_energy_per_token() -> None:
    fleet = [
        FleetItem("h100-sxm", 8, 700.0, 2.95),
        FleetItem("groq-lpu-v1", 500, 300.0, 0.5),
    ]
    dollars_per_hour = 8 * 2.95 + 500 * 0.5
    # Ten simulated minutes, twelve million tokens.
    assert usd_per_million_tokens(fleet, 600.0, 12_000_000) == pytest.approx(
        dollars_per_hour / 6 / 12
    )
    assert joules_per_token(fleet, 600.0, 12_000_000) == pytest.approx(
        (8 * 700 + 500 * 300) * 600 / 12e6
    )


def test_unknown_prices_or_no_tokens_give_none() -> None:
    fleet = [FleetItem("cerebras-wse-3", 4, 23000.0, None)]
    assert usd_per_million_tokens(fleet, 10.0, 1000) is None
    assert joules_per_token(fleet, 10.0, 1000) == pytest.approx(4 * 23000 * 10 / 1000)
    assert missing_prices(fleet) == ["cerebras-wse-3"]
    assert joules_per_token([FleetItem("x", 1, 100.0, 1.0)], 10.0, 0) is None


def test_steady_throughput_excludes_the_drain_after_the_last_arrival() -> None:
    # Two requests arriving at 0 and 10 s, each streaming 101 tokens over 20 s.
    records = [
        RequestRecord(0.0, 10, 101, first_at=0.0, end_at=20.0),
        RequestRecord(10.0, 10, 101, first_at=10.0, end_at=30.0),
    ]
    # Nothing completes before the last arrival: the window is [0, 10], holding the first
    # token of each and half of the first request's remaining 100.
    assert steady_throughput(records) == pytest.approx((1 + 1 + 50) / 10.0)
    assert steady_throughput(records[:1]) == 0.0


def test_steady_throughput_excludes_the_ramp_before_the_first_completion() -> None:
    records = [
        RequestRecord(float(t), 10, 11, first_at=t + 1.0, end_at=t + 11.0) for t in range(40)
    ]
    # From the first completion (11 s) to the last arrival (39 s): one request per second,
    # 11 tokens each, in steady state.
    assert steady_throughput(records) == pytest.approx(11.0, rel=0.02)


def test_request_record_tpot_and_ttft() -> None:
    r = RequestRecord(1.0, 100, 11, first_at=1.5, end_at=2.5)
    assert r.ttft == pytest.approx(0.5)
    assert r.tpot == pytest.approx(0.1)
    assert RequestRecord(0.0, 1, 1, first_at=0.1, end_at=0.1).tpot is None
    assert math.isnan(RequestRecord(0.0, 1).ttft)
