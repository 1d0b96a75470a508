"""Admission control: bounded in-flight work and bounded queues, failing fast beyond them.

A :class:`Limiter` admits up to ``max_active`` holders at once and queues up to ``max_queue``
more (first come, first served); anything beyond that is refused at once with
:class:`~gateway.errors.Overloaded` (429 with ``Retry-After``). A queued caller that is cancelled
— its client disconnected, its deadline passed — leaves the queue immediately.

The gateway keeps one limiter for everything and one per pool; a request holds the global slot
for its whole life and each leg holds its pool's slot while it runs.

Example::

    limiter = Limiter("global", max_active=512, max_queue=1024, retry_after_s=1.0)
    async with limiter:
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from types import TracebackType

from gateway.errors import Overloaded


class Limiter:
    """At most ``max_active`` concurrent holders; at most ``max_queue`` waiting for a turn."""

    def __init__(
        self, name: str, *, max_active: int | None, max_queue: int = 0, retry_after_s: float = 1.0
    ) -> None:
        self.name = name
        self.max_active = max_active
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def __aenter__(self) -> None:
        if self.max_active is None or (self.active < self.max_active and not self._waiters):
            self.active += 1  # (acquire's fast path, without a second coroutine)
            return
        await self.acquire()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    async def acquire(self) -> None:
        if self.max_active is None or (self.active < self.max_active and not self._waiters):
            self.active += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise self._refusal()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # release() hands its slot over: ``active`` already counts us
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted and cancelled in the same breath: pass it on
            else:
                # release() may already have dropped this cancelled waiter from the queue.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; active is unchanged
                return
        self.active -= 1

    def _refusal(self) -> Overloaded:
        return Overloaded(
            f"{self.name} is at capacity ({self.active} in flight, {self.queued} queued)",
            retry_after_s=self.retry_after_s,
            reason=f"{self.name}_full",
        )
