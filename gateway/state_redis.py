"""``RedisStateStore``: load, prefix index and circuit state shared by gateway replicas.

The hot path never waits on Redis. Every call is answered from a local view; a background task
reconciles that view with Redis every ``sync_interval_s`` in two pipelined round trips:

* **Load.** Each replica writes a snapshot of *its own* in-flight requests and tokens per worker
  to ``{prefix}:load:{replica}`` with a lease (``PEXPIRE lease_s``), heartbeats into
  ``{prefix}:replicas``, and reads the other live replicas' snapshots. A worker's load is this
  replica's own count plus the others' last snapshot. A crashed replica stops renewing its lease,
  so its counts expire instead of sticking.
* **Prefix index.** ``record_prefix`` is appended to a capped stream ``{prefix}:prefix``; each
  replica applies the others' entries to its local index, so ``prefix_aware`` on one replica
  sees prefixes routed by another.
* **Circuit state.** A breaker opening on one replica sets ``{prefix}:circuit:{worker}`` for the
  cooldown; the others treat that worker as open until it expires.

Redis slow or down: each round trip times out after ``op_timeout_s``; the store then serves
local state only (other replicas' counts are dropped once they are older than a lease), logs
the outage once, counts it (:attr:`failures`), keeps retrying, and resumes sharing when Redis
answers again. The prefixes and open circuits recorded meanwhile, or in a round that failed,
are published then (the newest 10,000 prefixes), so no other replica misses one. No request
waits for, or fails because of, Redis.

Example::

    store = RedisStateStore(redis_client("redis://127.0.0.1:6379/0", 0.05), replica_id="gw-a")
    await store.start()
    store.add_load("llama/decode-0", requests=1, tokens=1200)
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT

from gateway.state import InMemoryStateStore, StoreStatus, WorkerLoad

# What a Redis call raises while the server is away: the client's own errors, socket errors,
# timeouts, and RuntimeError from uvloop when the client writes to a connection the server has
# just closed (redis-py does not check the transport first). Every caller falls back to local
# state on these; the calls guarded by it are Redis calls only.
REDIS_DOWN: tuple[type[Exception], ...] = (RedisError, OSError, TimeoutError, RuntimeError)

log = logging.getLogger("pdgate.state")

_EVENTS_MAXLEN = 100_000
# Prefix records held for the next sync round while Redis is away (the newest are kept).
_PENDING_MAX = 10_000


def redis_client(url: str, op_timeout_s: float) -> aioredis.Redis:
    """A pooled client whose every operation gives up after ``op_timeout_s``."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=op_timeout_s,
        socket_connect_timeout=op_timeout_s,
        retry_on_timeout=False,
    )


class RedisStateStore:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        replica_id: str | None = None,
        key_prefix: str = "pdgate",
        sync_interval_s: float = 0.05,
        lease_s: float = 10.0,
        op_timeout_s: float = 0.05,
    ) -> None:
        self._client = client
        self.replica_id = replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self._p = key_prefix
        self.sync_interval_s = sync_interval_s
        self.lease_s = lease_s
        self.op_timeout_s = op_timeout_s
        self._local = InMemoryStateStore()
        self._others: dict[str, WorkerLoad] = {}
        self._others_at = 0.0  # monotonic time of the last good read of the others' counts
        self._pending_prefix: list[tuple[Sequence[int], str]] = []
        self._pending_circuit: dict[str, float] = {}
        self._open_elsewhere: set[str] = set()
        self._known: set[str] = set()
        self._last_event = "0-0"
        self.up = False
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- StateStore (synchronous, local view) ------------------------------------------------

    def add_load(self, worker_id: str, requests: int, tokens: int) -> None:
        self._local.add_load(worker_id, requests, tokens)
        self._known.add(worker_id)

    def load(self, worker_id: str) -> WorkerLoad:
        mine = self._local.load(worker_id)
        other = self._others.get(worker_id)
        if other is None:
            return mine
        return WorkerLoad(mine.requests + other.requests, mine.tokens + other.tokens)

    def record_prefix(self, block_hashes: Sequence[int], worker_id: str) -> None:
        self._local.record_prefix(block_hashes, worker_id)
        if block_hashes:
            self._pending_prefix.append((block_hashes, worker_id))

    def match_prefix(self, block_hashes: Sequence[int]) -> Mapping[str, int]:
        return self._local.match_prefix(block_hashes)

    def register_workers(self, worker_ids: Iterable[str]) -> None:
        self._known.update(worker_ids)

    def set_circuit_open(self, worker_id: str, seconds: float) -> None:
        self._pending_circuit[worker_id] = seconds

    def circuit_open(self, worker_id: str) -> bool:
        return worker_id in self._open_elsewhere

    def status(self) -> StoreStatus:
        return StoreStatus(shared=True, up=self.up, failures=self.failures)

    @property
    def syncing(self) -> bool:
        """Whether the background sync task is alive."""
        return self._task is not None and not self._task.done()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="state-sync")

    async def close(self) -> None:
        """Stop syncing and withdraw this replica's counts; returns within ``4 · op_timeout_s``
        plus one sync round, whatever Redis or its client does with the cancellation."""
        self._closing = True
        budget = self.op_timeout_s * 4
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=budget + self.sync_interval_s)
        try:  # leave nothing behind for the others to count
            async with asyncio.timeout(budget):
                await self._client.delete(self._key("load", self.replica_id))
        except REDIS_DOWN:
            pass

    # -- sync ----------------------------------------------------------------------------

    async def _run(self) -> None:
        task = asyncio.current_task()
        while not self._closing:
            try:
                async with asyncio.timeout(self.op_timeout_s * 4):
                    await self._sync()
                if not self.up:
                    log.info("shared state: connected to Redis, sharing with other replicas")
                self.up = True
            except REDIS_DOWN as exc:
                # redis-py may turn a cancellation that lands mid-command into a connection
                # error; a task being cancelled must still stop, not retry as if Redis were down.
                if self._closing or (task is not None and task.cancelling()):
                    raise asyncio.CancelledError from exc
                self._note_outage(exc)
            await asyncio.sleep(self.sync_interval_s)

    def _note_outage(self, exc: BaseException) -> None:
        self.failures += 1
        if self.up or self.failures == 1:
            log.warning("shared state: Redis unavailable (%s); serving local state", exc)
        self.up = False
        if time.monotonic() - self._others_at > self.lease_s:
            self._others.clear()
            self._open_elsewhere.clear()

    def _key(self, *parts: str) -> str:
        return ":".join((self._p, *parts))

    async def _sync(self) -> None:
        prefix, self._pending_prefix = self._pending_prefix, []
        circuit, self._pending_circuit = self._pending_circuit, {}
        try:
            others = await self._exchange(prefix, circuit)
        except BaseException:
            # Not known to be published (Redis down, the round trip timed out or was
            # cancelled): kept for the next round, ahead of what was recorded since. Publishing
            # one twice is harmless (the index is a set, a circuit key is overwritten); losing
            # one is not: another replica would never see that prefix or open circuit. A long
            # outage keeps the newest _PENDING_MAX prefixes.
            self._pending_prefix[:0] = prefix
            del self._pending_prefix[:-_PENDING_MAX]
            for worker, seconds in circuit.items():
                self._pending_circuit.setdefault(worker, seconds)
            raise
        await self._read_others(others)

    async def _exchange(
        self, prefix: list[tuple[Sequence[int], str]], circuit: dict[str, float]
    ) -> list[str]:
        """The first round trip: publish this replica's load, prefixes and circuits; apply the
        others' prefixes and circuits. Returns the other live replicas."""
        now = time.time()
        lease_ms = int(self.lease_s * 1000)
        mine = {w: self._local.load(w) for w in self._known}
        known = sorted(self._known)
        pipe = self._client.pipeline(transaction=False)
        load_key = self._key("load", self.replica_id)
        busy: dict[EncodableT, EncodableT] = {
            w: f"{v.requests},{v.tokens}" for w, v in mine.items() if v.requests or v.tokens
        }
        pipe.delete(load_key)
        if busy:
            pipe.hset(load_key, mapping=busy)
            pipe.pexpire(load_key, lease_ms)
        replicas = self._key("replicas")
        pipe.zadd(replicas, {self.replica_id: now})
        pipe.zremrangebyscore(replicas, "-inf", now - self.lease_s)
        pipe.zrange(replicas, 0, -1)
        at_live = len(pipe) - 1
        for hashes, worker in prefix:
            packed = struct.pack(f">{len(hashes)}q", *hashes)
            fields: dict[EncodableT, EncodableT] = {"r": self.replica_id, "w": worker, "h": packed}
            pipe.xadd(self._key("prefix"), fields, maxlen=_EVENTS_MAXLEN, approximate=True)
        pipe.xrange(self._key("prefix"), min=f"({self._last_event}", count=10_000)
        at_events = len(pipe) - 1
        for worker, seconds in circuit.items():
            pipe.set(self._key("circuit", worker), self.replica_id, px=max(1, int(seconds * 1000)))
        if known:
            pipe.mget([self._key("circuit", w) for w in known])
        results = await pipe.execute()
        open_by = results[-1] if known else []
        live, events = results[at_live], results[at_events]
        self._apply_events(events)
        self._open_elsewhere = {
            w
            for w, who in zip(known, open_by, strict=True)
            if who and who.decode() != self.replica_id
        }
        return [r.decode() for r in live if r.decode() != self.replica_id]

    def _apply_events(self, events: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for event_id, fields in events:
            self._last_event = event_id.decode()
            if fields.get(b"r", b"").decode() == self.replica_id:
                continue
            packed = fields.get(b"h", b"")
            hashes = struct.unpack(f">{len(packed) // 8}q", packed)
            self._local.record_prefix(hashes, fields.get(b"w", b"").decode())

    async def _read_others(self, replicas: list[str]) -> None:
        others: dict[str, WorkerLoad] = {}
        if replicas:
            pipe = self._client.pipeline(transaction=False)
            for r in replicas:
                pipe.hgetall(self._key("load", r))
            for snapshot in await pipe.execute():
                for worker, value in snapshot.items():
                    req, tok = (int(x) for x in value.decode().split(","))
                    cur = others.get(worker.decode(), WorkerLoad())
                    others[worker.decode()] = WorkerLoad(cur.requests + req, cur.tokens + tok)
        self._others = others
        self._others_at = time.monotonic()
