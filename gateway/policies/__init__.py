"""Routing policies: choose one worker among pre-filtered candidates.

Prefill and decode pools each get their own instance. The dispatcher calls only this
protocol; it never looks at which policy it holds. Policies are chosen by name in config
(:data:`POLICIES`) and read shared load through the ``StateStore`` only.

Example::

    policy = make_policy("least_loaded", PolicyDeps(store=InMemoryStateStore()))
    worker = policy.choose(pool.candidates(), RouteRequest("req-1", prompt_tokens=900))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from gateway.state import StateStore


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a policy may know of a request."""

    request_id: str
    prompt_tokens: int
    max_tokens: int = 0


class Candidate(Protocol):
    @property
    def id(self) -> str: ...


C = TypeVar("C", bound=Candidate)


@dataclass(frozen=True)
class PolicyDeps:
    store: StateStore
    seed: int | None = None


class Policy(Protocol):
    def choose(self, candidates: Sequence[C], request: RouteRequest) -> C: ...

    def on_worker_added(self, worker_id: str) -> None: ...

    def on_worker_removed(self, worker_id: str) -> None: ...

    def on_request_done(self, worker_id: str, request: RouteRequest) -> None: ...


class PolicyBase:
    """No-op lifecycle hooks for policies that keep no per-worker state."""

    def on_worker_added(self, worker_id: str) -> None:
        return None

    def on_worker_removed(self, worker_id: str) -> None:
        return None

    def on_request_done(self, worker_id: str, request: RouteRequest) -> None:
        return None


def _registry() -> dict[str, Callable[[PolicyDeps], Policy]]:
    from gateway.policies.basic import LeastLoaded, RoundRobin

    return {"round_robin": RoundRobin, "least_loaded": LeastLoaded}


POLICIES: dict[str, Callable[[PolicyDeps], Policy]] = _registry()


def make_policy(name: str, deps: PolicyDeps) -> Policy:
    return POLICIES[name](deps)
