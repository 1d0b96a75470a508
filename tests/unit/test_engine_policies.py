"""How each engine builds a step (backends/emulator/engine.py ``step_policy``)."""

from __future__ import annotations

import pytest

from backends.emulator.engine import Engine
from backends.emulator.timing import StepShape
from gateway.sim.silicon import ManualClock


class Timer:
    kv_capacity_tokens = 1_000_000

    def step_time(self, shape: StepShape) -> float:
        return 0.01


def engine(policy: str, budget: int = 1000) -> tuple[Engine, ManualClock]:
    clock = ManualClock()
    # The per-sequence path, so every decode shows in the returned batch (bulk decodes are
    # counted in the step's shape instead; tests/unit/test_engine_bulk.py holds both paths equal
    # under each policy).
    e = Engine(
        Timer(),  # type: ignore[arg-type]
        clock,
        max_num_batched_tokens=budget,
        step_policy=policy,
        bulk_decode=False,
    )
    return e, clock


def run_step(e: Engine, clock: ManualClock) -> list[tuple[int, int]]:
    """One step; returns (sequence id, tokens) of its batch."""
    step = e._schedule(clock.t)
    assert step is not None
    batch, _, _ = step
    clock.t += 0.01
    e._apply(batch, clock.t)
    return [(s.id, n) for s, n in batch]


def decoding(e: Engine, clock: ManualClock, prompt: int) -> None:
    """Bring one request to decoding."""
    s = e.submit(prompt, 100)
    while s.generated == 0:
        run_step(e, clock)


def test_mixed_puts_decodes_and_a_chunk_in_one_step() -> None:
    e, clock = engine("mixed")
    decoding(e, clock, 100)
    e.submit(5000, 10)
    batch = run_step(e, clock)
    assert batch == [(0, 1), (1, 999)]  # the decode, then the rest of the budget as a chunk


def test_prefill_first_runs_a_prefill_step_alone() -> None:
    e, clock = engine("prefill_first")
    decoding(e, clock, 100)
    e.submit(1500, 10)
    assert run_step(e, clock) == [(1, 1000)]  # the decode waits
    assert run_step(e, clock) == [(1, 500)]  # the chunked prefill continues, still alone
    assert run_step(e, clock) == [(0, 1), (1, 1)]  # nothing to prefill: a decode step


def test_whole_prompt_never_splits_a_prompt_behind_decodes() -> None:
    e, clock = engine("whole_prompt")
    decoding(e, clock, 100)
    e.submit(999, 10)  # fits beside the decode: 1 + 999 = 1000
    e.submit(500, 10)  # does not fit in what is left: waits for the next step
    assert run_step(e, clock) == [(0, 1), (1, 999)]
    assert run_step(e, clock) == [(0, 1), (1, 1), (2, 500)]


def test_whole_prompt_larger_than_the_budget_still_runs_alone() -> None:
    e, clock = engine("whole_prompt", budget=100)
    e.submit(250, 10)
    assert run_step(e, clock) == [(0, 100)]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="step policy"):
        engine("random")
