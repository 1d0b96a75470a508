"""The first policies: round-robin and least-loaded."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from gateway.policies import C, Candidate, PolicyBase, PolicyDeps, RouteRequest


class RoundRobin(PolicyBase):
    """Each candidate in turn."""

    def __init__(self, deps: PolicyDeps) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[C], request: RouteRequest) -> C:
        return candidates[next(self._counter) % len(candidates)]


class LeastLoaded(PolicyBase):
    """Fewest outstanding requests, then fewest outstanding tokens; ties rotate."""

    def __init__(self, deps: PolicyDeps) -> None:
        self._store = deps.store
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[C], request: RouteRequest) -> C:
        n = len(candidates)
        offset = next(self._counter) % n
        best = candidates[offset]
        best_key = self._key(best)
        for i in range(1, n):
            c = candidates[(offset + i) % n]
            key = self._key(c)
            if key < best_key:
                best, best_key = c, key
        return best

    def _key(self, c: Candidate) -> tuple[int, int]:
        load = self._store.load(c.id)
        return load.requests, load.tokens
