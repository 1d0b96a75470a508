"""Per-worker circuit breaker (gateway/circuit.py) on a hand-driven clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.circuit import CircuitBreaker, CircuitState


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline: float) -> None:
        self.t = max(self.t, deadline)

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        self.t += seconds


def breaker(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, ManualClock]:
    clock = ManualClock()
    return CircuitBreaker(clock, failure_threshold=threshold, cooldown_s=cooldown), clock


def leg(b: CircuitBreaker, *, ok: bool) -> None:
    assert b.available()
    b.begin()
    b.record(ok=ok)


def test_starts_closed_and_available() -> None:
    b, _ = breaker()
    assert b.state is CircuitState.CLOSED
    assert b.available()
    for _ in range(10):
        leg(b, ok=True)
    assert b.state is CircuitState.CLOSED
    assert b.failures == 0


def test_opens_after_threshold_consecutive_failures() -> None:
    b, _ = breaker(threshold=3)
    leg(b, ok=False)
    leg(b, ok=False)
    assert b.state is CircuitState.CLOSED
    assert b.available()
    leg(b, ok=False)
    assert b.state is CircuitState.OPEN
    assert int(b.state) == 2  # the gauge's value
    assert not b.available()


def test_success_resets_the_failure_count() -> None:
    b, _ = breaker(threshold=3)
    for _ in range(5):
        leg(b, ok=False)
        leg(b, ok=False)
        leg(b, ok=True)
        assert b.failures == 0
        assert b.state is CircuitState.CLOSED
    leg(b, ok=False)
    leg(b, ok=False)
    leg(b, ok=False)
    assert b.state is CircuitState.OPEN


def test_unavailable_for_the_whole_cooldown() -> None:
    b, clock = breaker(threshold=1, cooldown=10.0)
    leg(b, ok=False)
    for _ in range(9):
        clock.advance(1.0)
        assert b.state is CircuitState.OPEN
        assert not b.available()
    clock.advance(0.999)
    assert not b.available()
    clock.advance(0.001)
    assert b.state is CircuitState.HALF_OPEN
    assert int(b.state) == 1
    assert b.available()


def test_half_open_lets_exactly_one_probe_through() -> None:
    b, clock = breaker(threshold=2, cooldown=5.0)
    leg(b, ok=False)
    leg(b, ok=False)
    clock.advance(5.0)
    assert b.available()
    b.begin()  # the probe
    assert b.state is CircuitState.HALF_OPEN
    assert not b.available(), "a second leg must wait for the probe's verdict"
    clock.advance(100.0)  # however long the probe takes
    assert not b.available()


def test_probe_success_closes() -> None:
    b, clock = breaker(threshold=2, cooldown=5.0)
    leg(b, ok=False)
    leg(b, ok=False)
    clock.advance(5.0)
    b.begin()
    b.record(ok=True)
    assert b.state is CircuitState.CLOSED
    assert b.failures == 0
    assert b.available()
    # Closed again means the full threshold is needed to reopen.
    leg(b, ok=False)
    assert b.state is CircuitState.CLOSED


def test_probe_failure_reopens_and_restarts_cooldown() -> None:
    b, clock = breaker(threshold=2, cooldown=5.0)
    leg(b, ok=False)
    leg(b, ok=False)
    clock.advance(7.0)  # well past the first cooldown
    b.begin()
    clock.advance(1.0)
    b.record(ok=False)
    assert b.state is CircuitState.OPEN
    assert not b.available()
    # The cooldown counts from the failed probe, not from the first opening.
    clock.advance(4.999)
    assert b.state is CircuitState.OPEN
    clock.advance(0.001)
    assert b.state is CircuitState.HALF_OPEN
    assert b.available()


def test_one_failure_is_enough_to_reopen_after_the_probe_fails() -> None:
    b, clock = breaker(threshold=3, cooldown=1.0)
    for _ in range(3):
        leg(b, ok=False)
    clock.advance(1.0)
    leg(b, ok=False)  # the probe: a single failure reopens, the threshold is not needed again
    assert b.state is CircuitState.OPEN


def test_abandon_frees_the_probe_slot() -> None:
    b, clock = breaker(threshold=1, cooldown=2.0)
    leg(b, ok=False)
    clock.advance(2.0)
    b.begin()
    assert not b.available()
    b.abandon()  # the probe was cancelled: no verdict
    assert b.state is CircuitState.HALF_OPEN
    assert b.available()
    b.begin()
    b.record(ok=True)
    assert b.state is CircuitState.CLOSED


def test_abandon_gives_no_verdict() -> None:
    b, _ = breaker(threshold=2)
    leg(b, ok=False)
    for _ in range(5):
        b.begin()
        b.abandon()
    assert b.failures == 1
    assert b.state is CircuitState.CLOSED
    leg(b, ok=False)
    assert b.state is CircuitState.OPEN


@pytest.mark.parametrize("threshold", [1, 2, 5])
def test_threshold_is_exact(threshold: int) -> None:
    b, _ = breaker(threshold=threshold)
    for _ in range(threshold - 1):
        leg(b, ok=False)
    assert b.available()
    leg(b, ok=False)
    assert not b.available()


@settings(max_examples=200, database=None, deadline=None)
@given(
    threshold=st.integers(1, 4),
    events=st.lists(st.sampled_from(["ok", "fail", "abandon", "tick"]), max_size=60),
)
def test_matches_a_reference_model(threshold: int, events: list[str]) -> None:
    """Random outcomes and clock ticks agree with a straightforward model of the state machine."""
    cooldown = 3.0
    b, clock = breaker(threshold=threshold, cooldown=cooldown)
    failures, opened_at, probing = 0, None, False

    def model_state() -> CircuitState:
        if opened_at is None:
            return CircuitState.CLOSED
        return CircuitState.HALF_OPEN if clock.t - opened_at >= cooldown else CircuitState.OPEN

    for event in events:
        if event == "tick":
            clock.advance(1.0)
        else:
            state = model_state()
            available = state is CircuitState.CLOSED or (
                state is CircuitState.HALF_OPEN and not probing
            )
            assert b.available() == available
            if not available:
                continue
            b.begin()
            probing = state is CircuitState.HALF_OPEN
            if event == "abandon":
                b.abandon()
                probing = False
            elif event == "ok":
                b.record(ok=True)
                failures, opened_at, probing = 0, None, False
            else:
                b.record(ok=False)
                failures += 1
                probing = False
                if opened_at is not None or failures >= threshold:
                    opened_at = clock.t
        assert b.state is model_state()
        assert b.failures == failures
