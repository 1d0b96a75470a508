"""c1 in turns (``loadtests.bench_gateway.take_turns``): rotation and paired differences."""

from __future__ import annotations

import asyncio

import pytest

from loadtests.bench_gateway import Sample, Send, Turns, take_turns


def _sender(name: str, order: list[str], latency_s: list[float]) -> Send:
    async def send(i: int) -> Sample:
        order.append(name)
        return Sample(latency_s[i], latency_s[i], 16)

    return send


def test_turns_rotate_and_skip_the_warm_up() -> None:
    order: list[str] = []
    slow = [1.0] * 2 + [0.010, 0.004, 0.006]  # the machine's speed drifts from round to round
    fast = [1.0] * 2 + [0.008, 0.003, 0.0055]
    senders = {
        "a": _sender("a", order, slow),
        "b": _sender("b", order, fast),
        "c": _sender("c", order, fast),
    }
    turns = asyncio.run(take_turns(senders, rounds=3, warmup=2))
    # Each round starts one target later: nobody always follows the same one.
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a"]
    assert turns.latencies_ms["a"] == pytest.approx([10.0, 4.0, 6.0])
    assert turns.latencies_ms["b"] == pytest.approx([8.0, 3.0, 5.5])
    # Paired: the median of (2, 1, 0.5), not the difference of the medians (6 − 5.5).
    assert turns.added_ms("a", "b") == pytest.approx(1.0)
    assert turns.p50("a") == pytest.approx(6.0)


def test_report_names_every_target_and_the_added_latency() -> None:
    turns = Turns({"direct-pd": [4.0, 5.0], "pdgate": [4.5, 5.7]})
    lines = turns.report("direct-pd")
    assert lines[0] == "c1 in turns (2 rounds), p50 ms: direct-pd 5.00, pdgate 5.70"  # nearest rank
    assert lines[1].endswith("pdgate +0.60 ms")
