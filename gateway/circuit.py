"""Per-worker circuit breaker: stop sending work to a worker that keeps failing.

::

    closed ──(failure_threshold consecutive failures)──▶ open
    open ──(cooldown_s elapsed)──▶ half_open: exactly one probe request is let through
    half_open ──probe succeeds──▶ closed        half_open ──probe fails──▶ open (cooldown again)

Example::

    breaker = CircuitBreaker(LoopClock(), failure_threshold=5, cooldown_s=10.0)
    if breaker.available():
        breaker.begin()
        ...                      # run the leg
        breaker.record(ok=True)
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

from backends.clock import Clock


class CircuitState(IntEnum):
    """Exported as a gauge: 0 closed, 1 half-open, 2 open."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        clock: Clock,
        *,
        failure_threshold: int,
        cooldown_s: float,
        on_open: Callable[[float], None] | None = None,
        opened_elsewhere: Callable[[], bool] | None = None,
    ) -> None:
        """``on_open(cooldown_s)`` tells other replicas; ``opened_elsewhere()`` asks them."""
        self._clock = clock
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._on_open = on_open
        self._opened_elsewhere = opened_elsewhere
        self.failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> CircuitState:
        if self._opened_elsewhere is not None and self._opened_elsewhere():
            return CircuitState.OPEN
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock.now() - self._opened_at >= self.cooldown_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def available(self) -> bool:
        """May a new leg be sent now?"""
        if self._opened_at is None and self._opened_elsewhere is None:
            return True  # closed, the common case, without building the state
        state = self.state
        return state is CircuitState.CLOSED or (
            state is CircuitState.HALF_OPEN and not self._probing
        )

    def begin(self) -> None:
        """A leg was sent; in half-open state it is the probe."""
        if self._opened_at is not None and self.state is CircuitState.HALF_OPEN:
            self._probing = True

    def abandon(self) -> None:
        """The leg ended without a verdict (cancelled): let another probe through."""
        self._probing = False

    def record(self, *, ok: bool) -> None:
        self._probing = False
        if ok:
            self.failures = 0
            self._opened_at = None
            return
        self.failures += 1
        if self._opened_at is not None or self.failures >= self.failure_threshold:
            self._opened_at = self._clock.now()  # (re)open: a failed probe restarts the cooldown
            if self._on_open is not None:
                self._on_open(self.cooldown_s)
