"""Routing policies beyond round-robin: random, least-loaded by tokens, power of two, prefix
and SLO aware (gateway/policies)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, SupportsIndex, overload

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import Overloaded
from gateway.policies import POLICIES, PolicyDeps, RouteRequest, make_policy
from gateway.policies.basic import RandomChoice
from gateway.policies.load import LeastLoaded, PowerOfTwo
from gateway.policies.prefix import PrefixAware
from gateway.policies.slo import SloAware
from gateway.prefix import block_hashes
from gateway.state import InMemoryStateStore

REQ = RouteRequest("req-1", prompt_tokens=100, max_tokens=10)


@dataclass(frozen=True)
class Cand:
    id: str
    estimate: float | None = None

    def estimate_prefill_s(self, prompt_tokens: int) -> float | None:
        return self.estimate


def cands(n: int) -> list[Cand]:
    return [Cand(f"w{i}") for i in range(n)]


def store_with(loads: dict[str, tuple[int, int]]) -> InMemoryStateStore:
    store = InMemoryStateStore()
    for wid, (requests, tokens) in loads.items():
        store.add_load(wid, requests, tokens)
    return store


class Recording(list[Cand]):
    """A candidate list that remembers which positions a policy looked at."""

    def __init__(self, items: Sequence[Cand]) -> None:
        super().__init__(items)
        self.seen: list[int] = []

    @overload
    def __getitem__(self, i: SupportsIndex) -> Cand: ...

    @overload
    def __getitem__(self, i: slice) -> list[Cand]: ...

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, int):
            self.seen.append(i)
        return super().__getitem__(i)


def prefix_req(text: str, rid: str = "r") -> RouteRequest:
    return RouteRequest(rid, prompt_tokens=len(text) // 4, block_hashes=block_hashes(text))


LONG_A = "A" * 256 * 8
LONG_B = "B" * 256 * 8


# -- random -----------------------------------------------------------------------------------


def test_random_is_seeded_and_covers_every_candidate() -> None:
    candidates = cands(4)
    a = RandomChoice(PolicyDeps(InMemoryStateStore(), seed=7))
    b = RandomChoice(PolicyDeps(InMemoryStateStore(), seed=7))
    picks = [a.choose(candidates, REQ).id for _ in range(20)]
    assert picks == [b.choose(candidates, REQ).id for _ in range(20)]
    assert len(set(picks)) > 1
    policy = RandomChoice(PolicyDeps(InMemoryStateStore(), seed=7))
    counts = Counter(policy.choose(candidates, REQ).id for _ in range(400))
    assert set(counts) == {c.id for c in candidates}
    assert all(60 < n < 140 for n in counts.values()), counts


def test_random_ignores_load() -> None:
    store = store_with({"w0": (1000, 10**6)})
    policy = RandomChoice(PolicyDeps(store, seed=1))
    assert "w0" in {policy.choose(cands(2), REQ).id for _ in range(50)}


# -- least loaded by tokens -------------------------------------------------------------------


def test_least_loaded_by_tokens_puts_tokens_first() -> None:
    store = store_with({"w0": (1, 9000), "w1": (5, 100), "w2": (3, 100), "w3": (0, 5000)})
    by_tokens = LeastLoaded(PolicyDeps(store, {"by": "tokens"}))
    by_requests = LeastLoaded(PolicyDeps(store, {"by": "requests"}))
    for _ in range(4):
        assert by_tokens.choose(cands(4), REQ).id == "w2"  # 100 tokens, fewer requests than w1
        assert by_requests.choose(cands(4), REQ).id == "w3"


def test_least_loaded_by_tokens_rotates_among_equal_tokens() -> None:
    store = store_with({"w0": (1, 10), "w1": (1, 10), "w2": (0, 50)})
    policy = LeastLoaded(PolicyDeps(store, {"by": "tokens"}))
    assert Counter(policy.choose(cands(3), REQ).id for _ in range(6)) == {"w0": 3, "w1": 3}


def test_least_loaded_rejects_an_unknown_dimension() -> None:
    with pytest.raises(ValueError, match="requests or tokens"):
        LeastLoaded(PolicyDeps(InMemoryStateStore(), {"by": "vibes"}))


# -- power of two -----------------------------------------------------------------------------


def test_power_of_two_picks_the_less_loaded_of_two() -> None:
    store = store_with({"w0": (5, 0), "w1": (2, 0)})
    policy = PowerOfTwo(PolicyDeps(store, seed=3))
    assert {policy.choose(cands(2), REQ).id for _ in range(30)} == {"w1"}


def test_power_of_two_single_candidate() -> None:
    policy = PowerOfTwo(PolicyDeps(InMemoryStateStore(), seed=3))
    assert policy.choose(cands(1), REQ).id == "w0"


@pytest.mark.parametrize("seed", [0, 1, 2, 99])
def test_power_of_two_never_picks_the_more_loaded_of_its_samples(seed: int) -> None:
    loads = {f"w{i}": (i % 4, (7 * i) % 5) for i in range(8)}
    store = store_with(loads)
    policy = PowerOfTwo(PolicyDeps(store, seed=seed))
    picks: Counter[str] = Counter()
    for _ in range(200):
        candidates = Recording(cands(8))
        pick = policy.choose(candidates, REQ)
        sampled = sorted(set(candidates.seen))
        assert len(sampled) == 2
        assert pick in [candidates[i] for i in sampled]
        others = [candidates[i] for i in sampled if candidates[i] != pick]
        assert len(others) == 1
        assert loads[pick.id] <= loads[others[0].id]
        picks[pick.id] += 1
    # The most loaded workers (requests 3) lose to almost everyone.
    assert picks["w3"] + picks["w7"] < picks["w0"] + picks["w4"]


def test_power_of_two_is_reproducible_with_a_seed() -> None:
    store = store_with({f"w{i}": (i % 3, 0) for i in range(6)})
    a = PowerOfTwo(PolicyDeps(store, seed=42))
    b = PowerOfTwo(PolicyDeps(store, seed=42))
    assert [a.choose(cands(6), REQ).id for _ in range(20)] == [
        b.choose(cands(6), REQ).id for _ in range(20)
    ]


# -- prefix aware -----------------------------------------------------------------------------


def test_prefix_aware_sends_a_shared_prefix_to_the_same_worker() -> None:
    store = store_with({"w0": (2, 0), "w1": (0, 0), "w2": (1, 0)})
    policy = PrefixAware(PolicyDeps(store))
    first = policy.choose(cands(3), prefix_req(LONG_A))
    assert first.id == "w1"  # no match yet: least loaded
    assert store.match_prefix(block_hashes(LONG_A)) == {"w1": 8}
    store.add_load("w1", 3, 0)  # now the busiest, but within the balance thresholds
    follow_up = policy.choose(cands(3), prefix_req(LONG_A + " and then some more text" * 20))
    assert follow_up.id == "w1"


def test_prefix_aware_sends_a_different_prefix_to_the_least_loaded() -> None:
    store = InMemoryStateStore()
    policy = PrefixAware(PolicyDeps(store))
    assert policy.choose(cands(3), prefix_req(LONG_A)).id == "w0"
    store.add_load("w0", 1, 0)
    store.add_load("w1", 2, 0)
    assert policy.choose(cands(3), prefix_req(LONG_B)).id == "w2"
    assert store.match_prefix(block_hashes(LONG_B)) == {"w2": 8}


def test_prefix_aware_prefers_the_longest_match() -> None:
    store = InMemoryStateStore()
    hashes = block_hashes(LONG_A)
    store.record_prefix(hashes[:2], "w0")
    store.record_prefix(hashes[:6], "w2")
    store.add_load("w2", 2, 0)
    policy = PrefixAware(PolicyDeps(store))
    assert policy.choose(cands(3), prefix_req(LONG_A)).id == "w2"


def test_prefix_aware_without_hashes_is_least_loaded_and_records_nothing() -> None:
    store = store_with({"w0": (4, 0), "w1": (1, 0)})
    policy = PrefixAware(PolicyDeps(store))
    assert policy.choose(cands(2), REQ).id == "w1"
    assert store.match_prefix(block_hashes(LONG_A)) == {}


@pytest.mark.parametrize(
    ("owner_load", "least_load", "stays"),
    [
        (8, 0, True),  # 8 above: not more than balance_abs_threshold (8)
        (9, 0, False),  # 9 above and more than 1.5 × 0
        (40, 30, True),  # 10 above, but not more than 1.5 × 30 = 45
        (46, 30, False),  # 16 above and more than 45
        (45, 30, True),  # exactly 1.5 ×: not more than
    ],
)
def test_prefix_aware_balance_thresholds(owner_load: int, least_load: int, stays: bool) -> None:
    store = InMemoryStateStore()
    store.record_prefix(block_hashes(LONG_A), "w0")
    store.add_load("w0", owner_load, 0)
    store.add_load("w1", least_load, 0)
    store.add_load("w2", least_load + 1, 0)
    policy = PrefixAware(PolicyDeps(store))
    pick = policy.choose(cands(3), prefix_req(LONG_A))
    assert pick.id == ("w0" if stays else "w1")
    if not stays:  # the fallback now holds the prefix too
        assert store.match_prefix(block_hashes(LONG_A)) == {"w0": 8, "w1": 8}


def test_prefix_aware_thresholds_come_from_options() -> None:
    store = InMemoryStateStore()
    store.record_prefix(block_hashes(LONG_A), "w0")
    store.add_load("w0", 3, 0)
    strict = PrefixAware(
        PolicyDeps(store, {"balance_abs_threshold": 2, "balance_rel_threshold": 1.0})
    )
    assert (strict.balance_abs, strict.balance_rel) == (2.0, 1.0)
    assert strict.choose(cands(2), prefix_req(LONG_A)).id == "w1"
    lenient_store = InMemoryStateStore()
    lenient = PrefixAware(PolicyDeps(lenient_store, {"balance_abs_threshold": 100}))
    lenient_store.record_prefix(block_hashes(LONG_A), "w0")
    lenient_store.add_load("w0", 50, 0)
    assert lenient.choose(cands(2), prefix_req(LONG_A)).id == "w0"


def test_prefix_aware_rejects_non_numeric_options() -> None:
    with pytest.raises(ValueError, match="balance_abs_threshold"):
        PrefixAware(PolicyDeps(InMemoryStateStore(), {"balance_abs_threshold": "lots"}))


# -- slo aware --------------------------------------------------------------------------------


def slo_req(target: float | None) -> RouteRequest:
    return RouteRequest("r", prompt_tokens=1000, ttft_target_s=target)


def test_slo_aware_picks_the_lowest_estimate() -> None:
    candidates = [Cand("w0", 0.5), Cand("w1", 0.1), Cand("w2", 0.3)]
    policy = SloAware(PolicyDeps(InMemoryStateStore()))
    assert policy.choose(candidates, slo_req(1.0)).id == "w1"
    assert policy.choose(candidates, slo_req(None)).id == "w1"


def test_slo_aware_breaks_ties_by_load() -> None:
    store = store_with({"w0": (3, 0), "w1": (1, 0)})
    policy = SloAware(PolicyDeps(store))
    assert policy.choose([Cand("w0", 0.2), Cand("w1", 0.2)], slo_req(1.0)).id == "w1"


def test_slo_aware_refuses_when_no_worker_meets_the_target() -> None:
    candidates = [Cand("w0", 5.0), Cand("w1", 3.5)]
    policy = SloAware(PolicyDeps(InMemoryStateStore()))
    with pytest.raises(Overloaded) as info:
        policy.choose(candidates, slo_req(1.0))
    exc = info.value
    assert exc.reason == "slo_unattainable"
    assert exc.status == 429
    assert exc.retry_after_s == pytest.approx(2.5)  # best estimate − target
    assert exc.headers() == {"Retry-After": "3"}
    assert "3.500" in exc.message
    # Exactly at the target is still attainable.
    assert policy.choose(candidates, slo_req(3.5)).id == "w1"


def test_slo_aware_retry_after_is_at_least_one_second() -> None:
    policy = SloAware(PolicyDeps(InMemoryStateStore()))
    with pytest.raises(Overloaded) as info:
        policy.choose([Cand("w0", 0.02)], slo_req(0.01))
    assert info.value.retry_after_s == 1.0


def test_slo_aware_ranks_unknown_estimates_last() -> None:
    store = store_with({"w1": (9, 0)})
    policy = SloAware(PolicyDeps(store))
    candidates = [Cand("w0", None), Cand("w1", 0.9), Cand("w2", None)]
    assert policy.choose(candidates, slo_req(1.0)).id == "w1"
    # The only estimate misses the target: refused, even though unknowns exist.
    with pytest.raises(Overloaded):
        policy.choose(candidates, slo_req(0.5))


def test_slo_aware_with_no_estimates_picks_the_least_loaded() -> None:
    store = store_with({"w0": (2, 0), "w1": (1, 0), "w2": (4, 0)})
    policy = SloAware(PolicyDeps(store))
    candidates = [Cand("w0"), Cand("w1"), Cand("w2")]
    assert policy.choose(candidates, slo_req(0.001)).id == "w1"


# -- properties -------------------------------------------------------------------------------

loads = st.tuples(st.integers(0, 6), st.integers(0, 5000))
estimates = st.one_of(st.none(), st.floats(0, 10, allow_nan=False))


@settings(max_examples=300, database=None, deadline=None)
@given(
    policy_name=st.sampled_from(sorted(POLICIES)),
    data=st.lists(st.tuples(loads, estimates), min_size=1, max_size=8),
    texts=st.lists(st.sampled_from(["", LONG_A, LONG_B, LONG_A[:700] + "x" * 600]), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_every_policy_returns_a_candidate(
    policy_name: str,
    data: list[tuple[tuple[int, int], float | None]],
    texts: list[str],
    seed: int,
) -> None:
    store = InMemoryStateStore()
    candidates = [Cand(f"w{i}", est) for i, (_, est) in enumerate(data)]
    for c, ((requests, tokens), _) in zip(candidates, data, strict=True):
        store.add_load(c.id, requests, tokens)
    policy = make_policy(policy_name, PolicyDeps(store, seed=seed))
    for i, text in enumerate([*texts, LONG_A]):
        request = RouteRequest(
            f"r{i}", prompt_tokens=len(text) // 4 + 1, block_hashes=block_hashes(text)
        )
        pick = policy.choose(candidates, request)
        assert pick in candidates
        policy.on_request_done(pick.id, request)
