"""IdleTimeout: fails a wait past its limit, never times the consumer, and never swallows a
cancellation that was not its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.watchdog import IdleTimeout


class Stalled(Exception):
    pass


async def ticks(gaps: list[float]) -> AsyncIterator[int]:
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield i


async def drain(gaps: list[float], limits: list[float], hold_s: float = 0.0) -> list[int]:
    """Consume ``ticks(gaps)``; wait ``limits[i]`` at most for item i; hold each item."""
    got: list[int] = []
    stream = ticks(gaps)
    async with IdleTimeout() as idle:
        for limit in limits:
            idle.waiting(limit)
            try:
                item = await anext(stream)
            except StopAsyncIteration:
                break
            except asyncio.CancelledError:
                if idle.expired():
                    raise Stalled(len(got)) from None
                raise
            finally:
                idle.done()
            got.append(item)
            await asyncio.sleep(hold_s)  # the consumer holds the item: not timed
    return got


async def test_waits_within_their_limits_pass() -> None:
    assert await drain([0.01, 0.01, 0.01], [0.2, 0.2, 0.2]) == [0, 1, 2]


async def test_a_stalled_wait_fails_at_its_limit() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Stalled) as failed:
        await drain([0.0, 0.0, 5.0], [1.0, 1.0, 0.1])
    assert failed.value.args == (2,)
    assert 0.1 <= loop.time() - started < 1.0


async def test_a_shorter_limit_moves_the_timer_earlier() -> None:
    """The first wait arms the timer for 5 s; the next, limited to 0.1 s, must not wait 5 s."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Stalled):
        await drain([0.0, 3.0], [5.0, 0.1])
    assert loop.time() - started < 1.0


async def test_time_the_consumer_holds_an_item_is_not_counted() -> None:
    """Each wait is short, but the consumer holds every item longer than the limit."""
    assert await drain([0.02, 0.02, 0.02], [0.1, 0.1, 0.1], hold_s=0.15) == [0, 1, 2]


async def test_an_outside_cancellation_is_never_taken_as_a_timeout() -> None:
    task = asyncio.ensure_future(drain([0.0, 5.0], [10.0, 10.0]))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_nothing_fires_after_the_block() -> None:
    async with IdleTimeout() as idle:
        idle.waiting(0.05)  # left without done(): the block's end must disarm it
    await asyncio.sleep(0.15)  # a timer that outlived the block would cancel this
