"""A simulation's fast paths against the slow ones they stand for.

``pdgate simulate`` runs its engines with bulk decoding, as timer callbacks on the virtual loop
(a clock bound to it), under the gateway's lean per-request path. The reference is the same run
with per-sequence engine bookkeeping (``bulk_decode=False``) and each engine stepping in its
own task on an unbound clock, as in live serving. Every request's arrival, first token, end
and token count, every recorded inter-token gap and every engine's counters must agree to the
last bit, in each mode, with and without timeouts, open and closed loop.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest

from backends.clock import LoopClock
from backends.emulator import emulated
from backends.emulator.catalog import Catalog, EngineKnobs
from backends.emulator.engine import Engine
from gateway.sim import run
from gateway.sim.run import SimulationSpec, device_settings, simulate
from gateway.sim.workload import make_workload, parse_length
from tests.helpers import config, pool, settings


def _spec(catalog: Catalog, case: str) -> SimulationSpec:
    if case.startswith("aggregated"):
        # "-kv": a KV cache of a few thousand tokens, so decodes outgrow it (KV growth that
        # the free blocks do not cover, preemption)
        memory = 0.215 if case == "aggregated-kv" else 0.9
        s = device_settings(
            catalog,
            device="h100-sxm",
            model="llama-3.1-8b",
            count=2,
            engine=EngineKnobs(
                max_num_seqs=48, max_num_batched_tokens=1024, gpu_memory_utilization=memory
            ),
        )
        w = make_workload(
            isl=parse_length("lognormal:600,500"),
            osl=parse_length("lognormal:120,100"),
            rate=40,
            requests=400,
            seed=11,
        )
        return SimulationSpec(s, "llama-3.1-8b", w.requests, catalog=catalog)
    mode, _, variant = case.partition("-")
    data = config(
        mode=mode,
        name="llama-3.1-8b",
        prefill=pool("h100-sxm", 2, policy="least_loaded"),
        decode=pool("h100-sxm", 2, policy="least_loaded"),
    )
    w = make_workload(
        isl=parse_length("lognormal:1500,1200"),
        osl=parse_length("lognormal:150,120"),
        rate=None if variant == "closed" else 20,
        requests=300,
        concurrency=12 if variant == "closed" else None,
        seed=5,
    )
    concurrency = 12 if variant == "closed" else None
    timeout = 30.0 if variant == "timeouts" else None
    return SimulationSpec(
        settings(data, catalog),
        "llama-3.1-8b",
        w.requests,
        concurrency=concurrency,
        timeout_s=timeout,
        catalog=catalog,
    )


def _observed(spec: SimulationSpec) -> dict[str, Any]:
    r = simulate(spec)
    return {
        "records": [
            (x.arrival, x.prompt_tokens, x.output_tokens, x.first_at, x.end_at, x.error)
            for x in r.records
        ],
        "gaps": (list(r.gaps.gaps), list(r.gaps.weights)),
        "engines": [
            (e.stats.steps, e.stats.generation_tokens, e.stats.preemptions, e.free_blocks)
            for e in r.engines
        ],
        "bulk": [e._bulk for e in r.engines],
        "tasks": [e._clock.virtual_loop is None for e in r.engines],  # an unbound clock
    }


class _PerSequenceEngine(Engine):
    """The engine with bulk decoding off: every sequence stepped one by one (the reference)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "bulk_decode": False})


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "case",
    [
        "aggregated",
        "aggregated-kv",
        "disaggregated",
        "conditional",
        "disaggregated-timeouts",
        "conditional-closed",
    ],
)
def test_fast_simulation_paths_match_the_reference(
    catalog: Catalog, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = _observed(_spec(catalog, case))
    with monkeypatch.context() as m:
        m.setattr(emulated, "Engine", _PerSequenceEngine)
        m.setattr(run, "LoopClock", lambda loop: LoopClock())  # unbound: a task per engine
        slow = _observed(_spec(catalog, case))
    assert fast.pop("bulk") == [True] * len(fast["engines"])
    assert fast.pop("tasks") == [False] * len(fast["engines"])
    assert slow.pop("bulk") == [False] * len(slow["engines"])
    assert slow.pop("tasks") == [True] * len(slow["engines"])
    done = [r for r in fast["records"] if r[5] is None]
    assert len(done) > 0.9 * len(fast["records"])  # the workload ran
    if case == "aggregated-kv":
        assert sum(e[2] for e in fast["engines"]) > 10  # preemptions: the cache ran out
    assert fast == slow


def test_a_simulation_collects_cycles_less_often_and_restores_the_thresholds(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = gc.get_threshold()
    seen: list[tuple[int, int, int]] = []
    real_run = run._run

    async def watched(spec: SimulationSpec) -> run.SimulationResult:
        seen.append(gc.get_threshold())
        return await real_run(spec)

    monkeypatch.setattr(run, "_run", watched)
    simulate(_spec(catalog, "aggregated"))
    assert seen == [tuple(max(a, b) for a, b in zip(run.SIM_GC_THRESHOLDS, before, strict=True))]
    assert gc.get_threshold() == before
