"""LoopClock: full resolution on a real loop (uvloop's own clock counts whole milliseconds),
the loop's own time on a virtual one."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import uvloop

from backends.clock import LoopClock, close_loop, virtual_event_loop


def _readings(clock: LoopClock, count: int = 50) -> list[float]:
    out = []
    for _ in range(count):
        until = time.perf_counter() + 37e-6
        while time.perf_counter() < until:
            pass
        out.append(clock.now())
    return out


def _whole_ms(t: float) -> bool:
    return abs(t * 1000 - round(t * 1000)) < 1e-6


def test_uvloop_time_counts_whole_milliseconds_but_the_clock_does_not() -> None:
    async def main() -> tuple[list[float], list[float], float, float]:
        loop = asyncio.get_running_loop()
        looptimes = []
        for _ in range(20):
            looptimes.append(loop.time())
            until = time.perf_counter() + 37e-6
            while time.perf_counter() < until:
                pass
        before = loop.time()
        readings = _readings(LoopClock())
        return looptimes, readings, before, loop.time()

    looptimes, readings, before, after = uvloop.run(main())
    assert all(_whole_ms(t) for t in looptimes)  # why LoopClock does not read it
    assert not all(_whole_ms(t) for t in readings)
    assert readings == sorted(readings)
    # The same clock as the loop's: within the loop's millisecond truncation.
    assert before <= readings[0] < after + 0.001
    assert readings[-1] < after + 0.001


def test_asyncio_loop_reads_the_same_monotonic_clock() -> None:
    async def main() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        return loop.time(), LoopClock().now(), loop.time()

    before, now, after = asyncio.run(main())
    assert before <= now <= after


def test_virtual_loop_keeps_its_own_time() -> None:
    loop = virtual_event_loop()
    clock = LoopClock()

    async def main() -> tuple[float, float]:
        start = clock.now()
        await clock.sleep(3600.0)
        return start, clock.now()

    try:
        start, end = loop.run_until_complete(main())
    finally:
        close_loop(loop)
    assert end - start == 3600.0


def test_sleep_until_never_wakes_before_its_deadline_under_uvloop() -> None:
    """uvloop rounds timers to the nearest millisecond: about a third of plain sleeps of
    0.1–3 ms end up to 1 ms early."""

    async def main() -> list[float]:
        clock = LoopClock()
        rng = random.Random(7)
        errors = []
        for _ in range(100):
            deadline = clock.now() + rng.uniform(0.0001, 0.003)
            await clock.sleep_until(deadline)
            errors.append(clock.now() - deadline)
        return errors

    errors = uvloop.run(main())
    assert min(errors) >= -1e-6


def test_a_clock_bound_to_a_virtual_loop_reads_and_waits_on_it() -> None:
    loop = virtual_event_loop()
    clock = LoopClock(loop)
    woke: list[float] = []

    async def sleeper(deadline: float) -> None:
        await clock.sleep_until(deadline)
        woke.append(clock.now())

    async def main() -> tuple[float, float]:
        await asyncio.gather(sleeper(2.5), sleeper(0.75), sleeper(0.0))
        await clock.sleep(10.0)
        return loop.time(), clock.now()

    try:
        loop_time, now = loop.run_until_complete(main())
    finally:
        close_loop(loop)
    assert woke == [0.0, 0.75, 2.5]
    assert now == loop_time == 12.5


def test_a_virtual_loop_still_runs_callbacks_from_other_threads() -> None:
    """The selector skips polling while only the loop's wake-up pipe is registered; a
    thread's ``call_soon_threadsafe`` callback must still run."""
    loop = virtual_event_loop()

    async def main() -> int:
        return await loop.run_in_executor(None, lambda: 41 + 1)

    async def ticking() -> int:
        task = asyncio.ensure_future(main())
        while not task.done():  # noqa: ASYNC110 -- timers stay pending, as in an engine
            await asyncio.sleep(0.001)
        return task.result()

    try:
        assert loop.run_until_complete(ticking()) == 42
    finally:
        close_loop(loop)


def test_a_bound_clock_is_unbound_on_a_real_loop() -> None:
    async def main() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        clock = LoopClock(loop)
        return loop.time(), clock.now(), loop.time()

    before, now, after = asyncio.run(main())
    assert before <= now <= after


def test_virtual_loop_timers_run_in_time_order_then_in_the_order_they_were_set() -> None:
    loop = virtual_event_loop()
    ran: list[tuple[float, str]] = []
    try:
        for name, when in (("c", 2.0), ("a", 1.0), ("b", 1.0), ("d", 1.5), ("e", 1.0)):
            loop.call_at(when, lambda n=name: ran.append((loop.time(), n)))
        dropped = loop.call_at(1.2, lambda: ran.append((loop.time(), "cancelled")))
        dropped.cancel()
        loop.call_later(3.0, loop.stop)
        loop.run_forever()
    finally:
        close_loop(loop)
    assert ran == [(1.0, "a"), (1.0, "b"), (1.0, "e"), (1.5, "d"), (2.0, "c")]


def test_virtual_loop_sheds_many_cancelled_timers() -> None:
    """Timers set and cancelled by the thousand (per-leg timeouts that never fire) do not
    pile up in the queue, and the clock never stops at them."""

    async def main() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        for i in range(5000):
            loop.call_at(1000.0 + i, lambda: None).cancel()
            await asyncio.sleep(0.001)
        return len(loop._timers), loop.time()  # type: ignore[attr-defined]

    loop = virtual_event_loop()
    try:
        left, now = loop.run_until_complete(main())
    finally:
        close_loop(loop)
    assert left < 300
    assert now == pytest.approx(5.0)


def _callback_order(loop: asyncio.AbstractEventLoop) -> list[str]:
    """The order in which a mix of callbacks, callback chains, timers due at once and task
    wake-ups runs on ``loop``."""
    out: list[str] = []

    def chain(name: str, depth: int) -> None:
        out.append(f"{name}{depth}")
        if depth:
            loop.call_soon(chain, name, depth - 1)

    def fire(fut: asyncio.Future[None], name: str) -> None:
        out.append(f"fire-{name}")
        fut.set_result(None)
        loop.call_at(loop.time(), out.append, f"due-{name}")  # due now: runs next pass
        loop.call_soon(chain, f"after-{name}-", 1)

    async def waiter(name: str, fut: asyncio.Future[None]) -> None:
        out.append(f"wait-{name}")
        await fut
        out.append(f"woke-{name}")
        loop.call_soon(chain, f"from-{name}-", 2)

    async def main() -> None:
        f1, f2 = loop.create_future(), loop.create_future()
        tasks = [loop.create_task(waiter("a", f1)), loop.create_task(waiter("b", f2))]
        loop.call_soon(chain, "x", 3)
        loop.call_soon(fire, f1, "1")
        loop.call_soon(chain, "y", 2)
        await asyncio.sleep(0)
        out.append("main")
        loop.call_soon(fire, f2, "2")
        await asyncio.gather(*tasks)
        for _ in range(4):
            await asyncio.sleep(0)
        out.append("end")

    try:
        loop.run_until_complete(main())
    finally:
        close_loop(loop)
    return out


def test_a_virtual_loop_runs_callbacks_in_asyncios_order() -> None:
    """A virtual loop runs, in one pass, the callbacks that asyncio's next passes would run
    (no time to advance, no timer due): the order must stay asyncio's."""
    virtual = _callback_order(virtual_event_loop())
    real = _callback_order(asyncio.SelectorEventLoop())
    assert len(virtual) > 20
    assert virtual == real
