"""Two `pdgate serve` processes sharing one real redis-server act as one gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import MODEL, config, pool, run_server, run_server_process
from tests.redis_proc import RedisServer, redis_server

pytestmark = pytest.mark.system

KEY = "sk-test-replicas-0001"
LIMITED = "sk-test-replicas-limited"


def replica_config(url: str, replica: str) -> dict[str, Any]:
    data = config(
        # Prefill slowed 20x so one request can still be prefilling while the next is routed.
        prefill=pool("h100-sxm", 2, policy="prefix_aware", time_scale=0.05),
        decode=pool("groq-lpu-v1", 2, policy="least_loaded"),
    )
    data["state"] = {
        "backend": "redis",
        "redis_url": url,
        "replica_id": replica,
        "sync_interval_s": 0.02,
        "lease_s": 1.0,
    }
    data["auth"] = {
        "api_keys": [
            {"name": "team-a", "key": KEY},
            {"name": "limited", "key": LIMITED, "requests_per_minute": 5},
        ]
    }
    return data


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def replicas(redis: RedisServer) -> Iterator[tuple[str, str]]:
    with (
        run_server(replica_config(redis.url, "gw-a")) as a,
        run_server(replica_config(redis.url, "gw-b")) as b,
    ):
        yield a, b


def body(max_tokens: int, content: str = "Hello") -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(check: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_least_loaded_on_one_replica_sees_load_from_the_other(
    replicas: tuple[str, str], redis: RedisServer
) -> None:
    a, b = replicas
    client = redis.client()
    with httpx.Client(timeout=30) as http:
        # A long decode on replica A (its first least-loaded choice: decode-0).
        with http.stream(
            "POST", a + "/v1/chat/completions", headers=auth(), json={**body(3000), "stream": True}
        ) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            wait_for(lambda: b"llama-3.1-8b/decode-0" in client.hgetall("pdgate:load:gw-a"))
            time.sleep(0.3)  # sync rounds (every 20 ms) for B to read A's snapshot
            # Alone, B's least-loaded would also pick decode-0; sharing, it sees A's stream.
            r = http.post(b + "/v1/chat/completions", headers=auth(), json=body(4))
            assert r.status_code == 200
        metrics = http.get(b + "/metrics", headers=auth()).text  # closed with keys on
    assert metric(metrics, "pdgate_routing_decisions_total", pool="decode", worker="decode-1") == 1
    assert metric(metrics, "pdgate_routing_decisions_total", pool="decode", worker="decode-0") == 0


async def test_prefix_aware_on_one_replica_sees_prefixes_routed_by_the_other(
    redis: RedisServer, replicas: tuple[str, str]
) -> None:
    a, b = replicas
    client = redis.client()
    busy = "an unrelated long document " * 300  # ~2,000 tokens: ~1.5 s of slowed prefill
    shared = "a system prompt both replicas will see " * 40  # several whole prefix blocks
    async with httpx.AsyncClient(timeout=30, headers=auth()) as http:
        # On A: while `busy` occupies prefill-0, `shared` goes to prefill-1 and is recorded.
        first = asyncio.create_task(http.post(a + "/v1/chat/completions", json=body(2, busy)))
        await asyncio.sleep(0.3)
        r = await http.post(a + "/v1/chat/completions", json=body(2, shared))
        assert r.status_code == 200
        assert (await first).status_code == 200
        metrics_a = (await http.get(a + "/metrics")).text
        assert (
            metric(metrics_a, "pdgate_routing_decisions_total", pool="prefill", worker="prefill-1")
            == 1
        )
        # A has published the prefix it routed to prefill-1; then a few of B's sync rounds.
        wait_for(
            lambda: any(
                f.get(b"r") == b"gw-a" and f.get(b"w", b"").endswith(b"prefill-1")
                for _, f in client.xrange("pdgate:prefix")
            )
        )
        await asyncio.sleep(0.3)
        # On B, both prefill workers are idle: alone it would pick prefill-0; sharing A's prefix
        # index, it sends the shared conversation where its KV is.
        r = await http.post(b + "/v1/chat/completions", json=body(2, shared))
        assert r.status_code == 200
        metrics_b = (await http.get(b + "/metrics")).text
    assert (
        metric(metrics_b, "pdgate_routing_decisions_total", pool="prefill", worker="prefill-1") == 1
    )


def test_rate_limit_holds_across_replicas(replicas: tuple[str, str]) -> None:
    a, b = replicas
    if 60 - time.time() % 60 < 3:  # don't straddle a one-minute window
        time.sleep(60 - time.time() % 60 + 0.1)
    codes = []
    with httpx.Client(timeout=30) as http:
        for i in range(8):
            url = (a, b)[i % 2]
            r = http.post(url + "/v1/chat/completions", headers=auth(LIMITED), json=body(2))
            codes.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["type"] == "rate_limit_error"
    assert codes == [200] * 5 + [429] * 3


def test_bad_key_is_401_and_never_logged(replicas: tuple[str, str]) -> None:
    a, _ = replicas
    with httpx.Client(timeout=30) as http:
        r = http.post(a + "/v1/chat/completions", headers=auth("sk-wrong-key-123"), json=body(2))
        missing = http.post(a + "/v1/chat/completions", json=body(2))
        health = http.get(a + "/health")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert "sk-wrong-key-123" not in r.text
    assert missing.status_code == 401
    assert health.status_code == 200  # probes stay open


async def _scrape(http: httpx.AsyncClient, url: str) -> str:
    """The replica's metrics (closed to callers without a key while API keys are on)."""
    return (await http.get(url + "/metrics", headers=auth())).text


async def test_redis_outage_fails_no_request_and_sharing_resumes(
    replicas: tuple[str, str], redis: RedisServer
) -> None:
    a, b = replicas

    async def one(http: httpx.AsyncClient, url: str) -> int:
        r = await http.post(url + "/v1/chat/completions", headers=auth(), json=body(8))
        return r.status_code

    async with httpx.AsyncClient(timeout=30) as http:
        load = [asyncio.create_task(one(http, (a, b)[i % 2])) for i in range(20)]
        await asyncio.sleep(0.05)
        redis.stop()  # Redis dies under load
        load += [asyncio.create_task(one(http, (a, b)[i % 2])) for i in range(20)]
        codes = await asyncio.gather(*load)
        assert codes == [200] * 40
        down = await _scrape(http, a)
        assert metric(down, "pdgate_state_store_up") == 0
        assert metric(down, "pdgate_state_store_fallbacks_total") > 0
        redis.start()
        deadline = time.monotonic() + 5
        while (
            metric((await http.get(a + "/metrics", headers=auth())).text, "pdgate_state_store_up")
            != 1
        ):
            assert time.monotonic() < deadline, "sharing did not resume"
            await asyncio.sleep(0.05)
        assert (await one(http, b)) == 200


def test_killed_replica_leaves_no_counts_after_its_lease(redis: RedisServer) -> None:
    client = redis.client()
    doomed = run_server_process(replica_config(redis.url, "gw-doomed"))
    with httpx.Client(timeout=30) as http, doomed as (c, proc):
        stream = http.stream(
            "POST", c + "/v1/chat/completions", headers=auth(), json={**body(4000), "stream": True}
        )
        with stream as s:
            lines = s.iter_lines()  # keep it referenced: dropping it closes the connection
            next(line for line in lines if line.startswith("data: "))
            wait_for(lambda: client.hgetall("pdgate:load:gw-doomed") != {})
            proc.kill()  # no clean shutdown: its counts stay in Redis until the lease ends
            proc.wait()
        snapshot = client.hgetall("pdgate:load:gw-doomed")
        assert snapshot  # still there right after the crash
        wait_for(lambda: client.exists("pdgate:load:gw-doomed") == 0, within=3.0)
