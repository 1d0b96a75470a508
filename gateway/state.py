"""``StateStore``: where load counters live — this process (default) or shared by replicas.

The hot path never waits on it: ``add_load`` and ``load`` are synchronous and answer from the
store's local view. A shared implementation syncs that view in the background (batched, with
leases), so a slow or missing backing store degrades sharing, never requests.

Example::

    store = InMemoryStateStore()
    store.add_load("decode-0", requests=1, tokens=900)
    store.load("decode-0")        # WorkerLoad(requests=1, tokens=900)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    requests: int = 0
    tokens: int = 0


class StateStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def add_load(self, worker_id: str, requests: int, tokens: int) -> None: ...

    def load(self, worker_id: str) -> WorkerLoad: ...


class InMemoryStateStore:
    """Load counters of this process only."""

    def __init__(self) -> None:
        self._loads: dict[str, WorkerLoad] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def add_load(self, worker_id: str, requests: int, tokens: int) -> None:
        cur = self._loads.get(worker_id, _ZERO)
        self._loads[worker_id] = WorkerLoad(cur.requests + requests, cur.tokens + tokens)

    def load(self, worker_id: str) -> WorkerLoad:
        return self._loads.get(worker_id, _ZERO)


_ZERO = WorkerLoad()
