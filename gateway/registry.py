"""Workers and pools: who can serve what, and how much each is carrying right now.

In-flight counts change only inside :class:`InFlight` (a synchronous context manager, so no
await can slip between taking and returning a slot): errors, cancellations and client
disconnects all pass through ``__exit__``.

Example::

    with registry.in_flight(worker, tokens=1200):
        ...   # the leg runs; the count drops on every exit path
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from types import TracebackType

from backends.base import Backend
from gateway.admission import Limiter
from gateway.circuit import CircuitBreaker
from gateway.policies import Policy
from gateway.state import StateStore


@dataclass(eq=False)
class Worker:
    """One backend instance in one pool; ``id`` (``model/name``) is unique across models."""

    name: str
    model: str
    role: str
    backend: Backend
    breaker: CircuitBreaker
    in_flight: int = 0
    draining: bool = False
    # When it last produced something (a chunk, a prefill) for any leg: clock seconds. A
    # worker still producing for some request is busy, not stalled (see gateway.dispatch).
    last_progress: float = float("-inf")
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = f"{self.model}/{self.name}"

    def available(self) -> bool:
        return not self.draining and self.breaker.available() and self.backend.healthy()

    def progressing(self, now: float, within_s: float) -> bool:
        """Whether it produced something for any leg in the last ``within_s`` seconds."""
        return now - self.last_progress < within_s

    def estimate_prefill_s(self, prompt_tokens: int) -> float | None:
        return self.backend.estimate_prefill_s(prompt_tokens)


@dataclass(eq=False)
class Pool:
    """A model's workers in one role, with the policy and the admission limit they share."""

    model: str
    role: str
    policy: Policy
    limiter: Limiter
    policy_name: str = ""
    workers: list[Worker] = field(default_factory=list)

    def candidates(self, avoid: Collection[str] = ()) -> list[Worker]:
        """Available workers, without those in ``avoid`` unless that would leave none."""
        ready = [w for w in self.workers if w.available()]
        if avoid:
            fresh = [w for w in ready if w.id not in avoid]
            return fresh or ready
        return ready

    def add(self, worker: Worker) -> None:
        self.workers.append(worker)
        self.policy.on_worker_added(worker.id)

    def remove(self, worker: Worker) -> None:
        self.workers.remove(worker)
        self.policy.on_worker_removed(worker.id)


class InFlight:
    """Holds one request's slot (and its tokens) on a worker for the length of a ``with``."""

    __slots__ = ("_store", "_tokens", "_worker")

    def __init__(self, worker: Worker, tokens: int, store: StateStore) -> None:
        self._worker = worker
        self._tokens = tokens
        self._store = store

    def __enter__(self) -> Worker:
        self._change(+1)
        return self._worker

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._change(-1)

    def _change(self, sign: int) -> None:
        w = self._worker
        w.in_flight += sign
        self._store.add_load(w.id, sign, sign * self._tokens)


class WorkerRegistry:
    """All pools of all models, keyed by ``(model, role)``."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.pools: dict[tuple[str, str], Pool] = {}

    def add_pool(self, pool: Pool) -> None:
        self.pools[(pool.model, pool.role)] = pool

    def pool(self, model: str, role: str) -> Pool:
        return self.pools[(model, role)]

    def workers(self) -> Iterator[Worker]:
        for pool in self.pools.values():
            yield from pool.workers

    def in_flight(self, worker: Worker, tokens: int) -> InFlight:
        return InFlight(worker, tokens, self.store)

    async def start(self) -> None:
        await self.store.start()
        for w in self.workers():
            await w.backend.start()

    async def close(self) -> None:
        for w in self.workers():
            await w.backend.close()
        await self.store.close()
