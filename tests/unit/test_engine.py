"""The continuous-batching engine (backends/emulator/engine.py), driven in virtual time.

Every test runs on both of the engine's step drivers: its stepping task (any clock) and timer
callbacks (a clock bound to the virtual loop, as simulations use).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import replace
from typing import Any

import pytest

from backends.clock import LoopClock
from backends.emulator.catalog import Catalog, Deployment
from backends.emulator.engine import Engine, Sequence, StepTimer
from backends.emulator.timing import StepShape
from tests.unit.conftest import RunVirtual


class LinearTimer:
    """A StepTimer whose step time is ``base + per_token · new_tokens``; records every shape."""

    def __init__(
        self, kv_capacity_tokens: int = 1_000_000, base: float = 0.01, per_token: float = 1e-5
    ) -> None:
        self.kv_capacity_tokens = kv_capacity_tokens
        self.base = base
        self.per_token = per_token
        self.shapes: list[StepShape] = []

    def step_time(self, shape: StepShape) -> float:
        self.shapes.append(shape)
        return self.formula(shape)

    def formula(self, shape: StepShape) -> float:
        return self.base + self.per_token * shape.new_tokens


class Recording:
    """Wraps a real deployment and records the shapes the engine asks about."""

    def __init__(self, inner: Deployment) -> None:
        self.inner = inner
        self.kv_capacity_tokens = inner.kv_capacity_tokens
        self.shapes: list[StepShape] = []

    def step_time(self, shape: StepShape) -> float:
        self.shapes.append(shape)
        return self.inner.step_time(shape)


async def follow(seq: Sequence) -> list[tuple[float, int]]:
    """(virtual time, tokens generated so far) each time the sequence makes progress."""
    clock = LoopClock()
    events: list[tuple[float, int]] = []
    seen = seq.generated
    while not seq.finished:
        await seq.wait_beyond(seen)
        if seq.generated > seen:
            seen = seq.generated
            events.append((clock.now(), seen))
    return events


BOUND = {"clock": False}  # set per test by the ``driver`` fixture


@pytest.fixture(autouse=True, params=["task", "timer-callbacks"])
def driver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BOUND, "clock", request.param == "timer-callbacks")


def make_engine(timer: StepTimer, **kw: Any) -> Engine:
    clock = LoopClock(asyncio.get_running_loop()) if BOUND["clock"] else LoopClock()
    engine = Engine(timer, clock, **kw)
    engine.start()
    assert (engine._task is None) == BOUND["clock"]
    return engine


def blocks_for(tokens: int, block_size: int = 16) -> int:
    return math.ceil(tokens / block_size)


# -- timing of one request ----------------------------------------------------------------


def test_single_request_first_token_is_one_prefill_step_then_one_token_per_decode_step(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    dep = catalog.deployment("h100-sxm", "llama-3.1-8b")
    prompt, max_new = 1000, 6

    async def main() -> tuple[float, Sequence, list[tuple[float, int]]]:
        engine = make_engine(dep)
        t0 = LoopClock().now()
        seq = engine.submit(prompt, max_new)
        events = await follow(seq)
        await engine.stop()
        return t0, seq, events

    t0, seq, events = run_virtual(main)
    expected_first = t0 + dep.step_time(StepShape.of([(prompt, 0)]))
    assert seq.first_token_at == expected_first  # the engine's schedule is exact
    expected = [expected_first]
    for k in range(1, max_new):
        expected.append(expected[-1] + dep.step_time(StepShape.of([(1, prompt + k - 1)])))
    assert [n for _, n in events] == list(range(1, max_new + 1))
    assert [t for t, _ in events] == pytest.approx(expected, rel=1e-12, abs=1e-9)
    assert seq.finish_reason == "length"
    assert seq.generated == max_new


def test_chunked_prefill_spreads_a_long_prompt_over_several_steps(
    run_virtual: RunVirtual,
) -> None:
    timer = LinearTimer()
    budget, prompt = 256, 1000

    async def main() -> tuple[Sequence, Engine]:
        engine = make_engine(timer, max_num_batched_tokens=budget)
        seq = engine.submit(prompt, 2)
        await follow(seq)
        await engine.stop()
        return seq, engine

    seq, engine = run_virtual(main)
    chunks = []
    done = 0
    while done < prompt:
        n = min(budget, prompt - done)
        chunks.append(StepShape.of([(n, done)]))
        done += n
    assert len(chunks) == math.ceil(prompt / budget) == 4
    assert timer.shapes[: len(chunks)] == chunks
    assert seq.first_token_at == pytest.approx(sum(timer.formula(s) for s in chunks), rel=1e-12)
    assert engine.stats.steps == len(chunks) + 1  # plus one decode step for token 2
    assert engine.stats.prompt_tokens == prompt


# -- batching -----------------------------------------------------------------------------


def _makespan(run_virtual: RunVirtual, dep: Deployment, *, concurrent: bool) -> tuple[float, Any]:
    rec = Recording(dep)

    async def main() -> float:
        engine = make_engine(rec)
        if concurrent:
            a, b = engine.submit(500, 50), engine.submit(500, 50)
            await asyncio.gather(follow(a), follow(b))
        else:
            await follow(engine.submit(500, 50))
            await follow(engine.submit(500, 50))
        now = LoopClock().now()
        await engine.stop()
        return now

    return run_virtual(main), rec.shapes


def test_concurrent_requests_share_steps_and_finish_sooner_than_serially(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    dep = catalog.deployment("h100-sxm", "llama-3.1-8b")
    together, shapes = _makespan(run_virtual, dep, concurrent=True)
    serial, serial_shapes = _makespan(run_virtual, dep, concurrent=False)
    assert all(s.seqs == 2 for s in shapes)  # both prompts in step 1, then batch-2 decodes
    assert shapes[0].new_tokens == 1000
    assert len(shapes) == 50
    assert all(s.seqs == 1 for s in serial_shapes)
    assert len(serial_shapes) == 100
    # Small-batch decode is weight-bound: a batch of two costs barely more than one.
    assert together < 0.6 * serial


def test_max_num_seqs_bounds_the_running_batch(run_virtual: RunVirtual) -> None:
    timer = LinearTimer()

    async def main() -> tuple[list[Sequence], list[list[tuple[float, int]]], int]:
        engine = make_engine(timer, max_num_seqs=2)
        seqs = [engine.submit(10, 4) for _ in range(5)]
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(engine.running))
                await asyncio.sleep(0.001)

        watcher = asyncio.ensure_future(watch())
        events = await asyncio.gather(*(follow(s) for s in seqs))
        watcher.cancel()
        await engine.stop()
        return seqs, list(events), peak

    seqs, events, peak = run_virtual(main)
    assert peak == 2
    assert max(s.seqs for s in timer.shapes) == 2
    assert all(s.finish_reason == "length" and s.generated == 4 for s in seqs)
    finish = [ev[-1][0] for ev in events]
    # The third request is admitted in the step that follows the first two finishing.
    assert seqs[2].first_scheduled == pytest.approx(min(finish[0], finish[1]), abs=1e-9)
    assert seqs[2].first_scheduled > seqs[2].arrival
    assert seqs[4].first_scheduled >= min(finish[2], finish[3]) - 1e-9


# -- KV cache -----------------------------------------------------------------------------


def test_requests_queue_until_kv_blocks_free(run_virtual: RunVirtual) -> None:
    timer = LinearTimer(kv_capacity_tokens=160)  # 10 blocks of 16

    async def main() -> tuple[list[Sequence], list[list[tuple[float, int]]], Engine]:
        engine = make_engine(timer)
        assert engine.total_blocks == 10
        seqs = [engine.submit(60, 3) for _ in range(3)]  # 4 blocks each: only two fit
        events = await asyncio.gather(*(follow(s) for s in seqs))
        await engine.stop()
        return seqs, list(events), engine

    seqs, events, engine = run_virtual(main)
    assert timer.shapes[0].seqs == 2
    assert seqs[2].first_scheduled == pytest.approx(events[0][-1][0], abs=1e-9)
    assert engine.stats.preemptions == 0
    assert all(s.finish_reason == "length" for s in seqs)
    assert engine.free_blocks == engine.total_blocks


def test_decodes_outgrowing_the_cache_are_preempted_and_still_finish(
    run_virtual: RunVirtual,
) -> None:
    timer = LinearTimer(kv_capacity_tokens=160)
    prompts, max_new = [30, 30, 30, 30], 40

    async def main() -> tuple[list[Sequence], Engine, int]:
        engine = make_engine(timer)
        seqs = [engine.submit(p, max_new) for p in prompts]
        low = engine.free_blocks

        async def watch() -> None:
            nonlocal low
            while True:
                assert 0 <= engine.free_blocks <= engine.total_blocks
                low = min(low, engine.free_blocks)
                await asyncio.sleep(0.001)

        watcher = asyncio.ensure_future(watch())
        await asyncio.gather(*(follow(s) for s in seqs))
        watcher.cancel()
        await engine.stop()
        return seqs, engine, low

    seqs, engine, low = run_virtual(main)
    # Four sequences of 70 tokens need 4 × 5 blocks; the cache has 10.
    assert 4 * blocks_for(30 + max_new) > engine.total_blocks
    assert engine.stats.preemptions > 0
    assert low == 0
    assert all(s.finish_reason == "length" and s.generated == max_new for s in seqs)
    assert engine.stats.generation_tokens == len(prompts) * max_new
    assert engine.stats.prompt_tokens == sum(prompts)
    assert engine.free_blocks == engine.total_blocks


def test_prompt_tokens_counted_once_when_preempted_during_chunked_prefill(
    run_virtual: RunVirtual,
) -> None:
    timer = LinearTimer(kv_capacity_tokens=160)

    async def main() -> Engine:
        engine = make_engine(timer, max_num_batched_tokens=16)
        a = engine.submit(16, 60)
        await asyncio.sleep(0.001)
        b = engine.submit(130, 5)  # prefilled in 15-token chunks alongside a's decodes
        await asyncio.gather(follow(a), follow(b))
        assert engine.stats.preemptions > 0
        await engine.stop()
        return engine

    engine = run_virtual(main)
    assert engine.stats.prompt_tokens == 16 + 130


def test_lone_request_outgrowing_the_cache_ends_with_length(run_virtual: RunVirtual) -> None:
    capacity = 64  # 4 blocks of 16
    timer = LinearTimer(kv_capacity_tokens=capacity)

    async def main() -> Sequence:
        engine = make_engine(timer)
        seq = engine.submit(16, 100)  # 116 tokens can never fit; 17 can
        async with asyncio.timeout(3600):  # must not wait forever
            await follow(seq)
        assert engine.free_blocks == engine.total_blocks
        await engine.stop()
        return seq

    seq = run_virtual(main)
    assert seq.finish_reason == "length"
    # It ran until its KV (prompt + all tokens but the newest) filled the whole cache.
    assert seq.prompt + seq.generated - 1 == capacity


def test_prompt_that_cannot_fit_is_rejected_at_submit(run_virtual: RunVirtual) -> None:
    async def main() -> None:
        engine = make_engine(LinearTimer(kv_capacity_tokens=64))
        with pytest.raises(ValueError, match="needs 5 KV blocks; the instance has 4"):
            engine.submit(64, 2)
        await engine.stop()

    run_virtual(main)


# -- abort, hold, release -----------------------------------------------------------------


def test_abort_frees_blocks_immediately_from_waiting_running_and_held(
    run_virtual: RunVirtual,
) -> None:
    timer = LinearTimer()

    async def main() -> None:
        engine = make_engine(timer, max_num_seqs=1)
        held = engine.submit(100, 2, hold_after_prefill=True)
        await held.wait_beyond(0)
        assert held.state == "held"
        assert engine.used_blocks == blocks_for(100)

        running = engine.submit(200, 1000)
        waiting = engine.submit(50, 10)
        await running.wait_beyond(1)
        assert running.state == "running"
        assert waiting.state == "waiting"  # max_num_seqs=1: held does not count, running does
        assert engine.used_blocks == blocks_for(100) + running.blocks

        engine.abort(waiting)
        assert waiting.finish_reason == "abort"
        assert waiting not in engine.waiting
        assert engine.used_blocks == blocks_for(100) + running.blocks

        engine.abort(running)  # no await: freed now, not at the next step
        assert running.finish_reason == "abort"
        assert running not in engine.running
        assert engine.used_blocks == blocks_for(100)

        engine.abort(held)
        assert held.finish_reason == "abort"
        assert engine.free_blocks == engine.total_blocks

        engine.abort(held)  # idempotent
        assert engine.free_blocks == engine.total_blocks
        await engine.stop()

    run_virtual(main)


def test_abort_during_a_step_leaves_other_sequences_running(run_virtual: RunVirtual) -> None:
    timer = LinearTimer()

    async def main() -> None:
        engine = make_engine(timer)
        a = engine.submit(100, 50)
        b = engine.submit(100, 20)
        await a.wait_beyond(3)
        await asyncio.sleep(timer.base / 2)  # mid-step
        frozen = a.generated
        engine.abort(a)
        await follow(b)
        assert a.generated == frozen
        assert b.finish_reason == "length"
        assert b.generated == 20
        assert engine.free_blocks == engine.total_blocks
        await engine.stop()

    run_virtual(main)


def test_hold_after_prefill_keeps_blocks_until_release(run_virtual: RunVirtual) -> None:
    timer = LinearTimer()

    async def main() -> None:
        engine = make_engine(timer)
        seq = engine.submit(100, 2, hold_after_prefill=True)
        await seq.wait_beyond(0)
        assert seq.state == "held"
        assert seq.finished
        assert seq.generated == 1
        await asyncio.sleep(60.0)  # a minute of virtual time later
        assert seq.state == "held"
        assert engine.used_blocks == blocks_for(100)
        steps = engine.stats.steps
        assert steps == 1  # a held sequence does not decode
        engine.release(seq)
        assert seq.state == "finished"
        assert engine.free_blocks == engine.total_blocks
        engine.release(seq)  # idempotent
        assert engine.free_blocks == engine.total_blocks
        await engine.stop()

    run_virtual(main)


def test_prefilled_decode_leg_waits_for_the_kv_transfer(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    dep = catalog.deployment("groq-lpu-v1", "llama-3.1-8b")
    prompt, transfer = 500, 0.05

    async def main() -> tuple[float, list[tuple[float, int]], Engine]:
        engine = make_engine(dep)
        t0 = LoopClock().now()
        seq = engine.submit(prompt, 3, prefilled=True, transfer_s=transfer)
        assert seq.generated == 1  # the first token came from the prefill side
        await asyncio.sleep(transfer / 2)
        assert engine.used_blocks == blocks_for(prompt + 1)  # blocks held during the transfer
        assert engine.stats.steps == 0
        events = await follow(seq)
        await engine.stop()
        return t0, events, engine

    t0, events, engine = run_virtual(main)
    t2 = t0 + transfer + dep.step_time(StepShape.of([(1, prompt)]))
    t3 = t2 + dep.step_time(StepShape.of([(1, prompt + 1)]))
    assert events == [(pytest.approx(t2, abs=1e-9), 2), (pytest.approx(t3, abs=1e-9), 3)]
    assert engine.stats.prompt_tokens == 0  # the prompt was computed elsewhere


@pytest.mark.parametrize("time_scale", [0.0, 1e9])
def test_a_transfer_too_short_to_move_the_clock_still_decodes(
    run_virtual: RunVirtual, catalog: Catalog, time_scale: float
) -> None:
    """With timing off (0) or sped up a billionfold, ``now + transfer`` equals ``now`` once the
    clock reads hours: the lone decode leg must run, not wait for a wake-up that never comes."""
    dep = catalog.deployment("groq-lpu-v1", "llama-3.1-8b")

    async def main() -> int:
        await asyncio.sleep(20_000.0)  # the host has been up for hours (float spacing ~4e-12 s)
        engine = make_engine(dep, time_scale=time_scale)
        seq = engine.submit(500, 4, prefilled=True, transfer_s=1e-3)
        await asyncio.wait_for(follow(seq), timeout=60.0)
        await engine.stop()
        return seq.generated

    assert run_virtual(main) == 4


def test_prefilled_request_already_complete_finishes_at_once(run_virtual: RunVirtual) -> None:
    async def main() -> None:
        engine = make_engine(LinearTimer())
        seq = engine.submit(100, 1, prefilled=True, transfer_s=0.1)
        assert seq.finish_reason == "length"
        assert engine.free_blocks == engine.total_blocks
        await engine.stop()

    run_virtual(main)


class BrokenTimer(LinearTimer):
    def step_time(self, shape: StepShape) -> float:
        raise ZeroDivisionError("physics bug")


def test_a_failing_step_loop_aborts_its_sequences_instead_of_hanging(
    run_virtual: RunVirtual,
) -> None:
    async def main() -> None:
        engine = make_engine(BrokenTimer(), max_num_seqs=1)
        a, b = engine.submit(10, 5), engine.submit(10, 5)
        async with asyncio.timeout(60):
            await asyncio.gather(follow(a), follow(b))
        assert a.finish_reason == b.finish_reason == "abort"
        assert engine.failed
        assert not engine.running
        assert not engine.waiting
        assert engine.free_blocks == engine.total_blocks
        await engine.stop()

    run_virtual(main)


# -- stop / restart -------------------------------------------------------------------------


def test_stop_aborts_everything_and_frees_blocks(run_virtual: RunVirtual) -> None:
    async def main() -> None:
        engine = make_engine(LinearTimer(), max_num_seqs=1)
        a, b = engine.submit(100, 100), engine.submit(100, 100)
        await a.wait_beyond(2)
        await engine.stop()
        assert a.finish_reason == b.finish_reason == "abort"
        assert engine.free_blocks == engine.total_blocks

    run_virtual(main)


def test_engine_serves_again_after_stop_and_start(run_virtual: RunVirtual) -> None:
    async def main() -> bool:
        engine = make_engine(LinearTimer(), max_num_seqs=1)
        engine.submit(100, 100)
        await asyncio.sleep(0.1)
        await engine.stop()
        assert not engine.running
        assert not engine.waiting
        engine.start()
        seq = engine.submit(10, 3)
        try:
            async with asyncio.timeout(60):
                await follow(seq)
        except TimeoutError:
            return False
        finally:
            await engine.stop()
        return seq.finish_reason == "length"

    assert run_virtual(main)


# -- scale ----------------------------------------------------------------------------------


def test_an_hour_of_traffic_simulates_in_seconds(run_virtual: RunVirtual, catalog: Catalog) -> None:
    dep = catalog.deployment("h100-sxm", "llama-3.1-8b")
    rng = random.Random(1234)
    arrivals: list[tuple[float, int, int]] = []
    t = 0.0
    while t < 3600.0:
        t += rng.expovariate(1 / 6.0)  # one request every 6 s on average
        arrivals.append((t, rng.randint(50, 3000), rng.randint(1, 40)))

    async def main() -> tuple[float, list[Sequence], Engine]:
        clock = LoopClock()
        engine = make_engine(dep)
        seqs = []
        for at, prompt, max_new in arrivals:
            await clock.sleep_until(at)
            seqs.append(engine.submit(prompt, max_new))
        for seq in seqs:
            await follow(seq)
        end = clock.now()
        await engine.stop()
        return end, seqs, engine

    wall = time.perf_counter()
    end, seqs, engine = run_virtual(main)
    wall = time.perf_counter() - wall
    assert end >= 3600.0
    assert wall < 3.0
    assert all(s.finish_reason == "length" for s in seqs)
    assert engine.stats.prompt_tokens == sum(p for _, p, _ in arrivals)
    assert engine.stats.generation_tokens == sum(m for _, _, m in arrivals)
    assert engine.free_blocks == engine.total_blocks


# -- prefix caching -------------------------------------------------------------------------


class Gaps:
    """A GapRecorder that keeps every (gap, weight) entry."""

    def __init__(self) -> None:
        self.entries: list[tuple[float, int]] = []

    def add(self, gap: float, weight: int) -> None:
        self.entries.append((gap, weight))


def test_prefix_hit_skips_the_cached_prompt_compute_but_still_reads_its_kv(
    run_virtual: RunVirtual,
) -> None:
    timer = LinearTimer()
    hashes = (11, 12, 13)  # 3 units of 512 tokens

    async def main() -> tuple[Engine, Sequence, Sequence]:
        engine = make_engine(timer, prefix_caching=True)
        first = engine.submit(1536, 2, block_hashes=hashes, hash_block_tokens=512)
        await follow(first)
        timer.shapes.clear()
        second = engine.submit(1536, 2, block_hashes=hashes, hash_block_tokens=512)
        await follow(second)
        await engine.stop()
        return engine, first, second

    engine, first, second = run_virtual(main)
    # The last prompt token is always computed, so at most two of three units hit.
    assert engine.stats.prefix_hit_tokens == 1024
    prefill = timer.shapes[0]
    assert prefill.new_tokens == 1536 - 1024
    assert prefill.kv_read_tokens == 1024  # the hit KV is read by attention all the same
    assert prefill.attn_pairs == pytest.approx(512 * (1024 + 513 / 2))
    assert engine.stats.prompt_tokens == 2 * 1536  # charged in full either way
    assert second.first_token_at - second.arrival < first.first_token_at - first.arrival


def test_prefix_cache_shares_blocks_between_running_sequences(run_virtual: RunVirtual) -> None:
    timer = LinearTimer()
    hashes = (1, 2)

    async def main() -> tuple[int, int, Engine]:
        engine = make_engine(timer, prefix_caching=True)
        a = engine.submit(1100, 50, block_hashes=hashes, hash_block_tokens=512)
        await a.wait_beyond(1)
        alone = engine.used_blocks
        b = engine.submit(1100, 50, block_hashes=hashes, hash_block_tokens=512)
        await b.wait_beyond(1)
        assert a.cached_tokens == b.cached_tokens == 1024
        both = engine.used_blocks
        own = a.blocks + b.blocks  # each sequence's blocks beyond the shared prefix
        await asyncio.gather(follow(a), follow(b))
        await engine.stop()
        return alone, both - own, engine

    alone, held_once, engine = run_virtual(main)
    shared = 2 * 512 // 16
    assert alone == shared + blocks_for(1100 + 1 - 1024)
    assert held_once == shared  # the two full units are held once for both
    # Finished sequences leave their units cached and evictable, nothing else.
    cache = engine.cache
    assert cache is not None
    assert cache.evictable_blocks == cache.blocks == shared
    assert engine.free_blocks + cache.blocks == engine.total_blocks
    assert engine.active_blocks == 0


def test_prefix_cache_evicts_least_recently_released_units_when_blocks_run_out(
    run_virtual: RunVirtual,
) -> None:
    timer = LinearTimer(kv_capacity_tokens=2048)  # 128 blocks: room for two 1024-token prompts

    async def main() -> Engine:
        engine = make_engine(timer, prefix_caching=True)
        for i in range(6):  # distinct prompts: each leaves two units (64 blocks) cached
            seq = engine.submit(1100, 2, block_hashes=(100 + i, 200 + i), hash_block_tokens=512)
            await follow(seq)
            assert seq.finish_reason == "length"
            assert engine.free_blocks >= 0
        await engine.stop()
        return engine

    engine = run_virtual(main)
    cache = engine.cache
    assert cache is not None
    assert cache.evictions > 0
    assert engine.stats.preemptions == 0
    assert engine.free_blocks + cache.blocks == engine.total_blocks
    # The newest prompt's units survive, the oldest are gone.
    assert cache.match((105, 205)) == 2
    assert cache.match((100, 200)) == 0


def test_prefix_hashes_are_ignored_without_prefix_caching(run_virtual: RunVirtual) -> None:
    timer = LinearTimer()

    async def main() -> Engine:
        engine = make_engine(timer)
        for _ in range(2):
            await follow(engine.submit(1100, 2, block_hashes=(1, 2), hash_block_tokens=512))
        await engine.stop()
        return engine

    engine = run_virtual(main)
    assert engine.cache is None
    assert engine.stats.prefix_hit_tokens == 0
    assert [s.new_tokens for s in timer.shapes] == [1100, 1, 1100, 1]


def test_preempted_sequence_recomputes_cheaply_from_its_own_cached_prefix(
    run_virtual: RunVirtual,
) -> None:
    timer = LinearTimer(kv_capacity_tokens=1280)  # 80 blocks

    async def main() -> tuple[Engine, list[Sequence]]:
        engine = make_engine(timer, prefix_caching=True)
        a = engine.submit(512, 400, block_hashes=(1,), hash_block_tokens=512)
        await a.wait_beyond(1)
        b = engine.submit(512, 400, block_hashes=(2,), hash_block_tokens=512)
        await asyncio.gather(follow(a), follow(b))
        await engine.stop()
        return engine, [a, b]

    engine, seqs = run_virtual(main)
    assert engine.stats.preemptions > 0
    assert all(s.finish_reason == "length" and s.generated == 400 for s in seqs)
    # Re-admitted after preemption, the victim found its prompt unit still cached.
    recomputes = [s for s in timer.shapes[2:] if s.new_tokens > 1 and s.kv_read_tokens >= 512]
    assert recomputes


# -- speculative decoding ---------------------------------------------------------------------


def _spec_run(
    run_virtual: RunVirtual,
    k: int,
    a: float,
    *,
    seed: int = 0,
    max_new: int = 4001,
    gaps: Gaps | None = None,
) -> tuple[Engine, LinearTimer, Sequence]:
    timer = LinearTimer()

    async def main() -> tuple[Engine, Sequence]:
        engine = make_engine(
            timer,
            speculative_tokens=k,
            acceptance_rate=a,
            draft_cost_fraction=0.1,
            seed=seed,
            recorder=gaps,
        )
        seq = engine.submit(100, max_new)
        await follow(seq)
        await engine.stop()
        return engine, seq

    engine, seq = run_virtual(main)
    return engine, timer, seq


@pytest.mark.parametrize(("k", "a"), [(3, 0.7), (5, 0.8), (2, 0.5)])
def test_speculative_decoding_yields_the_expected_tokens_per_step(
    run_virtual: RunVirtual, k: int, a: float
) -> None:
    engine, _, seq = _spec_run(run_virtual, k, a)
    assert seq.generated == 4001  # exactly max_new, never more
    decode_steps = engine.stats.steps - 1  # the first step is the prefill
    per_step = (seq.generated - 1) / decode_steps
    assert per_step == pytest.approx((1 - a ** (k + 1)) / (1 - a), rel=0.04)
    s = engine.stats
    assert s.draft_tokens_accepted / s.draft_tokens == pytest.approx((per_step - 1) / k, rel=0.02)


def test_speculative_decoding_bounds_no_acceptance_and_full_acceptance(
    run_virtual: RunVirtual,
) -> None:
    none, _, _ = _spec_run(run_virtual, 4, 0.0, max_new=101)
    assert none.stats.steps == 1 + 100  # one token per step
    full, _, _ = _spec_run(run_virtual, 4, 1.0, max_new=101)
    assert full.stats.steps == 1 + 100 // 5  # k + 1 tokens per step


def test_speculative_step_costs_verification_plus_drafts(run_virtual: RunVirtual) -> None:
    k = 4
    gaps = Gaps()
    _, timer, _ = _spec_run(run_virtual, k, 0.6, max_new=50, gaps=gaps)
    verify, plain = timer.shapes[1], timer.shapes[2]  # asked in this order for step 2
    # The last token and k drafts: a prompt's shape, but no prompt (no rank prefills it).
    assert verify == replace(StepShape.of([(k + 1, 100)]), prompt_tokens=0, prompts=0)
    assert plain == StepShape(1, 101.0, 100, 1)  # one plain decode step of that sequence
    first_gap, weight = gaps.entries[0]
    step = timer.formula(verify) + k * 0.1 * timer.formula(plain)
    assert first_gap * weight == pytest.approx(step, rel=1e-12)


def test_speculative_decoding_is_deterministic_for_a_seed(run_virtual: RunVirtual) -> None:
    a1, _, s1 = _spec_run(run_virtual, 3, 0.7, seed=5, max_new=500)
    a2, _, s2 = _spec_run(run_virtual, 3, 0.7, seed=5, max_new=500)
    b, _, _ = _spec_run(run_virtual, 3, 0.7, seed=6, max_new=500)
    assert a1.stats.steps == a2.stats.steps
    assert s1.last_token_at == s2.last_token_at
    assert a1.stats.draft_tokens_accepted != b.stats.draft_tokens_accepted


# -- KV reservation (guaranteed_no_evict) ---------------------------------------------------


def test_reserving_max_tokens_admits_fewer_but_never_preempts(run_virtual: RunVirtual) -> None:
    def run(reserve: bool) -> tuple[Engine, list[Sequence]]:
        timer = LinearTimer(kv_capacity_tokens=160)

        async def main() -> tuple[Engine, list[Sequence]]:
            engine = make_engine(timer, reserve_max=reserve)
            seqs = [engine.submit(30, 40) for _ in range(4)]
            await asyncio.gather(*(follow(s) for s in seqs))
            await engine.stop()
            return engine, seqs

        result: tuple[Engine, list[Sequence]] = run_virtual(main)
        return result

    greedy, _ = run(False)
    reserved, seqs = run(True)
    assert greedy.stats.preemptions > 0
    assert reserved.stats.preemptions == 0
    assert all(s.finish_reason == "length" and s.generated == 40 for s in seqs)
    # 70 tokens reserved per request (5 blocks): two of four fit at a time.
    assert seqs[2].first_scheduled == pytest.approx(seqs[0].last_token_at, abs=1e-9)
    assert reserved.free_blocks == reserved.total_blocks


# -- token gaps ---------------------------------------------------------------------------------


def test_gap_recorder_sees_every_token_after_the_first_once(run_virtual: RunVirtual) -> None:
    timer = LinearTimer()
    gaps = Gaps()

    async def main() -> list[Sequence]:
        engine = make_engine(timer, recorder=gaps)
        a = engine.submit(100, 20)
        await a.wait_beyond(3)
        b = engine.submit(300, 10)  # joins mid-decode: a's gap that step is longer
        await asyncio.gather(follow(a), follow(b))
        await engine.stop()
        return [a, b]

    seqs = run_virtual(main)
    assert sum(w for _, w in gaps.entries) == (20 - 1) + (10 - 1)
    # Per step, not per token: one entry per step for the sequences continuing together.
    assert len(gaps.entries) < 20 + 10
    decode = timer.formula(StepShape.of([(1, 100)]))
    assert min(g for g, _ in gaps.entries) == pytest.approx(decode, rel=1e-6)
    assert max(g for g, _ in gaps.entries) > timer.formula(StepShape.of([(300, 0)]))
    assert all(s.finish_reason == "length" for s in seqs)


def test_decode_leg_gap_counts_from_the_prefill_side_first_token(
    run_virtual: RunVirtual,
) -> None:
    timer = LinearTimer()
    gaps = Gaps()

    async def main() -> float:
        engine = make_engine(timer, recorder=gaps)
        t0 = LoopClock().now()
        seq = engine.submit(500, 3, prefilled=True, transfer_s=0.05, last_token_at=t0 - 0.02)
        await follow(seq)
        await engine.stop()
        return t0

    run_virtual(main)
    first_gap = gaps.entries[0][0]
    step = timer.formula(StepShape.of([(1, 500)]))
    assert first_gap == pytest.approx(0.02 + 0.05 + step, rel=1e-9)
