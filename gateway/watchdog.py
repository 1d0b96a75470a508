"""A stream's idle timeout with one timer for the whole stream, not one per chunk.

``asyncio.timeout`` around every chunk's wait schedules and cancels a timer per token; on a
256-token stream that was about 8 % of the gateway's CPU. :class:`IdleTimeout` keeps a single
timer per stream and moves it lazily: each wait only records when it began, and the timer,
when it fires, either finds the current wait overdue and cancels the task, or re-arms itself
for that wait's own limit (a wait with a shorter limit than the timer's moves it earlier).
Between waits (while the consumer holds a chunk) nothing is timed.

Example::

    async with IdleTimeout() as idle:
        while True:
            idle.waiting(limit_s)
            try:
                chunk = await anext(stream)
            except asyncio.CancelledError:
                if idle.expired():
                    raise LegFailed("stalled") from None
                raise
            finally:
                idle.done()
            ...

A wait that outlasts its limit while ``busy(limit)`` says the worker behind the stream is still
producing for others is not failed: the timer re-arms for another ``limit`` (a queued request on
a busy worker waits; a stalled worker's does not).

Cancellation follows ``asyncio.timeout``: the task is cancelled, and :meth:`expired` takes
that request back (``Task.uncancel``) only when it was the timeout's alone, so a client
disconnect or an outer deadline arriving at the same moment still cancels the task.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from types import TracebackType
from typing import Any


class IdleTimeout:
    """Fails a wait that lasts longer than its limit (see the module docstring); the waits
    are those of the task that created it."""

    def __init__(self, busy: Callable[[float], bool] | None = None) -> None:
        self._busy = busy  # busy(limit_s): the worker produced something within limit_s
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(self._loop)
        assert task is not None, "IdleTimeout outside a task"
        self._task: asyncio.Task[Any] = task  # the task whose waits it times
        self._since: float | None = None  # when the current wait began; None between waits
        self._limit = 0.0
        self._cancelling = 0  # the task's pending cancellations when the wait began
        self._handle: asyncio.TimerHandle | None = None
        self._fired = False

    async def __aenter__(self) -> IdleTimeout:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop timing (what leaving the ``async with`` block does)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._since = None

    def waiting(self, limit_s: float) -> None:
        """A wait of at most ``limit_s`` begins now."""
        self._limit = limit_s
        self._cancelling = self._task.cancelling()
        self._since = now = self._loop.time()
        if limit_s == math.inf:
            return  # never due: no timer (one armed for an earlier limit stops at its check)
        due = now + limit_s
        if self._handle is not None and self._handle.when() > due:  # a shorter limit than before
            self._handle.cancel()
            self._handle = None
        if self._handle is None:
            self._handle = self._loop.call_at(due, self._check)

    def done(self) -> None:
        """The wait is over (a chunk came, the stream ended, or the wait failed)."""
        self._since = None

    def expired(self) -> bool:
        """Whether the timeout cancelled the current wait; if so, the cancellation is taken
        back and the caller raises its own error instead."""
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() <= self._cancelling

    def _check(self) -> None:
        self._handle = None
        if self._since is None:
            return  # between waits; the next wait arms the timer again
        due = self._since + self._limit
        if due == math.inf:
            return
        now = self._loop.time()
        if now < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        if self._busy is not None and self._busy(self._limit):
            self._handle = self._loop.call_at(now + self._limit, self._check)
            return
        self._fired = True
        self._task.cancel()
