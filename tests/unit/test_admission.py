"""Admission control (gateway/admission.py): bounded in-flight work, a bounded FIFO queue, 429."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.admission import Limiter
from gateway.errors import Overloaded
from tests.unit.conftest import RunVirtual


async def _settle() -> None:
    """Let every task that is ready run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


async def _hold(limiter: Limiter, order: list[str], name: str, gate: asyncio.Event) -> None:
    async with limiter:
        order.append(name)
        await gate.wait()


async def test_admits_up_to_max_active_without_waiting() -> None:
    limiter = Limiter("pool", max_active=3, max_queue=0)
    for expected in (1, 2, 3):
        await limiter.acquire()
        assert limiter.active == expected
    assert limiter.queued == 0
    for expected in (2, 1, 0):
        limiter.release()
        assert limiter.active == expected


async def test_unlimited_limiter_never_queues_or_refuses() -> None:
    limiter = Limiter("gateway", max_active=None)
    for _ in range(1000):
        await limiter.acquire()
    assert (limiter.active, limiter.queued) == (1000, 0)
    for _ in range(1000):
        limiter.release()
    assert limiter.active == 0


async def test_refuses_beyond_queue_with_overloaded() -> None:
    limiter = Limiter("decode", max_active=1, max_queue=2, retry_after_s=2.5)
    gate = asyncio.Event()
    order: list[str] = []
    tasks = [asyncio.create_task(_hold(limiter, order, f"t{i}", gate)) for i in range(3)]
    await _settle()
    assert (limiter.active, limiter.queued) == (1, 2)

    with pytest.raises(Overloaded) as info:
        await limiter.acquire()
    exc = info.value
    assert exc.status == 429
    assert exc.type == "rate_limit_error"
    assert exc.reason == "decode_full"
    assert exc.retry_after_s == 2.5
    assert exc.headers() == {"Retry-After": "3"}  # ceil(2.5)
    assert "1 in flight" in exc.message
    assert "2 queued" in exc.message
    # A refusal takes nothing.
    assert (limiter.active, limiter.queued) == (1, 2)

    gate.set()
    await asyncio.gather(*tasks)
    assert order == ["t0", "t1", "t2"]
    assert (limiter.active, limiter.queued) == (0, 0)


@pytest.mark.parametrize(("retry_after_s", "header"), [(0.2, "1"), (1.0, "1"), (1.01, "2")])
def test_retry_after_header_is_whole_seconds_at_least_one(
    retry_after_s: float, header: str
) -> None:
    exc = Overloaded("busy", retry_after_s=retry_after_s, reason="x")
    assert exc.headers() == {"Retry-After": header}


async def test_queue_is_fifo_and_release_hands_the_slot_over() -> None:
    limiter = Limiter("pool", max_active=1, max_queue=10)
    await limiter.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await limiter.acquire()
        order.append(i)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(waiter(i)))
        await _settle()  # arrival order is creation order
    assert (limiter.active, limiter.queued) == (1, 5)

    for i in range(5):
        limiter.release()
        # The slot moved to the oldest waiter: still one active, one fewer queued.
        assert (limiter.active, limiter.queued) == (1, 4 - i)
        await _settle()
        assert order == list(range(i + 1))
    limiter.release()
    assert (limiter.active, limiter.queued) == (0, 0)
    await asyncio.gather(*tasks)


async def test_newcomer_does_not_jump_the_queue() -> None:
    limiter = Limiter("pool", max_active=1, max_queue=1)
    await limiter.acquire()
    queued = asyncio.create_task(limiter.acquire())
    await _settle()
    limiter.release()  # the slot is handed to ``queued``; it has not run yet
    # A newcomer arriving now must not take the slot: there is none free, and the queue is
    # empty again, so it queues behind.
    newcomer = asyncio.create_task(limiter.acquire())
    await _settle()
    assert queued.done()
    assert not newcomer.done()
    assert (limiter.active, limiter.queued) == (1, 1)
    limiter.release()
    await newcomer
    limiter.release()
    assert (limiter.active, limiter.queued) == (0, 0)


async def test_cancelled_waiter_leaves_queue_at_once_and_leaks_nothing() -> None:
    limiter = Limiter("pool", max_active=1, max_queue=2)
    await limiter.acquire()
    first = asyncio.create_task(limiter.acquire())
    second = asyncio.create_task(limiter.acquire())
    await _settle()
    assert limiter.queued == 2

    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert limiter.queued == 1  # gone from the queue before anyone released anything
    assert limiter.active == 1
    # Its place is free again: a new waiter fits in the queue.
    third = asyncio.create_task(limiter.acquire())
    await _settle()
    assert limiter.queued == 2

    limiter.release()  # to ``second``, not to the cancelled one
    await second
    assert (limiter.active, limiter.queued) == (1, 1)
    limiter.release()
    await third
    limiter.release()
    assert (limiter.active, limiter.queued) == (0, 0)


async def test_waiter_cut_by_timeout_leaves_queue() -> None:
    limiter = Limiter("gateway", max_active=1, max_queue=1)
    await limiter.acquire()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await limiter.acquire()
    assert (limiter.active, limiter.queued) == (1, 0)
    limiter.release()
    assert limiter.active == 0


async def test_granted_then_cancelled_passes_the_slot_on() -> None:
    limiter = Limiter("pool", max_active=1, max_queue=2)
    await limiter.acquire()
    granted = asyncio.create_task(limiter.acquire())
    behind = asyncio.create_task(limiter.acquire())
    await _settle()
    limiter.release()  # the slot goes to ``granted``...
    granted.cancel()  # ...which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await granted
    await behind  # the slot moved on instead of leaking
    assert (limiter.active, limiter.queued) == (1, 0)
    limiter.release()
    assert limiter.active == 0


async def test_cancel_then_release_in_the_same_tick() -> None:
    limiter = Limiter("pool", max_active=1, max_queue=1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await _settle()
    waiter.cancel()  # e.g. its deadline fires...
    limiter.release()  # ...in the same loop iteration as the holder finishing
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (limiter.active, limiter.queued) == (0, 0)


# -- random schedules -------------------------------------------------------------------------

Op = tuple[str, int]


async def _run_schedule(max_active: int, max_queue: int, ops: list[Op]) -> None:
    """Drive a limiter through a schedule of acquire/cancel/release, checking invariants."""
    limiter = Limiter("pool", max_active=max_active, max_queue=max_queue)
    holders: list[asyncio.Event] = []  # one per task that holds or waits for a slot
    tasks: list[asyncio.Task[None]] = []
    refused = 0
    peak = 0

    async def user(done: asyncio.Event) -> None:
        nonlocal refused, peak
        try:
            async with limiter:
                peak = max(peak, limiter.active)
                await done.wait()
        except Overloaded:
            refused += 1

    def check() -> None:
        assert 0 <= limiter.active <= max_active
        assert 0 <= limiter.queued <= max_queue

    for op, pick in ops:
        live = [(t, e) for t, e in zip(tasks, holders, strict=True) if not t.done()]
        if op == "acquire":
            done = asyncio.Event()
            holders.append(done)
            tasks.append(asyncio.create_task(user(done)))
        elif op == "release" and live:
            live[pick % len(live)][1].set()
        elif op == "cancel" and live:
            live[pick % len(live)][0].cancel()
        await _settle()
        check()

    for done in holders:
        done.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert peak <= max_active
    assert (limiter.active, limiter.queued) == (0, 0)
    # Whatever was refused was refused only while the limiter was full.
    assert refused <= len(tasks)


op_strategy = st.tuples(st.sampled_from(["acquire", "acquire", "release", "cancel"]), st.integers())


@settings(max_examples=150, database=None, deadline=None)
@given(
    max_active=st.integers(1, 4),
    max_queue=st.integers(0, 4),
    ops=st.lists(op_strategy, max_size=40),
)
def test_random_schedules_never_exceed_max_active(
    max_active: int, max_queue: int, ops: list[Op]
) -> None:
    asyncio.run(_run_schedule(max_active, max_queue, ops))


def test_seeded_concurrent_churn_returns_to_zero(run_virtual: RunVirtual) -> None:
    """Many tasks acquiring, holding for random times and being cancelled at random (in
    virtual time, so the schedule is the same on every machine)."""
    run_virtual(_churn)


async def _churn() -> None:
    rng = random.Random(1234)
    limiter = Limiter("pool", max_active=3, max_queue=5)
    peak = 0
    outcomes = {"ok": 0, "refused": 0, "cancelled": 0}

    async def user(hold_s: float) -> None:
        nonlocal peak
        try:
            async with limiter:
                peak = max(peak, limiter.active)
                assert limiter.active <= 3
                await asyncio.sleep(hold_s)
            outcomes["ok"] += 1
        except Overloaded:
            outcomes["refused"] += 1
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
            raise

    tasks = []
    for _ in range(200):
        tasks.append(asyncio.create_task(user(rng.uniform(0, 0.002))))
        if rng.random() < 0.3:
            rng.choice(tasks).cancel()
        if rng.random() < 0.5:
            await asyncio.sleep(rng.uniform(0, 0.001))
        assert limiter.active <= 3
        assert limiter.queued <= 5
    await asyncio.gather(*tasks, return_exceptions=True)
    assert peak == 3
    assert outcomes["ok"] > 0
    assert outcomes["refused"] > 0
    assert sum(outcomes.values()) == 200
    assert (limiter.active, limiter.queued) == (0, 0)
