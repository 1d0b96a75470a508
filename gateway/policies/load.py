"""Load-based policies: least-loaded and power-of-two choices."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from gateway.policies import C, Candidate, PolicyBase, PolicyDeps, PolicyError, RouteRequest
from gateway.state import StateStore


class LeastLoaded(PolicyBase):
    """Fewest outstanding requests, then tokens (``by: tokens`` swaps them); ties rotate."""

    def __init__(self, deps: PolicyDeps) -> None:
        by = str(deps.options.get("by", "requests"))
        if by not in ("requests", "tokens"):
            raise PolicyError(f"least_loaded: 'by' must be requests or tokens, not {by!r}")
        self._store = deps.store
        self._by = by
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[C], request: RouteRequest) -> C:
        tokens_first = self._by == "tokens"
        load = self._store.load
        low: tuple[int, int] | None = None
        tied: list[C] = []
        for c in candidates:  # one pass: every request is routed through here
            w = load(c.id)
            k = (w.tokens, w.requests) if tokens_first else (w.requests, w.tokens)
            if low is None or k < low:
                low, tied = k, [c]
            elif k == low:
                tied.append(c)
        if not tied:
            raise ValueError("no candidates to choose from")
        return tied[next(self._counter) % len(tied)]


def _key(store: StateStore, c: Candidate, tokens_first: bool) -> tuple[int, int]:
    load = store.load(c.id)
    return (load.tokens, load.requests) if tokens_first else (load.requests, load.tokens)


class PowerOfTwo(PolicyBase):
    """Two candidates at random; the one with fewer outstanding requests (then tokens)."""

    def __init__(self, deps: PolicyDeps) -> None:
        self._store = deps.store
        self._rng = random.Random(deps.seed)

    def choose(self, candidates: Sequence[C], request: RouteRequest) -> C:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(range(len(candidates)), 2)
        ca, cb = candidates[a], candidates[b]
        return ca if _key(self._store, ca, False) <= _key(self._store, cb, False) else cb
