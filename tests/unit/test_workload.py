"""Simulation workloads: length distributions, arrivals, Mooncake traces (backends/sim)."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from gateway.sim.workload import (
    RequestSpec,
    WorkloadError,
    load_trace,
    make_workload,
    parse_length,
    poisson_arrivals,
    poisson_until,
)

SAMPLE = Path(__file__).resolve().parents[2] / "loadtests" / "traces" / "mooncake_sample.jsonl"


def test_fixed_length() -> None:
    length = parse_length("512")
    assert {length.draw(random.Random(i)) for i in range(5)} == {512}
    assert parse_length(7).mean == 7


@pytest.mark.parametrize(
    ("spec", "mean", "std"),
    [
        ("uniform:100,300", 200, 200 / math.sqrt(12)),
        ("normal:1000,100", 1000, 100),
        ("lognormal:800,400", 800, 400),
    ],
)
def test_distributions_have_the_requested_mean_and_spread(
    spec: str, mean: float, std: float
) -> None:
    rng = random.Random(42)
    length = parse_length(spec)
    draws = [length.draw(rng) for _ in range(20000)]
    assert statistics.fmean(draws) == pytest.approx(mean, rel=0.02)
    assert statistics.pstdev(draws) == pytest.approx(std, rel=0.05)
    assert all(isinstance(d, int) and d >= 1 for d in draws)


def test_draws_are_clipped_at_one() -> None:
    rng = random.Random(0)
    draws = [parse_length("normal:2,50").draw(rng) for _ in range(2000)]
    assert min(draws) == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gamma:1,2", "unknown distribution 'gamma'"),
        ("uniform:5", "needs two numbers"),
        ("uniform:9,3", "1 <= LO <= HI"),
        ("normal:x,3", "'x' in length spec"),
        ("lognormal:0,3", "MEAN > 0"),
        ("0", "at least 1"),
    ],
)
def test_bad_length_specs_say_why(spec: str, message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        parse_length(spec)


def test_poisson_arrivals_have_exponential_gaps_at_the_rate() -> None:
    rng = random.Random(3)
    times = poisson_arrivals(50.0, 20000, rng)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 50.0, rel=0.03)
    assert statistics.pstdev(gaps) == pytest.approx(1 / 50.0, rel=0.05)  # exponential: std = mean
    assert times == sorted(times)
    window = poisson_until(50.0, 100.0, random.Random(3))
    assert len(window) == pytest.approx(5000, rel=0.05)
    assert max(window) < 100.0


def test_mooncake_trace_sample_parses_with_relative_seconds_and_hashes() -> None:
    specs = load_trace(SAMPLE)
    assert len(specs) >= 200
    assert specs[0].arrival_s == 0.0
    arrivals = [s.arrival_s or 0.0 for s in specs]
    assert arrivals == sorted(arrivals)
    first = json.loads(SAMPLE.read_text().splitlines()[0])
    assert specs[0].prompt_tokens == first["input_length"]
    assert specs[0].output_tokens == first["output_length"]
    assert specs[0].block_hashes == tuple(first["hash_ids"])
    # 512-token blocks: one hash per started block of the prompt.
    assert all(len(s.block_hashes) == math.ceil(s.prompt_tokens / 512) for s in specs[:50])
    # The trace records reuse: some requests share leading blocks.
    heads = [s.block_hashes[:2] for s in specs if len(s.block_hashes) >= 2]
    assert len(set(heads)) < len(heads)


def test_bad_trace_lines_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 2}\n{"timestamp": 1}\n')
    with pytest.raises(WorkloadError, match=r"t.jsonl:2: not a Mooncake trace line"):
        load_trace(path)
    path.write_text("")
    with pytest.raises(WorkloadError, match="no requests"):
        load_trace(path)


def test_workload_modes() -> None:
    isl, osl = parse_length("100"), parse_length("10")
    poisson = make_workload(isl=isl, osl=osl, rate=5.0, requests=50, seed=1)
    specs = list(poisson.requests)
    assert len(specs) == 50
    assert poisson.concurrency is None
    assert all(s.arrival_s is not None for s in specs)
    closed = make_workload(isl=isl, osl=osl, concurrency=4, requests=30)
    assert closed.concurrency == 4
    assert closed.total == 30
    assert all(s.arrival_s is None for s in closed.requests)
    endless = make_workload(isl=isl, osl=osl, concurrency=2, duration=60.0)
    assert endless.stop_after_s == 60.0
    assert endless.total is None
    it = iter(endless.requests)
    assert [next(it).prompt_tokens for _ in range(1000)] == [100] * 1000


def test_trace_workloads_keep_or_replace_the_trace_arrivals() -> None:
    trace = [RequestSpec(10 + i, 5, float(i), (i,)) for i in range(10)]
    own = make_workload(trace=trace, duration=4.5)
    assert [s.arrival_s for s in own.requests] == [0.0, 1.0, 2.0, 3.0, 4.0]
    capped = make_workload(trace=trace, requests=3)
    assert [s.prompt_tokens for s in capped.requests] == [10, 11, 12]
    closed = make_workload(trace=trace, concurrency=2, requests=12)
    lengths = [s.prompt_tokens for s in closed.requests]
    assert lengths == [10 + i % 10 for i in range(12)]  # cycled, hashes kept
    poisson = list(make_workload(trace=trace, rate=100.0, requests=5).requests)
    assert [s.block_hashes for s in poisson] == [(i,) for i in range(5)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"concurrency": 2, "rate": 1.0}, "not both"),
        ({}, "give a load"),
        ({"concurrency": 0}, "at least 1"),
        ({"concurrency": 1, "duration": -1.0}, "positive"),
    ],
)
def test_workload_errors(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        make_workload(isl=parse_length("1"), osl=parse_length("1"), **kwargs)  # type: ignore[arg-type]


def test_synthetic_workload_needs_lengths_and_a_trace_refuses_them() -> None:
    with pytest.raises(WorkloadError, match="--isl"):
        make_workload(concurrency=1)
    with pytest.raises(WorkloadError, match="drop --isl"):
        make_workload(isl=parse_length("5"), trace=[RequestSpec(1, 1)], concurrency=1)
