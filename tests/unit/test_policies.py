"""Routing policies (gateway/policies) and the registry's in-flight guard."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.clock import LoopClock
from gateway.admission import Limiter
from gateway.circuit import CircuitBreaker
from gateway.policies import POLICIES, PolicyDeps, RouteRequest, make_policy
from gateway.policies.basic import RoundRobin
from gateway.policies.load import LeastLoaded
from gateway.registry import Pool, Worker, WorkerRegistry
from gateway.state import InMemoryStateStore, WorkerLoad
from tests.fakes import FakeBackend

REQ = RouteRequest("req-1", prompt_tokens=100, max_tokens=10)


@dataclass(frozen=True)
class Cand:
    id: str


def cands(n: int) -> list[Cand]:
    return [Cand(f"w{i}") for i in range(n)]


def test_policy_registry_names() -> None:
    assert set(POLICIES) >= {"round_robin", "least_loaded"}
    store = InMemoryStateStore()
    assert isinstance(make_policy("round_robin", PolicyDeps(store)), RoundRobin)
    assert isinstance(make_policy("least_loaded", PolicyDeps(store)), LeastLoaded)


# -- round robin --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_round_robin_cycles_evenly(n: int) -> None:
    policy = RoundRobin(PolicyDeps(InMemoryStateStore()))
    candidates = cands(n)
    picks = [policy.choose(candidates, REQ) for _ in range(5 * n)]
    assert Counter(p.id for p in picks) == {c.id: 5 for c in candidates}
    # In order: each pick is the candidate after the previous one.
    for a, b in itertools.pairwise(picks):
        assert candidates.index(b) == (candidates.index(a) + 1) % n


def test_round_robin_ignores_load() -> None:
    store = InMemoryStateStore()
    store.add_load("w0", 100, 100_000)
    policy = RoundRobin(PolicyDeps(store))
    picks = {policy.choose(cands(2), REQ).id for _ in range(2)}
    assert picks == {"w0", "w1"}


# -- least loaded -------------------------------------------------------------------------


def test_least_loaded_picks_fewest_requests_then_fewest_tokens() -> None:
    store = InMemoryStateStore()
    store.add_load("w0", 3, 100)
    store.add_load("w1", 1, 5000)
    store.add_load("w2", 1, 4000)
    store.add_load("w3", 2, 0)
    policy = LeastLoaded(PolicyDeps(store))
    for _ in range(8):  # whatever the rotation offset
        assert policy.choose(cands(4), REQ).id == "w2"


def test_least_loaded_rotates_among_ties_when_all_equal() -> None:
    policy = LeastLoaded(PolicyDeps(InMemoryStateStore()))
    picks = [policy.choose(cands(3), REQ).id for _ in range(6)]
    assert picks[:3] != [picks[0]] * 3
    assert Counter(picks) == {"w0": 2, "w1": 2, "w2": 2}


def test_least_loaded_rotates_evenly_among_ties() -> None:
    store = InMemoryStateStore()
    store.add_load("w1", 1, 10)
    policy = LeastLoaded(PolicyDeps(store))
    picks = [policy.choose(cands(4), REQ).id for _ in range(9)]
    assert "w1" not in picks
    assert Counter(picks) == {"w0": 3, "w2": 3, "w3": 3}


def test_least_loaded_follows_load_changes() -> None:
    store = InMemoryStateStore()
    policy = LeastLoaded(PolicyDeps(store))
    candidates = cands(3)
    seen = []
    for _ in range(6):
        pick = policy.choose(candidates, REQ)
        store.add_load(pick.id, 1, REQ.prompt_tokens)  # the request stays in flight
        seen.append(pick.id)
    assert Counter(seen) == {"w0": 2, "w1": 2, "w2": 2}
    assert {store.load(c.id) for c in candidates} == {WorkerLoad(2, 200)}


loads = st.tuples(st.integers(0, 5), st.integers(0, 3))


@settings(max_examples=200, database=None, deadline=None)
@given(
    data=st.lists(loads, min_size=1, max_size=8),
    calls=st.integers(1, 10),
    policy_name=st.sampled_from(["round_robin", "least_loaded"]),
)
def test_choice_is_a_candidate_and_least_loaded_is_minimal(
    data: list[tuple[int, int]], calls: int, policy_name: str
) -> None:
    store = InMemoryStateStore()
    candidates = cands(len(data))
    for c, (requests, tokens) in zip(candidates, data, strict=True):
        store.add_load(c.id, requests, tokens)
    policy = make_policy(policy_name, PolicyDeps(store))
    for _ in range(calls):
        pick = policy.choose(candidates, REQ)
        assert pick in candidates
        if policy_name == "least_loaded":
            key = (store.load(pick.id).requests, store.load(pick.id).tokens)
            assert all(
                (store.load(c.id).requests, store.load(c.id).tokens) >= key for c in candidates
            )


@settings(max_examples=100, database=None, deadline=None)
@given(n=st.integers(1, 8), rounds=st.integers(1, 4))
def test_least_loaded_spreads_evenly_when_all_equal(n: int, rounds: int) -> None:
    policy = LeastLoaded(PolicyDeps(InMemoryStateStore()))
    picks = Counter(policy.choose(cands(n), REQ).id for _ in range(n * rounds))
    assert picks == {f"w{i}": rounds for i in range(n)}


# -- registry in-flight guard -------------------------------------------------------------


def _registry() -> tuple[WorkerRegistry, Worker]:
    store = InMemoryStateStore()
    registry = WorkerRegistry(store)
    worker = Worker("prefill-0", "llama-3.1-8b", "prefill", FakeBackend("prefill-0"), _breaker())
    pool = Pool("llama-3.1-8b", "prefill", RoundRobin(PolicyDeps(store)), _limiter())
    pool.add(worker)
    registry.add_pool(pool)
    return registry, worker


def test_in_flight_counts_inside_the_with() -> None:
    registry, worker = _registry()
    assert worker.id == "llama-3.1-8b/prefill-0"
    with registry.in_flight(worker, 1200) as w:
        assert w is worker
        assert worker.in_flight == 1
        assert registry.store.load(worker.id) == WorkerLoad(1, 1200)
        with registry.in_flight(worker, 300):
            assert worker.in_flight == 2
            assert registry.store.load(worker.id) == WorkerLoad(2, 1500)
    assert worker.in_flight == 0
    assert registry.store.load(worker.id) == WorkerLoad(0, 0)


def test_in_flight_returns_to_zero_after_an_exception() -> None:
    registry, worker = _registry()
    with pytest.raises(RuntimeError, match="leg failed"), registry.in_flight(worker, 500):
        raise RuntimeError("leg failed")
    assert worker.in_flight == 0
    assert registry.store.load(worker.id) == WorkerLoad(0, 0)


async def test_in_flight_returns_to_zero_after_cancellation() -> None:
    registry, worker = _registry()
    entered = asyncio.Event()

    async def leg() -> None:
        with registry.in_flight(worker, 700):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(leg())
    await entered.wait()
    assert worker.in_flight == 1
    assert registry.store.load(worker.id) == WorkerLoad(1, 700)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert worker.in_flight == 0
    assert registry.store.load(worker.id) == WorkerLoad(0, 0)


async def test_in_flight_returns_to_zero_after_timeout() -> None:
    registry, worker = _registry()

    async def leg() -> None:
        async with asyncio.timeout(0.01):
            with registry.in_flight(worker, 50):
                await asyncio.sleep(3600)

    with pytest.raises(TimeoutError):
        await leg()
    assert worker.in_flight == 0
    assert registry.store.load(worker.id) == WorkerLoad(0, 0)


def test_pool_candidates_skip_draining_and_unhealthy() -> None:
    store = InMemoryStateStore()
    pool = Pool("m", "decode", RoundRobin(PolicyDeps(store)), _limiter())
    workers = [Worker(f"d{i}", "m", "decode", FakeBackend(f"d{i}"), _breaker()) for i in range(3)]
    for w in workers:
        pool.add(w)
    workers[0].draining = True
    backend = workers[1].backend
    assert isinstance(backend, FakeBackend)
    backend.healthy_flag = False
    assert pool.candidates() == [workers[2]]
    pool.remove(workers[2])
    assert pool.candidates() == []


def _breaker() -> CircuitBreaker:
    return CircuitBreaker(LoopClock(), failure_threshold=5, cooldown_s=10.0)


def _limiter() -> Limiter:
    return Limiter("pool", max_active=None)
