"""Failure behaviour of `pdgate serve` in front of real `pdgate backend` processes (vLLM NIXL).

Two prefill (H100) and two decode (LPU) backends are shared by the module, with gateways in
front of them configured for what each test checks; every process starts at once (start-up is
most of the cost). Faults are injected at run time through the backends' ``/admin/faults`` and
cleared after each test.

* a prefill worker answering 500 is retried around, then taken out by its circuit breaker;
* a decode worker killed mid-stream ends the client's stream with an error event at once;
* a hung decode leg is cut by the request's deadline (504) and aborted on its backend;
* a thousand clients hanging up mid-stream leave no running sequence and no in-flight count;
* overload is refused with 429 and ``Retry-After``, never a 5xx;
* a request whose decode legs all fail frees the KV its prefill holds (xfail: it does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.backend_procs import MODEL, Proc, backend_argv, http_pools, wait_ready
from tests.helpers import free_port

pytestmark = pytest.mark.system

LONG = 4000  # output tokens: seconds of LPU decode, so only a fault or the client ends a request
NO_FAULTS = {"fail_rate": 0.0, "fail_after_tokens": None, "hang_after_tokens": None, "slowdown": 1}
WAVES, WAVE = 10, 100  # client disconnects: waves of concurrent streams

Sample = tuple[str, dict[str, str], float]


# -- processes -------------------------------------------------------------------------------


@dataclass
class Cluster:
    prefill: list[Proc]  # behind every gateway
    decode: list[Proc]  # behind every gateway but "kill"
    lone_decode: Proc  # the only decode worker of the "kill" gateway
    gateways: dict[str, Proc]

    @property
    def shared(self) -> list[Proc]:
        return [*self.prefill, *self.decode]


def _configs(prefill: list[Proc], decode: list[Proc], lone: Proc) -> dict[str, dict[str, Any]]:
    """The gateways' configs, every one over real HTTP upstreams (vLLM NIXL)."""

    def one_model(pools: dict[str, Any], **model: Any) -> dict[str, Any]:
        return {"models": [{"name": MODEL, "pools": pools, **model}]}

    shared = http_pools("vllm-nixl", prefill, decode)  # round-robin pools
    retries = {"prefill": 2, "decode": 1, "backoff_s": 0.01}
    return {
        "circuit": one_model(
            shared, retries=retries, circuit={"failure_threshold": 2, "cooldown_s": 30}
        ),
        "kill": one_model(http_pools("vllm-nixl", prefill, [lone])),
        # Per-leg limits longer than any deadline a test sets: only the deadline ends a hang.
        "main": one_model(
            shared,
            retries=retries,
            timeouts={"prefill_s": 30, "decode_first_token_s": 30, "decode_idle_s": 30},
        ),
        "overload": {"admission": {"max_in_flight": 4, "max_queue": 4}, **one_model(shared)},
    }


def _launch(argv: Sequence[str], port: int, log_path: Path) -> Proc:
    """Start a process logging to ``log_path``; the caller waits for it to be ready."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"},
        )
    return Proc(process, log_path, f"http://127.0.0.1:{port}", port)


def _stop_all(procs: Sequence[Proc]) -> None:
    """Terminate every process at once, then wait for each (killing what does not stop)."""
    for p in procs:
        if p.process.poll() is None:
            p.process.terminate()
    for p in procs:
        try:
            p.process.wait(10)
        except subprocess.TimeoutExpired:
            p.process.kill()
            p.process.wait()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        procs: list[Proc] = []

        def backend(name: str, role: str, device: str) -> Proc:
            port = free_port()
            argv = backend_argv(
                port, "--role", role, "--log-level", "warning", "--enable-faults", device=device
            )
            procs.append(_launch(argv, port, logs / f"{name}.log"))
            return procs[-1]

        try:
            prefill = [backend(f"prefill-{i}", "prefill", "h100-sxm") for i in range(2)]
            decode = [backend(f"decode-{i}", "decode", "groq-lpu-v1") for i in range(2)]
            lone = backend("decode-lone", "decode", "groq-lpu-v1")
            gateways: dict[str, Proc] = {}
            for name, data in _configs(prefill, decode, lone).items():
                port = free_port()
                path = logs / f"{name}.yaml"
                path.write_text(yaml.safe_dump(data))
                argv = [
                    sys.executable, "-m", "gateway.cli", "serve", "--config", str(path),
                    "--port", str(port),
                ]  # fmt: skip
                gateways[name] = _launch(argv, port, logs / f"gateway-{name}.log")
                procs.append(gateways[name])
            for p in procs:
                wait_ready(p.url + "/health", p.process, p.log_path, timeout=60)
            yield Cluster(prefill, decode, lone, gateways)
        finally:
            _stop_all(procs)


@pytest.fixture(autouse=True)
def clear_faults(cluster: Cluster) -> Iterator[None]:
    yield
    for p in cluster.shared:
        httpx.post(p.url + "/admin/faults", json=NO_FAULTS, timeout=5).raise_for_status()


# -- requests and metrics --------------------------------------------------------------------


def chat(seed: int, max_tokens: int, **fields: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"Tell me about failure #{seed}."}]
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "seed": seed, **fields}


def has_text(payload: str | bytes) -> bool:
    """Whether an SSE event's payload is a chunk that carries generated text."""
    if payload[:1] not in ("{", b"{"):
        return False
    event = orjson.loads(payload)
    return any((c.get("delta") or {}).get("content") for c in event.get("choices") or ())


async def set_faults(client: httpx.AsyncClient, procs: Sequence[Proc], **faults: Any) -> None:
    for p in procs:
        r = await client.post(p.url + "/admin/faults", json=faults)
        assert r.status_code == 200, r.text
        assert all(r.json()[k] == v for k, v in faults.items()), r.json()


async def scrape(client: httpx.AsyncClient, p: Proc) -> list[Sample]:
    r = await client.get(p.url + "/metrics")
    r.raise_for_status()
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    ]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples matching ``labels``."""
    return sum(
        v for n, got, v in samples if n == name and all(got.get(k) == x for k, x in labels.items())
    )


async def total(
    client: httpx.AsyncClient, procs: Sequence[Proc], name: str, **labels: str
) -> float:
    """``name`` summed over the metrics of ``procs``."""
    return sum([value(await scrape(client, p), name, **labels) for p in procs])


def by_worker(samples: list[Sample], name: str, pool: str) -> dict[str, float]:
    return {got["worker"]: v for n, got, v in samples if n == name and got.get("pool") == pool}


async def busy(client: httpx.AsyncClient, backends: Sequence[Proc], gateway: Proc) -> list[str]:
    """What still runs: backend sequences (running or waiting), gateway in-flight counts."""
    found = []
    for p in backends:
        samples = await scrape(client, p)
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            if v := value(samples, name):
                found.append(f"{p.url} {name} = {v}")
    gauges = [
        s
        for s in await scrape(client, gateway)
        if s[0] in ("pdgate_worker_in_flight", "pdgate_admitted_in_flight")
    ]
    assert {s[0] for s in gauges} == {"pdgate_worker_in_flight", "pdgate_admitted_in_flight"}
    found += [f"gateway {n}{got} = {v}" for n, got, v in gauges if v]
    return found


async def kv_held(client: httpx.AsyncClient, prefill: Sequence[Proc], rid: str) -> list[str]:
    """The prefill servers that still hold KV for request ``rid`` (NIXL side channel)."""
    found = []
    for p in prefill:
        r = await client.post(p.url + "/pdgate/kv/pull", json={"remote_request_id": rid})
        if r.status_code != 404:
            found.append(f"{p.url}: {r.status_code} {r.text}")
    return found


async def until_empty(probe: Callable[[], Awaitable[list[str]]], limit_s: float, what: str) -> None:
    """Poll ``probe`` until it reports nothing, for at most ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while found := await probe():
        assert time.monotonic() < deadline, f"{what} after {limit_s} s: {found}"
        await asyncio.sleep(0.05)


# -- tests -----------------------------------------------------------------------------------


async def test_failing_prefill_worker_is_retried_around_and_its_circuit_opens(
    cluster: Cluster,
) -> None:
    gateway = cluster.gateways["circuit"]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as c:
        await set_faults(c, cluster.prefill[:1], fail_rate=1.0)
        for seed in range(6):
            r = await c.post("/v1/chat/completions", json=chat(seed, 4))
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4
        m = await scrape(c, gateway)
    # prefill-0 failed twice, each time retried on prefill-1; two consecutive failures opened
    # its circuit, so no later request was sent to it (nor retried).
    assert value(m, "pdgate_retries_total", pool="prefill", error="LegFailed") == 2
    assert value(m, "pdgate_retries_total") == 2
    assert by_worker(m, "pdgate_routing_decisions_total", "prefill") == {
        "prefill-0": 2,
        "prefill-1": 6,
    }
    assert by_worker(m, "pdgate_worker_circuit_state", "prefill") == {
        "prefill-0": 2,
        "prefill-1": 0,
    }
    assert set(by_worker(m, "pdgate_worker_circuit_state", "decode").values()) == {0}
    assert value(m, "pdgate_requests_total", outcome="ok") == 6


async def test_decode_worker_killed_mid_stream_ends_the_stream_at_once(cluster: Cluster) -> None:
    gateway, victim = cluster.gateways["kill"], cluster.lone_decode
    rid = f"kill-{time.monotonic_ns()}"
    with_text = 0
    killed = 0.0
    after: list[tuple[float, str]] = []  # (arrival, payload) of each event after the kill
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as c:
        body = chat(1, LONG, stream=True)
        headers = {"X-Request-Id": rid}
        request = c.stream("POST", "/v1/chat/completions", json=body, headers=headers)
        async with asyncio.timeout(10), request as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if killed:
                    after.append((time.monotonic(), line[6:]))
                    continue
                with_text += has_text(line[6:])
                if with_text == 3:
                    victim.process.kill()  # SIGKILL: the process says no goodbye
                    killed = time.monotonic()
        closed = time.monotonic()
        assert victim.process.wait(5) == -9
        assert after, "the stream closed without an error event"
        error_at, last = after[-1]
        assert last != "[DONE]"
        error = orjson.loads(last)["error"]
        assert error["type"] == "upstream_error", error
        assert all("error" not in orjson.loads(p) for _, p in after[:-1])
        # Fail fast: the error event arrives, and the stream closes, within a second of the kill.
        assert error_at - killed < 1.0, error_at - killed
        assert closed - killed < 1.0, closed - killed
        await until_empty(lambda: busy(c, cluster.prefill, gateway), 2.0, "still in flight")
        assert await kv_held(c, cluster.prefill, rid) == []  # the decode had pulled it
        m = await scrape(c, gateway)
    assert value(m, "pdgate_requests_total", outcome="upstream_failed") == 1
    assert value(m, "pdgate_retries_total") == 0  # tokens were out: no retry


async def test_hung_decode_is_cut_by_the_deadline_and_aborted_on_the_backend(
    cluster: Cluster,
) -> None:
    gateway = cluster.gateways["main"]
    rid = f"hang-{time.monotonic_ns()}"
    async with httpx.AsyncClient(timeout=30) as c:
        await set_faults(c, cluster.decode, hang_after_tokens=2)
        abort = {"finished_reason": "abort"}
        aborted = await total(c, cluster.decode, "vllm:request_success_total", **abort)
        started = time.monotonic()
        request = asyncio.ensure_future(
            c.post(
                gateway.url + "/v1/chat/completions",
                json=chat(3, LONG),
                headers={"X-PDGate-Timeout": "1", "X-Request-Id": rid},
            )
        )

        async def not_running() -> list[str]:
            running = await total(c, cluster.decode, "vllm:num_requests_running")
            return [] if running == 1 else [f"{running} running"]

        await until_empty(not_running, 1.0, "the leg never ran")  # it runs while it hangs
        r = await request
        elapsed = time.monotonic() - started
        assert r.status_code == 504, r.text
        assert r.json()["error"]["type"] == "timeout"
        assert r.json()["error"]["code"] == "deadline_exceeded"
        assert 1.0 <= elapsed < 2.0, elapsed
        # The hung leg is aborted on its backend (it would run for seconds more otherwise) and
        # its KV freed; the prefill server no longer holds the request's KV either.
        await until_empty(lambda: busy(c, cluster.shared, gateway), 1.0, "still running")
        usage = await total(c, cluster.decode, "vllm:kv_cache_usage_perc")
        assert usage == 0
        assert await kv_held(c, cluster.prefill, rid) == []
        assert await total(c, cluster.decode, "vllm:request_success_total", **abort) == aborted + 1


async def _open_and_drop(port: int, body: bytes, until_text: bool) -> None:
    """A bare HTTP/1.1 client: POST a long stream, read it up to its first event (or its first
    text), then hang up by closing the socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 200 "), status
        while line := await reader.readline():  # each event is one chunk: lines arrive whole
            if line.startswith(b"data: ") and (not until_text or has_text(line[6:])):
                return
        raise AssertionError("the stream ended before the client left")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_thousand_disconnects_mid_stream_leave_nothing_running(cluster: Cluster) -> None:
    gateway = cluster.gateways["main"]
    async with httpx.AsyncClient(timeout=30) as c:
        before = value(await scrape(c, gateway), "pdgate_requests_total", outcome="cancelled")
        # Slowed decodes keep each stream cheap between its first token and the hang-up; at
        # ~30 ms a token, only the client can end a stream of 4,000.
        await set_faults(c, cluster.decode, slowdown=16)
        for wave in range(WAVES):
            # Even waves leave at the first event (sent once the prefill is done, while the
            # decode leg starts); odd ones at the first token (the decode leg is running).
            streams = [
                _open_and_drop(
                    gateway.port, orjson.dumps(chat(seed, LONG, stream=True)), wave % 2 == 1
                )
                for seed in range(wave * WAVE, (wave + 1) * WAVE)
            ]
            async with asyncio.timeout(30):
                await asyncio.gather(*streams)
        await until_empty(lambda: busy(c, cluster.shared, gateway), 5.0, "still busy")
        after = value(await scrape(c, gateway), "pdgate_requests_total", outcome="cancelled")
    assert after - before == WAVES * WAVE


async def test_overload_is_refused_with_429_never_5xx(cluster: Cluster) -> None:
    gateway = cluster.gateways["overload"]
    n, max_tokens = 40, 500  # ~0.9 s of LPU decode each: the first eight hold the gateway

    async def one(c: httpx.AsyncClient, seed: int) -> httpx.Response:
        return await c.post("/v1/chat/completions", json=chat(seed, max_tokens))

    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, limits=limits) as c:
        responses = await asyncio.gather(*(one(c, seed) for seed in range(n)))
        await until_empty(lambda: busy(c, cluster.shared, gateway), 2.0, "still busy")
        m = await scrape(c, gateway)
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) >= 8, statuses  # four in flight and four queued were served
    for r in ok:
        assert r.json()["usage"]["completion_tokens"] == max_tokens
    for r in refused:
        assert r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error", error
        assert error["code"] == "overloaded"
    assert value(m, "pdgate_rejections_total", reason="gateway_full") == len(refused)
    assert value(m, "pdgate_requests_total", outcome="ok") == len(ok)


async def test_failed_handoff_frees_the_prefill_kv(cluster: Cluster) -> None:
    """Every decode leg fails before its first token: the client gets 502, and the KV the
    prefill server holds for the request is freed at once ("any failure closes both legs")."""
    gateway = cluster.gateways["main"]
    rid = f"handoff-{time.monotonic_ns()}"  # the prefill server holds the KV under this id
    async with httpx.AsyncClient(timeout=30) as c:
        await set_faults(c, cluster.decode, fail_rate=1.0)
        retried = value(await scrape(c, gateway), "pdgate_retries_total", pool="decode")
        r = await c.post(
            gateway.url + "/v1/chat/completions", json=chat(5, 16), headers={"X-Request-Id": rid}
        )
        assert r.status_code == 502, r.text
        after = value(await scrape(c, gateway), "pdgate_retries_total", pool="decode")
        assert after == retried + 1  # the second decode worker was tried too
        try:
            await until_empty(lambda: kv_held(c, cluster.prefill, rid), 1.0, "KV still held")
        finally:
            for p in cluster.prefill:  # leave nothing held for later tests
                await c.post(p.url + "/pdgate/kv/release", json={"remote_request_id": rid})
