"""Policies that ignore load: round-robin and random."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from gateway.policies import C, PolicyBase, PolicyDeps, RouteRequest


class RoundRobin(PolicyBase):
    """Each candidate in turn."""

    def __init__(self, deps: PolicyDeps) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[C], request: RouteRequest) -> C:
        return candidates[next(self._counter) % len(candidates)]


class RandomChoice(PolicyBase):
    """Uniformly at random (seeded when ``PolicyDeps.seed`` is set)."""

    def __init__(self, deps: PolicyDeps) -> None:
        self._rng = random.Random(deps.seed)

    def choose(self, candidates: Sequence[C], request: RouteRequest) -> C:
        return candidates[self._rng.randrange(len(candidates))]
