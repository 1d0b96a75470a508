"""RedisStateStore against a real redis-server: two stores play two gateway replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from gateway.prefix import block_hashes
from gateway.state import WorkerLoad
from gateway.state_redis import RedisStateStore, redis_client
from tests.redis_proc import RedisServer, redis_server

SYNC = 0.02


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with redis_server() as s:
        yield s


class Replicas:
    """Stores for two replicas, each with its own Redis client, all closed at the end."""

    def __init__(self, server: RedisServer, lease_s: float) -> None:
        self.clients = [redis_client(server.url, 0.05) for _ in range(2)]
        self.a, self.b = (
            RedisStateStore(c, replica_id=name, sync_interval_s=SYNC, lease_s=lease_s)
            for c, name in zip(self.clients, ("gw-a", "gw-b"), strict=True)
        )

    async def start(self) -> None:
        for s in (self.a, self.b):
            s.register_workers(["m/decode-0", "m/decode-1"])
            await s.start()

    async def close(self) -> None:
        for s in (self.a, self.b):
            await s.close()
        for c in self.clients:
            await c.aclose()


@pytest.fixture
async def replicas(server: RedisServer) -> AsyncIterator[Replicas]:
    r = Replicas(server, lease_s=0.3)
    await r.start()
    yield r
    await r.close()


@pytest.fixture
def pair(replicas: Replicas) -> tuple[RedisStateStore, RedisStateStore]:
    return replicas.a, replicas.b


async def until(check: Callable[[], bool], within: float = 3.0) -> None:
    """Poll ``check`` until it holds (sync is periodic); fail after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(SYNC)


async def test_load_recorded_by_one_replica_is_seen_by_the_other(
    pair: tuple[RedisStateStore, RedisStateStore],
) -> None:
    a, b = pair
    a.add_load("m/decode-0", 2, 3000)
    await until(lambda: b.load("m/decode-0") == WorkerLoad(2, 3000))
    b.add_load("m/decode-0", 1, 100)
    assert b.load("m/decode-0") == WorkerLoad(3, 3100)  # own count is seen at once
    await until(lambda: a.load("m/decode-0") == WorkerLoad(3, 3100))
    a.add_load("m/decode-0", -2, -3000)
    await until(lambda: b.load("m/decode-0") == WorkerLoad(1, 100))
    assert a.status().up
    assert b.status().shared


async def test_prefix_index_is_shared(pair: tuple[RedisStateStore, RedisStateStore]) -> None:
    a, b = pair
    hashes = block_hashes("a long shared system prompt " * 100)
    assert len(hashes) > 4
    a.record_prefix(hashes, "m/decode-1")
    await until(lambda: b.match_prefix(hashes).get("m/decode-1") == len(hashes))
    longer = block_hashes("a long shared system prompt " * 100 + "and a new question " * 40)
    assert b.match_prefix(longer)["m/decode-1"] == len(hashes)  # the shared leading blocks


async def test_circuit_opened_by_one_replica_is_open_on_the_other(
    pair: tuple[RedisStateStore, RedisStateStore],
) -> None:
    a, b = pair
    a.set_circuit_open("m/decode-1", 0.3)
    await until(lambda: b.circuit_open("m/decode-1"))
    assert not a.circuit_open("m/decode-1")  # the opener runs its own breaker
    await until(lambda: not b.circuit_open("m/decode-1"))  # expires with the cooldown


async def test_crashed_replica_counts_expire_after_the_lease(
    server: RedisServer, replicas: Replicas
) -> None:
    a, b = replicas.a, replicas.b
    a.add_load("m/decode-0", 4, 400)
    await until(lambda: b.load("m/decode-0").requests == 4)
    assert a._task is not None
    a._task.cancel()  # the replica dies: no clean shutdown, no more lease renewals
    await asyncio.gather(a._task, return_exceptions=True)
    await until(lambda: b.load("m/decode-0").requests == 0, within=2.0)
    assert server.client().exists("pdgate:load:gw-a") == 0


async def test_redis_outage_falls_back_to_local_state_and_recovers(
    server: RedisServer, replicas: Replicas
) -> None:
    a, b = replicas.a, replicas.b
    b.add_load("m/decode-0", 5, 0)
    await until(lambda: a.load("m/decode-0").requests == 5)
    server.stop()
    a.add_load("m/decode-0", 1, 0)  # the hot path keeps working without Redis
    assert a.load("m/decode-0").requests >= 1
    await until(lambda: not a.status().up)
    assert a.status().failures > 0
    # Once the others' counts are older than a lease, only local state is served.
    await until(lambda: a.load("m/decode-0").requests == 1)
    server.start()
    await until(lambda: a.status().up and a.load("m/decode-0").requests == 6)


async def test_prefixes_and_circuits_recorded_during_an_outage_reach_the_others(
    server: RedisServer, replicas: Replicas
) -> None:
    """A round that fails keeps what it was to publish: once Redis answers again the other
    replica sees the prefix and the open circuit recorded while it was away."""
    a, b = replicas.a, replicas.b
    await until(lambda: a.status().up and b.status().up)
    server.stop()
    await until(lambda: not a.status().up)
    hashes = block_hashes("a prompt routed while Redis was away " * 40)
    a.record_prefix(hashes, "m/decode-1")
    a.set_circuit_open("m/decode-0", 3.0)
    failures = a.status().failures
    await until(lambda: a.status().failures >= failures + 2)  # rounds that carried them failed
    assert b.match_prefix(hashes) == {}
    server.start()
    await until(lambda: b.match_prefix(hashes).get("m/decode-1") == len(hashes))
    await until(lambda: b.circuit_open("m/decode-0"))
    assert a.match_prefix(hashes)["m/decode-1"] == len(hashes)  # its own, served locally


@pytest.mark.parametrize("interval", [0.0, SYNC])
async def test_close_ends_the_sync_task_even_mid_command(
    server: RedisServer, interval: float
) -> None:
    """A cancellation that lands inside a Redis command must end the loop, not look like an
    outage to retry (redis-py 8 raises its own error there): close() returns, the task is done."""
    client = redis_client(server.url, 0.05)
    store = RedisStateStore(client, replica_id="gw-c", sync_interval_s=interval)
    store.register_workers(["m/decode-0"])
    await store.start()
    await until(lambda: store.up)
    for _ in range(5):  # land the cancellation at different points of the sync round
        await asyncio.sleep(0.003)
    async with asyncio.timeout(2.0):
        await store.close()
    assert not store.syncing
    await client.aclose()
