"""Bulk decoding (backends/emulator/engine.py) against the per-sequence path it replaces.

Plain decoding sequences advance together as counters; everything observable must stay what
the per-sequence bookkeeping gives: every step's shape and end time, every token's time,
the gaps recorded, the order in which waiting consumers wake, finish reasons and counters.
Each scenario is a seeded mix of arrivals, short and chunked prompts, decode legs waiting for
a KV transfer, prefill legs held and released, aborts, per-token and coalescing consumers,
KV pressure (preemption) and, in some runs, prefix caching.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from backends.clock import LoopClock
from backends.emulator.engine import Engine, Sequence
from backends.emulator.timing import StepShape
from tests.unit.conftest import run_on_virtual_loop


class Timer:
    """Step time affine in new tokens and KV read; records every shape."""

    def __init__(self, kv_capacity_tokens: int) -> None:
        self.kv_capacity_tokens = kv_capacity_tokens
        self.shapes: list[StepShape] = []

    def step_time(self, shape: StepShape) -> float:
        self.shapes.append(shape)
        s = shape
        return 0.004 + 2e-6 * s.new_tokens + 1e-9 * s.kv_read_tokens + 1e-11 * s.attn_pairs


class Gaps:
    def __init__(self) -> None:
        self.entries: list[tuple[float, int]] = []

    def add(self, gap: float, weight: int) -> None:
        self.entries.append((gap, weight))


def run_scenario(seed: int, *, bulk: bool, bound: bool = False, **knobs: Any) -> dict[str, Any]:
    """Everything observable about one seeded run (``bound``: on a clock bound to the virtual
    loop, whose engine runs its steps as timer callbacks instead of a task)."""
    kv = knobs.pop("kv_capacity_tokens", 60_000)
    requests = knobs.pop("requests", 300)
    timer, gaps = Timer(kv), Gaps()
    rng = random.Random(seed)
    wakes: list[tuple[float, int, int]] = []
    token_times: dict[int, list[float]] = {}
    seqs: dict[int, Sequence] = {}
    steps: list[float] = []
    loads: list[tuple[int, int, int, int, int]] = []
    owned: list[list[tuple[int, int, int]]] = []
    in_bulk: list[int] = []

    async def consume(i: int, seq: Sequence, style: str, clock: LoopClock, engine: Engine) -> None:
        seen = seq.generated
        if style == "handoff":  # at its first token the request's next leg starts, here
            await seq.wait_beyond(seen)
            wakes.append((clock.now(), i, seq.generated))
            seq = engine.submit(seq.prompt + 1, 6, prefilled=True, last_token_at=clock.now())
            await seq.wait_finished()
        elif style == "coalesce":  # first token, then the end, as a simulated leg reads
            await seq.wait_beyond(seen)
            wakes.append((clock.now(), i, seq.generated))
            await seq.wait_finished()
        else:  # every token as it comes, as a live stream reads
            while not seq.finished:
                await seq.wait_beyond(seen)
                seen = seq.generated
                wakes.append((clock.now(), i, seen))
                if style == "late" and seen > 3:
                    await seq.wait_finished()
        wakes.append((clock.now(), i, seq.generated))

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        clock = LoopClock(loop) if bound else LoopClock()
        engine = Engine(timer, clock, recorder=gaps, bulk_decode=bulk, **knobs)
        apply = engine._apply

        def traced(batch: list[tuple[Sequence, int]], end: float) -> None:
            apply(batch, end)
            steps.append(end)
            loads.append((*engine.pending_prefill(), engine.used_blocks, len(engine.running)))
            owned.append([(s.id, s.blocks, s.cap) for s in engine.running])  # (read lazily)
            in_bulk.append(len(engine._co))
            for i, seq in seqs.items():  # every token's time, read through the public counts
                times = token_times[i]
                while len(times) < seq.generated:
                    times.append(end)

        engine._apply = traced  # type: ignore[method-assign]
        engine.start()
        tasks = []
        for i in range(requests):
            await clock.sleep(rng.expovariate(40.0))
            prompt = int(rng.lognormvariate(5.5, 1.0)) + 1
            max_new = rng.randint(1, 160)
            kind = rng.random()
            hashes = tuple(rng.randrange(3) * 1000 + k for k in range(prompt // 512))
            if kind < 0.15:  # a decode leg: KV arrives after a transfer
                seq = engine.submit(
                    prompt,
                    max_new,
                    prefilled=True,
                    transfer_s=rng.choice((0.0, 0.003, 0.02)),
                    last_token_at=clock.now() - 0.01,
                )
            elif kind < 0.25:  # a prefill leg, released a little later
                seq = engine.submit(prompt, max_new, hold_after_prefill=True, block_hashes=hashes)
                loop.call_later(rng.uniform(0.0, 0.2), engine.release, seq)
            else:
                seq = engine.submit(prompt, max_new, block_hashes=hashes)
            seqs[i] = seq
            token_times[i] = []
            style = rng.choice(("coalesce", "coalesce", "each", "late", "handoff"))
            tasks.append(asyncio.ensure_future(consume(i, seq, style, clock, engine)))
            if rng.random() < 0.05:  # a client that goes away mid-stream
                loop.call_later(rng.uniform(0.0, 0.5), engine.abort, seq)
        await asyncio.gather(*tasks)
        await engine.stop()
        s = engine.stats
        return {
            "shapes": timer.shapes,
            "steps": steps,
            "loads": loads,
            "owned": owned,
            "in_bulk": sum(in_bulk),
            "tokens": token_times,
            "gaps": gaps.entries,
            "wakes": wakes,
            "finish": {
                i: (q.finish_reason, q.generated, q.first_token_at) for i, q in seqs.items()
            },
            "stats": (
                s.steps,
                s.prompt_tokens,
                s.generation_tokens,
                s.preemptions,
                s.prefix_hit_tokens,
                s.kv_peak_blocks,
            ),
            "free": engine.free_blocks,
        }

    return run_on_virtual_loop(main)


SCENARIOS = [
    pytest.param({}, id="roomy"),
    pytest.param({"kv_capacity_tokens": 12_000}, id="kv-pressure"),
    pytest.param({"max_num_batched_tokens": 512}, id="chunked-prefill"),
    pytest.param(
        {"kv_capacity_tokens": 16_000, "max_num_batched_tokens": 256, "max_num_seqs": 24},
        id="tight",
    ),
    pytest.param({"prefix_caching": True, "kv_capacity_tokens": 20_000}, id="prefix-cache"),
    pytest.param({"reserve_max": True, "kv_capacity_tokens": 20_000}, id="reserve-max"),
    # SGLang's step building: a prefill-only step, which the bulk sits out
    pytest.param(
        {"step_policy": "prefill_first", "max_num_batched_tokens": 1024}, id="prefill-first"
    ),
    # TensorRT-LLM without chunking: whole prompts only, beside the bulk's decodes
    pytest.param(
        {"step_policy": "whole_prompt", "max_num_batched_tokens": 2048}, id="whole-prompt"
    ),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("knobs", SCENARIOS)
@pytest.mark.parametrize("seed", [1, 2])
def test_bulk_decoding_matches_the_per_sequence_path(seed: int, knobs: dict[str, Any]) -> None:
    slow = run_scenario(seed, bulk=False, **dict(knobs))
    fast = run_scenario(seed, bulk=True, **dict(knobs))
    assert len(slow["shapes"]) > 50  # the scenario exercises the engine
    assert slow["in_bulk"] == 0
    assert fast["in_bulk"] > len(fast["steps"])  # and the bulk path: > 1 sequence a step
    assert fast["shapes"] == slow["shapes"]
    assert fast["steps"] == slow["steps"]
    assert fast["loads"] == slow["loads"]  # what routing reads between steps
    assert fast["owned"] == slow["owned"]  # each running sequence's blocks and capacity
    assert fast["tokens"] == slow["tokens"]
    assert fast["gaps"] == slow["gaps"]
    assert fast["wakes"] == slow["wakes"]
    assert fast["finish"] == slow["finish"]
    assert fast["stats"] == slow["stats"]
    assert fast["free"] == slow["free"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("knobs", SCENARIOS)
@pytest.mark.parametrize("bulk", [False, True])
def test_timer_callback_steps_match_the_stepping_task(bulk: bool, knobs: dict[str, Any]) -> None:
    """On a clock bound to the virtual loop the engine runs its steps as timer callbacks;
    every step, token, gap and wake-up is the task's, in the same order."""
    task = run_scenario(3, bulk=bulk, **dict(knobs))
    callbacks = run_scenario(3, bulk=bulk, bound=True, **dict(knobs))
    assert len(task["shapes"]) > 50
    assert callbacks == task


def test_an_engine_that_drains_keeps_no_bulk_schedule_behind() -> None:
    """Bursts with idle time between them: once the last bulk sequence leaves, no growth or
    finish entry (holding finished sequences) is left for a long-running server to keep."""

    async def main() -> tuple[int, int, int, int]:
        clock = LoopClock()
        engine = Engine(Timer(100_000), clock)
        engine.start()
        generated = 0
        for _ in range(20):
            seqs = [engine.submit(100, 40) for _ in range(20)]
            for seq in seqs:
                await seq.wait_finished()
                generated += seq.generated
            await clock.sleep(1.0)
        ring = sum(len(slot) for slot in engine._ring)
        left = (len(engine._grow_at), len(engine._finish_at), len(engine._co) + ring)
        await engine.stop()
        return (*left, generated)

    grow, finish, bulk, generated = run_on_virtual_loop(main)
    assert generated == 20 * 20 * 40
    assert (grow, finish, bulk) == (0, 0, 0)


@pytest.mark.parametrize("bulk", [False, True])
def test_an_empty_prompt_decodes_beside_bulk_sequences(bulk: bool) -> None:
    """A prompt of no tokens is scheduled with a chunk of zero tokens for its first step:
    that batch entry must not be taken for a bulk event."""

    async def main() -> tuple[int, int, str | None]:
        engine = Engine(Timer(100_000), LoopClock(), bulk_decode=bulk)
        engine.start()
        other = engine.submit(50, 30)
        await other.wait_beyond(0)
        empty = engine.submit(0, 5)
        await asyncio.wait_for(empty.wait_finished(), 10.0)
        await other.wait_finished()
        await engine.stop()
        return empty.generated, other.generated, empty.finish_reason

    assert run_on_virtual_loop(main) == (5, 30, "length")
