"""Workers added at run time (``POST /admin/workers``) are assembled like those of the config:
their circuit breakers publish to and follow the shared state in Redis, they are registered
with the state store, and the model's context limit accounts for their KV cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from gateway.circuit import CircuitState
from gateway.state_redis import RedisStateStore, redis_client
from tests.helpers import MODEL, app_client, config, gateway_of, settings
from tests.integration.conftest import CHAT, assert_error, chat_body
from tests.redis_proc import RedisServer, redis_server

SYNC = 0.02
ADMIN = {"Authorization": "Bearer s3cret-admin"}
# An H100 that leaves a quarter of its memory to the engine: ~30k tokens of KV for Llama 3.1
# 8B, below the 67k the config's LPU decode instances hold.
SMALL = {"device": "h100-sxm", "engine": {"gpu_memory_utilization": 0.25}}


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with redis_server() as s:
        yield s


@pytest.fixture
async def other_replica(server: RedisServer) -> AsyncIterator[RedisStateStore]:
    """A second gateway replica's view of the shared state."""
    client = redis_client(server.url, 0.05)
    store = RedisStateStore(client, replica_id="gw-other", sync_interval_s=SYNC, lease_s=5.0)
    yield store
    await store.close()
    await client.aclose()


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(SYNC)


@pytest.mark.timeout(60)
async def test_a_worker_added_at_run_time_shares_circuit_state_and_caps_the_context(
    server: RedisServer, other_replica: RedisStateStore
) -> None:
    data = config()
    data["admin"] = {"api_key": "s3cret-admin"}
    data["state"] = {"backend": "redis", "redis_url": server.url, "sync_interval_s": SYNC}
    async with app_client(settings(data)) as (app, c):
        gw = gateway_of(app)
        before = gw.models[MODEL].max_context
        added = await c.post(
            "/admin/workers",
            json={"model": MODEL, "role": "decode", "worker": SMALL},
            headers=ADMIN,
        )
        assert added.status_code == 201, added.text
        new_id = added.json()["workers"][0]["id"]
        assert added.json()["workers"][0]["type"] == "emulated"
        worker = next(w for w in gw.registry.workers() if w.id == new_id)

        # The model's limit now fits the new worker's KV cache: a prompt that fitted before
        # is refused up front instead of failing on that worker.
        capacity = worker.backend.capacity_tokens()
        assert capacity is not None
        assert capacity < before
        assert gw.models[MODEL].max_context == capacity
        resp = await c.post(CHAT, json=chat_body("abcd" * capacity, max_tokens=4))
        assert_error(resp, 400, param="messages")

        # Opened by another replica: this replica's breaker follows.
        other_replica.register_workers([new_id])
        await other_replica.start()
        other_replica.set_circuit_open(new_id, 30.0)
        await until(lambda: worker.breaker.state is CircuitState.OPEN)
        listed = (await c.get("/admin/workers", headers=ADMIN)).json()["workers"]
        assert next(w for w in listed if w["id"] == new_id)["available"] is False

        # Opened here: the other replica hears of it.
        second = await c.post(
            "/admin/workers",
            json={"model": MODEL, "role": "decode", "worker": {"device": "groq-lpu-v1"}},
            headers=ADMIN,
        )
        second_id = second.json()["workers"][0]["id"]
        other_replica.register_workers([second_id])
        breaker = next(w for w in gw.registry.workers() if w.id == second_id).breaker
        for _ in range(breaker.failure_threshold):
            breaker.record(ok=False)
        await until(lambda: other_replica.circuit_open(second_id))
