"""Failing fast: retries before a leg's first byte, per-leg timeouts, circuit breakers,
deadlines and admission control, driven over HTTP against scripted fake workers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest

from backends.emulator import synth
from backends.emulator.catalog import Catalog
from gateway.circuit import CircuitState
from tests.fakes import FakeBackend
from tests.helpers import MODEL, app_client, config, gateway_of, pool, settings
from tests.integration.conftest import (
    CHAT,
    COMPLETIONS,
    FakeFactory,
    assert_error,
    assert_idle,
    chat_body,
    completion_body,
    eventually,
    metric_value,
    sse_chunks,
    sse_payloads,
    streamed_text,
)


def expected_text(seed: int, tokens: int) -> str:
    return synth.text(seed, 0, tokens)


async def scrape(c: httpx.AsyncClient) -> str:
    resp = await c.get("/metrics")
    assert resp.status_code == 200
    return resp.text


def circuit(metrics: str, worker: str) -> float:
    pool_name = worker.split("-")[0]
    return metric_value(metrics, "pdgate_worker_circuit_state", pool=pool_name, worker=worker)


def content(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    text: str = resp.json()["choices"][0]["message"]["content"]
    return text


def stream_error(resp: httpx.Response) -> tuple[str, dict[str, Any]]:
    """(text delivered, error object) of a stream that ended with an error event."""
    payloads = sse_payloads(resp)
    assert "[DONE]" not in payloads
    last = orjson.loads(payloads[-1])
    assert set(last) == {"error"}, last
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    return streamed_text(chunks), last["error"]


async def serve_until(c: httpx.AsyncClient, fake: FakeBackend, *, calls: int) -> None:
    """Send requests (each must succeed) until ``fake`` has served ``calls`` legs; at most 4."""
    for _ in range(4):
        if len(fake.calls) >= calls:
            break
        assert content(await c.post(CHAT, json=chat_body(max_tokens=2)))
    assert len(fake.calls) == calls


# -- retries and circuit breakers ------------------------------------------------------------


async def test_failing_prefill_worker_is_retried_then_cut_off_then_probed(
    catalog: Catalog,
) -> None:
    fakes = FakeFactory()
    cfg = config(circuit={"failure_threshold": 2, "cooldown_s": 0.5})
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        bad, good = fakes.role("prefill")
        bad.fail_prefill = True

        for _ in range(4):
            resp = await c.post(CHAT, json=chat_body(max_tokens=4, seed=11))
            assert content(resp) == expected_text(11, 4)
            assert resp.json()["usage"]["completion_tokens"] == 4
        # Two failures opened the breaker; after that the worker gets no more prefills.
        assert bad.calls == ["prefill", "prefill"]
        assert good.calls == ["prefill"] * 4
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_retries_total", pool="prefill") == 2
        assert metric_value(metrics, "pdgate_retries_total", pool="prefill", error="LegFailed") == 2
        assert metric_value(metrics, "pdgate_retries_total", pool="decode") == 0
        assert circuit(metrics, "prefill-0") == CircuitState.OPEN
        assert circuit(metrics, "prefill-1") == CircuitState.CLOSED
        assert metric_value(metrics, "pdgate_requests_total", outcome="ok") == 4

        # After the cooldown one probe goes through; it fails, so the breaker reopens.
        await asyncio.sleep(0.55)
        assert circuit(await scrape(c), "prefill-0") == CircuitState.HALF_OPEN
        await serve_until(c, bad, calls=3)
        assert circuit(await scrape(c), "prefill-0") == CircuitState.OPEN
        for _ in range(3):
            assert content(await c.post(CHAT, json=chat_body(max_tokens=2)))
        assert len(bad.calls) == 3

        # Fixed: the next probe succeeds and the worker is back in rotation.
        bad.fail_prefill = False
        await asyncio.sleep(0.55)
        await serve_until(c, bad, calls=4)
        metrics = await scrape(c)
        assert circuit(metrics, "prefill-0") == CircuitState.CLOSED
        before = len(bad.calls)
        for _ in range(4):
            await c.post(CHAT, json=chat_body(max_tokens=2))
        assert len(bad.calls) - before == 2  # round robin over both again
        assert_idle(app)


async def test_every_prefill_failing_exhausts_retries(catalog: Catalog) -> None:
    fakes = FakeFactory(fail_prefill=True)
    cfg = config(prefill=pool("h100-sxm", 3), retries={"prefill": 1, "backoff_s": 0.0})
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        resp = await c.post(CHAT, json=chat_body(max_tokens=4))
        assert_error(resp, 502, type_="upstream_error", code="upstream_failed")
        calls = fakes.calls("prefill")
        assert sorted(calls) == [0, 1, 1]  # one attempt plus one retry, on two workers
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_retries_total", pool="prefill") == 1
        assert_idle(app)


@pytest.mark.parametrize("stream", [False, True])
async def test_decode_failing_before_its_first_chunk_is_retried(
    catalog: Catalog, stream: bool
) -> None:
    fakes = FakeFactory()
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (app, c):
        broken, healthy = fakes.role("decode")
        broken.fail_after_tokens = 1  # the decode leg starts at token 1: fails before output
        resp = await c.post(
            CHAT,
            json=chat_body(
                max_tokens=6, seed=3, stream=stream, stream_options={"include_usage": True}
            ),
        )
        if stream:
            chunks = sse_chunks(resp)
            assert streamed_text(chunks) == expected_text(3, 6)
            assert chunks[-1]["usage"]["completion_tokens"] == 6
            assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        else:
            assert content(resp) == expected_text(3, 6)
            assert resp.json()["usage"]["completion_tokens"] == 6
        assert broken.calls == ["decode"]
        assert healthy.calls == ["decode"]
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_retries_total", pool="decode", error="LegFailed") == 1
        worker = {w.name: w for w in gateway_of(app).registry.workers()}
        assert worker["decode-0"].breaker.failures == 1
        assert worker["decode-1"].breaker.failures == 0
        assert_idle(app)


@pytest.mark.parametrize("stream", [False, True])
async def test_decode_failing_after_its_first_chunk_is_not_retried(
    catalog: Catalog, stream: bool
) -> None:
    fakes = FakeFactory()
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (app, c):
        broken, healthy = fakes.role("decode")
        broken.fail_after_tokens = 3
        resp = await c.post(CHAT, json=chat_body(max_tokens=8, seed=4, stream=stream))
        if stream:
            text, error = stream_error(resp)
            assert text == expected_text(4, 3)  # tokens 0..2, then the failure
            assert error["type"] == "upstream_error"
            assert error["code"] == "upstream_failed"
            assert "decode-0" not in error["message"]  # no worker names to clients
        else:
            assert_error(resp, 502, type_="upstream_error", code="upstream_failed")
        assert healthy.calls == []
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_retries_total") == 0
        assert metric_value(metrics, "pdgate_requests_total", outcome="upstream_failed") == 1
        assert_idle(app)


# -- per-leg timeouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_decode_stalling_mid_stream_fails_fast(catalog: Catalog, stream: bool) -> None:
    fakes = FakeFactory()
    cfg = config(timeouts={"decode_idle_s": 0.2})
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        stuck, other = fakes.role("decode")
        stuck.hang_after_tokens = 2
        started = time.monotonic()
        resp = await c.post(CHAT, json=chat_body(max_tokens=8, seed=9, stream=stream))
        elapsed = time.monotonic() - started
        assert elapsed < 3.0, "cut by decode_idle_s, not by the 120 s request deadline"
        if stream:
            text, error = stream_error(resp)
            assert text == expected_text(9, 2)
            assert (error["type"], error["code"]) == ("timeout", "upstream_timeout")
        else:
            err = assert_error(resp, 504, type_="timeout", code="upstream_timeout")
            assert "decode-0" not in err["message"]
        assert other.calls == []
        assert_idle(app)


async def test_decode_stalling_before_its_first_chunk_is_retried(catalog: Catalog) -> None:
    fakes = FakeFactory()
    cfg = config(timeouts={"decode_first_token_s": 0.2, "decode_idle_s": 0.2})
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        stuck, other = fakes.role("decode")
        stuck.hang_after_tokens = 1
        started = time.monotonic()
        resp = await c.post(CHAT, json=chat_body(max_tokens=5, seed=2))
        assert time.monotonic() - started < 3.0
        assert content(resp) == expected_text(2, 5)
        assert (stuck.calls, other.calls) == (["decode"], ["decode"])
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_retries_total", pool="decode", error="LegTimeout") == 1
        assert_idle(app)


async def test_hanging_prefill_times_out_and_is_retried(catalog: Catalog) -> None:
    fakes = FakeFactory()
    cfg = config(timeouts={"prefill_s": 0.2})
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        slow, fast = fakes.role("prefill")
        slow.prefill_delay_s = 60.0
        started = time.monotonic()
        resp = await c.post(COMPLETIONS, json=completion_body(max_tokens=4, seed=6))
        assert time.monotonic() - started < 3.0
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == expected_text(6, 4)
        assert (slow.calls, fast.calls) == (["prefill"], ["prefill"])
        metrics = await scrape(c)
        assert (
            metric_value(metrics, "pdgate_retries_total", pool="prefill", error="LegTimeout") == 1
        )
        worker = {w.name: w for w in gateway_of(app).registry.workers()}
        assert worker["prefill-0"].breaker.failures == 1  # a timeout counts against the worker
        assert_idle(app)  # the abandoned prefill is no longer running


@pytest.mark.parametrize("stream", [False, True])
async def test_every_prefill_hanging_hits_the_request_deadline(
    catalog: Catalog, stream: bool
) -> None:
    fakes = FakeFactory(prefill_delay_s=60.0)
    cfg = config(timeouts={"prefill_s": 10})
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        started = time.monotonic()
        resp = await c.post(
            CHAT,
            json=chat_body(max_tokens=4, stream=stream),
            headers={"X-PDGate-Timeout": "0.2"},
        )
        assert time.monotonic() - started < 3.0
        assert_error(resp, 504, type_="timeout", code="deadline_exceeded")
        assert sum(fakes.calls("prefill")) == 1
        assert fakes.calls("decode") == [0, 0]
        # A deadline is not the worker's fault: no failure reaches its breaker.
        for w in gateway_of(app).registry.workers():
            assert w.breaker.failures == 0, w.name
            assert w.breaker.available()
        assert_idle(app)


@pytest.mark.parametrize("stream", [False, True])
async def test_every_decode_hanging_hits_the_request_deadline(
    catalog: Catalog, stream: bool
) -> None:
    fakes = FakeFactory(hang_after_tokens=1)
    cfg = config(timeouts={"decode_first_token_s": 10, "decode_idle_s": 10})
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        started = time.monotonic()
        resp = await c.post(
            CHAT,
            json=chat_body(max_tokens=4, seed=1, stream=stream),
            headers={"X-PDGate-Timeout": "0.3"},
        )
        assert time.monotonic() - started < 3.0
        if stream:  # the prefill's first token went out before the deadline
            text, error = stream_error(resp)
            assert text == expected_text(1, 1)
            assert error["code"] == "deadline_exceeded"
        else:
            assert_error(resp, 504, type_="timeout", code="deadline_exceeded")
        assert sum(fakes.calls("decode")) == 1
        for f in fakes.fakes.values():  # the prefill's KV and the decode leg are both gone
            assert (f.running, f.held_kv) == (0, 0), f.name
        for w in gateway_of(app).registry.workers():
            assert w.breaker.failures == 0, w.name
        assert_idle(app)


# -- admission ----------------------------------------------------------------------------------


async def _burst(c: httpx.AsyncClient, n: int, **fields: Any) -> list[httpx.Response]:
    return list(
        await asyncio.gather(
            *(
                c.post(CHAT, json=chat_body(max_tokens=5, seed=i, stream=i % 2 == 1, **fields))
                for i in range(n)
            )
        )
    )


def _assert_overloaded(resp: httpx.Response, retry_after: str) -> None:
    err = assert_error(resp, 429, type_="rate_limit_error", code="overloaded")
    assert "capacity" in err["message"]
    assert resp.headers["retry-after"] == retry_after


async def test_gateway_admission_bounds_in_flight_and_queue(catalog: Catalog) -> None:
    fakes = FakeFactory(token_delay_s=0.04)
    cfg = config()
    cfg["admission"] = {"max_in_flight": 2, "max_queue": 1, "retry_after_s": 2.5}
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        responses = await _burst(c, 6)
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 200, 429, 429, 429]
        for i, resp in enumerate(responses):
            if resp.status_code == 429:  # streams too: refused before the first byte
                _assert_overloaded(resp, "3")
            elif i % 2:
                assert streamed_text(sse_chunks(resp)) == expected_text(i, 5)
            else:
                assert content(resp) == expected_text(i, 5)
        # Refused requests never reached a worker.
        assert sum(fakes.calls("prefill")) == 3
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_rejections_total", reason="gateway_full") == 3
        assert metric_value(metrics, "pdgate_admission_queue_depth", pool="gateway") == 0
        assert metric_value(metrics, "pdgate_admitted_in_flight", pool="gateway") == 0
        assert_idle(app)
        # Capacity is back: a later burst within the limits is served whole.
        assert [r.status_code for r in await _burst(c, 3)] == [200, 200, 200]


async def test_admission_refusals_are_counted_as_finished_requests(catalog: Catalog) -> None:
    fakes = FakeFactory(token_delay_s=0.04)
    cfg = config()
    cfg["admission"] = {"max_in_flight": 1, "max_queue": 0}
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (_, c):
        responses = await asyncio.gather(
            *(c.post(CHAT, json=chat_body(max_tokens=5)) for _ in range(3))
        )
        assert sorted(r.status_code for r in responses) == [200, 429, 429]
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_rejections_total", reason="gateway_full") == 2
        assert metric_value(metrics, "pdgate_requests_total", outcome="ok") == 1
        assert metric_value(metrics, "pdgate_requests_total", outcome="overloaded") == 2


async def test_decode_pool_admission_bounds_its_legs(catalog: Catalog) -> None:
    fakes = FakeFactory(token_delay_s=0.04)
    decode = {**pool("groq-lpu-v1", 2), "max_in_flight": 2, "max_queue": 1}
    cfg = config(decode=decode)
    cfg["admission"] = {"retry_after_s": 2}
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        responses = await asyncio.gather(
            *(c.post(CHAT, json=chat_body(max_tokens=5, seed=i)) for i in range(6))
        )
        assert sorted(r.status_code for r in responses) == [200, 200, 200, 429, 429, 429]
        for i, resp in enumerate(responses):
            if resp.status_code == 429:
                _assert_overloaded(resp, "2")
            else:
                assert content(resp) == expected_text(i, 5)
        assert sum(fakes.calls("decode")) == 3
        metrics = await scrape(c)
        reason = f"{MODEL}/decode_full"
        assert metric_value(metrics, "pdgate_rejections_total", reason=reason) == 3
        assert metric_value(metrics, "pdgate_admission_queue_depth", pool="decode") == 0
        assert metric_value(metrics, "pdgate_admitted_in_flight", pool="decode") == 0
        assert_idle(app)


async def test_decode_pool_refusal_comes_before_any_work(catalog: Catalog) -> None:
    fakes = FakeFactory(token_delay_s=0.04)
    decode = {**pool("groq-lpu-v1", 2), "max_in_flight": 1, "max_queue": 0}
    async with app_client(settings(config(decode=decode), catalog), backend_factory=fakes) as (
        app,
        c,
    ):
        responses = await asyncio.gather(
            *(c.post(CHAT, json=chat_body(max_tokens=5, stream=True)) for _ in range(3))
        )
        refused = [r for r in responses if r.status_code != 200]
        assert len(refused) == 2
        for resp in refused:
            _assert_overloaded(resp, "1")
        assert sum(fakes.calls("prefill")) == 1  # no prefill spent on refused requests
        assert_idle(app)


async def test_queued_request_leaves_the_queue_at_its_deadline(catalog: Catalog) -> None:
    fakes = FakeFactory(token_delay_s=0.05)
    cfg = config()
    cfg["admission"] = {"max_in_flight": 1, "max_queue": 1}
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        limiter = gateway_of(app).dispatcher.limiter
        slow = asyncio.create_task(c.post(CHAT, json=chat_body(max_tokens=20)))  # ~1 s
        await eventually(lambda: limiter.active >= 1)
        late = await c.post(CHAT, json=chat_body(max_tokens=2), headers={"X-PDGate-Timeout": "0.1"})
        assert_error(late, 504, code="deadline_exceeded")
        assert limiter.queued == 0
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_admission_queue_depth", pool="gateway") == 0
        assert metric_value(metrics, "pdgate_admitted_in_flight", pool="gateway") == 1
        assert not slow.done(), "the waiter gave up at its deadline, not at its turn"
        assert (await slow).status_code == 200
        # The timed-out waiter held no slot: the next request is admitted at once.
        assert (await c.post(CHAT, json=chat_body(max_tokens=2))).status_code == 200
        assert limiter.active == 0
        assert sum(fakes.calls("prefill")) == 2
        assert_idle(app)


async def test_queued_request_whose_client_leaves_frees_its_place(catalog: Catalog) -> None:
    fakes = FakeFactory(token_delay_s=0.05)
    cfg = config()
    cfg["admission"] = {"max_in_flight": 1, "max_queue": 1}
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        limiter = gateway_of(app).dispatcher.limiter
        slow = asyncio.create_task(c.post(CHAT, json=chat_body(max_tokens=10)))
        await eventually(lambda: limiter.active >= 1)
        waiting = asyncio.create_task(c.post(CHAT, json=chat_body(max_tokens=2)))
        await eventually(lambda: limiter.queued >= 1)
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_admission_queue_depth", pool="gateway") == 1
        # The queue is full now: a third request is refused.
        _assert_overloaded(await c.post(CHAT, json=chat_body(max_tokens=2)), "1")

        waiting.cancel()  # the client gives up while queued
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert limiter.queued == 0
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_admission_queue_depth", pool="gateway") == 0
        # Its place is free: another request can queue (and is served) while ``slow`` runs.
        queued_again = asyncio.create_task(c.post(CHAT, json=chat_body(max_tokens=2)))
        await eventually(lambda: limiter.queued >= 1 or queued_again.done())
        assert (await slow).status_code == 200
        assert (await queued_again).status_code == 200
        assert (limiter.active, limiter.queued) == (0, 0)
        assert sum(fakes.calls("prefill")) == 2  # ``slow`` and ``queued_again`` only
        assert_idle(app)


# -- busy is not broken -------------------------------------------------------------------------


async def test_queued_requests_on_a_busy_worker_wait_and_do_not_open_its_circuit(
    catalog: Catalog,
) -> None:
    """A decode batch of two seats and six streams: four wait in the engine's queue longer than
    every per-leg timeout, while the worker keeps producing for the two it runs. Before: the
    waiting ones were cut ("produced nothing for ...") and the circuit opened."""
    decode = pool("groq-lpu-v1", 1, engine={"max_num_seqs": 2})
    cfg = config(
        decode=decode,
        timeouts={"decode_first_token_s": 0.15, "decode_idle_s": 0.15},
        circuit={"failure_threshold": 2, "cooldown_s": 60},
    )
    async with app_client(settings(cfg, catalog)) as (app, c):
        body = chat_body(max_tokens=300, ignore_eos=True)
        started = time.monotonic()
        answers = await asyncio.gather(*(c.post(CHAT, json=body) for _ in range(6)))
        elapsed = time.monotonic() - started
        assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
        assert elapsed > 0.3, "the queued streams waited longer than their timeouts"
        worker = pool_of(app, "decode").workers[0]
        assert worker.breaker.failures == 0
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_retries_total", pool="decode") == 0
        assert_idle(app)


async def test_a_stalled_worker_among_busy_ones_still_times_out(catalog: Catalog) -> None:
    """Progress is per worker: one that produces nothing for anyone is cut at its timeout even
    while the other decode worker is busy."""
    fakes = FakeFactory()
    cfg = config(timeouts={"decode_first_token_s": 0.2, "decode_idle_s": 0.2})
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        stuck, _ = fakes.role("decode")
        stuck.hang_after_tokens = 1
        resp = await c.post(CHAT, json=chat_body(max_tokens=5, seed=2))
        assert resp.status_code == 200, resp.text
        worker = {w.name: w for w in gateway_of(app).registry.workers()}
        assert worker["decode-0"].breaker.failures == 1


def pool_of(app: Any, role: str) -> Any:
    return gateway_of(app).registry.pool(MODEL, role)


async def test_prompts_queued_behind_long_prompts_wait_for_a_busy_prefill_worker(
    catalog: Catalog,
) -> None:
    """Twelve long prompts on one prefill worker: the last ones wait longer than ``prefill_s``
    while the worker finishes the ones ahead of them. Before: they timed out and opened the
    prefill circuit (503)."""
    cfg = config(
        prefill=pool("h100-sxm", 1),
        timeouts={"prefill_s": 0.4},
        circuit={"failure_threshold": 2, "cooldown_s": 60},
    )
    async with app_client(settings(cfg, catalog)) as (app, c):
        body = completion_body(prompt="token " * 2000, max_tokens=2)
        started = time.monotonic()
        answers = await asyncio.gather(*(c.post(COMPLETIONS, json=body) for _ in range(12)))
        elapsed = time.monotonic() - started
        assert [r.status_code for r in answers] == [200] * 12, [r.text for r in answers]
        assert elapsed > 0.4, "the queued prompts waited longer than prefill_s"
        assert pool_of(app, "prefill").workers[0].breaker.failures == 0
        assert_idle(app)
