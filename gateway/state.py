"""``StateStore``: where load counters live — this process (default) or shared by replicas.

The hot path never waits on it: ``add_load`` and ``load`` are synchronous and answer from the
store's local view. A shared implementation syncs that view in the background (batched, with
leases), so a slow or missing backing store degrades sharing, never requests.

Example::

    store = InMemoryStateStore()
    store.add_load("decode-0", requests=1, tokens=900)
    store.load("decode-0")        # WorkerLoad(requests=1, tokens=900)
    store.record_prefix([h0, h1], "decode-0")
    store.match_prefix([h0, h1, h2])   # {"decode-0": 2}
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from backends.frozen import fast_init


@fast_init
@dataclass(frozen=True, slots=True)
class WorkerLoad:
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class StoreStatus:
    shared: bool  # backed by something other replicas see
    up: bool  # the backing store answers (always True for local state)
    failures: int  # sync attempts that failed so far (each means: served local state)


class StateStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def add_load(self, worker_id: str, requests: int, tokens: int) -> None: ...

    def load(self, worker_id: str) -> WorkerLoad: ...

    def record_prefix(self, block_hashes: Sequence[int], worker_id: str) -> None:
        """Remember that ``worker_id`` now holds KV for these (chained) prefix blocks."""
        ...

    def match_prefix(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        """For each worker known to hold some of these blocks: how many leading blocks."""
        ...

    def register_workers(self, worker_ids: Iterable[str]) -> None:
        """The workers whose shared state (e.g. circuit) this replica should follow."""
        ...

    def set_circuit_open(self, worker_id: str, seconds: float) -> None:
        """This replica opened the worker's circuit for ``seconds``."""
        ...

    def circuit_open(self, worker_id: str) -> bool:
        """Has *another* replica opened this worker's circuit (still within its cooldown)?"""
        ...

    def status(self) -> StoreStatus: ...


class InMemoryStateStore:
    """Load counters and the prefix index of this process only.

    The prefix index maps a chained block hash to the workers that hold it, least recently
    used first out beyond ``max_prefix_blocks``. Because hash ``i`` covers blocks ``0..i``, a
    worker holding hash ``i`` holds the whole prefix up to it.
    """

    def __init__(self, *, max_prefix_blocks: int = 200_000) -> None:
        self._loads: dict[str, WorkerLoad] = {}
        self._prefix: OrderedDict[int, set[str]] = OrderedDict()
        self._max_prefix = max_prefix_blocks

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def add_load(self, worker_id: str, requests: int, tokens: int) -> None:
        cur = self._loads.get(worker_id, _ZERO)
        self._loads[worker_id] = WorkerLoad(cur.requests + requests, cur.tokens + tokens)

    def load(self, worker_id: str) -> WorkerLoad:
        return self._loads.get(worker_id, _ZERO)

    def record_prefix(self, block_hashes: Sequence[int], worker_id: str) -> None:
        index = self._prefix
        for h in block_hashes:
            owners = index.get(h)
            if owners is None:
                index[h] = {worker_id}
            else:
                owners.add(worker_id)
                index.move_to_end(h)
        while len(index) > self._max_prefix:
            index.popitem(last=False)

    def match_prefix(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        matched: dict[str, int] = {}
        for i, h in enumerate(block_hashes):
            for worker in self._prefix.get(h, ()):
                matched[worker] = i + 1
        return matched

    def register_workers(self, worker_ids: Iterable[str]) -> None:
        return None

    def set_circuit_open(self, worker_id: str, seconds: float) -> None:
        return None

    def circuit_open(self, worker_id: str) -> bool:
        return False

    def status(self) -> StoreStatus:
        return StoreStatus(shared=False, up=True, failures=0)


_ZERO = WorkerLoad()
