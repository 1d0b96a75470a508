"""Routing policies: choose one worker among pre-filtered candidates.

Prefill and decode pools each get their own instance. The dispatcher calls only this
protocol; it never looks at which policy it holds. Policies are chosen by name in config
(:data:`POLICIES`, options from ``policy_options``) and read shared state through the
``StateStore`` only.

============== =================================================================================
round_robin    each candidate in turn
random         uniformly at random
least_loaded   fewest outstanding requests (``by: tokens``: fewest outstanding tokens)
power_of_two   the less loaded of two random candidates
prefix_aware   the worker holding the longest prefix of the prompt's KV, unless that would pile
               load onto it (balance thresholds); else the least loaded
slo_aware      lowest predicted TTFT from each worker's device model and queue; 429 at once if
               no worker can meet the request's TTFT target
============== =================================================================================

Example::

    policy = make_policy("least_loaded", PolicyDeps(store=InMemoryStateStore()))
    worker = policy.choose(pool.candidates(), RouteRequest("req-1", prompt_tokens=900))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from backends.frozen import fast_init
from gateway.state import StateStore


@fast_init
@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a policy may know of a request."""

    request_id: str
    prompt_tokens: int
    max_tokens: int = 0
    block_hashes: tuple[int, ...] = ()
    ttft_target_s: float | None = None


class Candidate(Protocol):
    @property
    def id(self) -> str: ...

    def estimate_prefill_s(self, prompt_tokens: int) -> float | None: ...


C = TypeVar("C", bound=Candidate)

Options = Mapping[str, float | int | str | bool]


@dataclass(frozen=True)
class PolicyDeps:
    store: StateStore
    options: Options = field(default_factory=dict)
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


class PolicyError(ValueError):
    """Bad policy options (reported as a config error)."""


def option(options: Options, name: str, default: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(f"option '{name}' must be a number, got {value!r}")
    return float(value)


def _registry() -> dict[str, Callable[[PolicyDeps], Policy]]:
    from gateway.policies.basic import RandomChoice, RoundRobin
    from gateway.policies.load import LeastLoaded, PowerOfTwo
    from gateway.policies.prefix import PrefixAware
    from gateway.policies.slo import SloAware

    return {
        "round_robin": RoundRobin,
        "random": RandomChoice,
        "least_loaded": LeastLoaded,
        "power_of_two": PowerOfTwo,
        "prefix_aware": PrefixAware,
        "slo_aware": SloAware,
    }


POLICIES: dict[str, Callable[[PolicyDeps], Policy]] = _registry()


def make_policy(name: str, deps: PolicyDeps) -> Policy:
    return POLICIES[name](deps)
