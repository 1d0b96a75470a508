"""Every failure in OpenAI's error envelope with the right status, before or during a stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from backends.emulator.catalog import Catalog
from tests.helpers import MODEL, app_client, config, gateway_of, pool, settings
from tests.integration.conftest import (
    CHAT,
    COMPLETIONS,
    Client,
    FakeFactory,
    assert_error,
    assert_idle,
    chat_body,
    completion_body,
    sse_payloads,
)

# -- malformed and invalid bodies ------------------------------------------------------------


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize(
    "raw",
    [b'{"model": ', b"not json", b"", b"\xff\xfe"],
    ids=["truncated", "text", "empty", "binary"],
)
async def test_malformed_json_is_400(client: Client, path: str, raw: bytes) -> None:
    _, c = client
    resp = await c.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(resp, 400, type_="invalid_request_error")


@pytest.mark.parametrize("raw", [b"[]", b'[{"model": "llama-3.1-8b"}]', b'"text"', b"42", b"null"])
async def test_non_object_json_is_400(client: Client, raw: bytes) -> None:
    _, c = client
    resp = await c.post(CHAT, content=raw, headers={"content-type": "application/json"})
    err = assert_error(resp, 400, type_="invalid_request_error")
    assert "object" in err["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"model": MODEL}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}]}, "model"),
        (CHAT, chat_body(temperature=5), "temperature"),
        (CHAT, chat_body(top_p=0), "top_p"),
        (CHAT, chat_body(presence_penalty=-3), "presence_penalty"),
        (CHAT, chat_body(max_tokens=0), "max_tokens"),
        (CHAT, chat_body(max_completion_tokens=-1), "max_completion_tokens"),
        (CHAT, chat_body(max_tokens="ten"), "max_tokens"),
        (CHAT, chat_body(n=2), "n"),
        (CHAT, chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (CHAT, chat_body(stream="yes please"), "stream"),
        (
            CHAT,
            chat_body(stream_options={"include_usage": "maybe"}),
            "stream_options.include_usage",
        ),
        (CHAT, {"model": MODEL, "messages": []}, "messages"),
        (COMPLETIONS, {"model": MODEL}, "prompt"),
        (COMPLETIONS, completion_body(min_tokens=-1), "min_tokens"),
        (COMPLETIONS, completion_body(n=3), "n"),
        # Strict types, as OpenAI's API: no coercion from strings or booleans.
        (CHAT, chat_body(max_tokens="8"), "max_tokens"),
        (CHAT, chat_body(max_tokens=True), "max_tokens"),
        (COMPLETIONS, completion_body(stream="yes"), "stream"),
        (COMPLETIONS, completion_body(prompt=[True, False]), "prompt"),
        (CHAT, chat_body(seed="1"), "seed"),
    ],
)
async def test_schema_violation_names_param(
    client: Client, path: str, body: dict[str, Any], param: str
) -> None:
    _, c = client
    resp = await c.post(path, json=body)
    err = assert_error(resp, 400, type_="invalid_request_error", param=param)
    assert param in err["message"]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "wizard", "content": "hi"}],
        [{"content": "no role"}],
        ["just a string"],
        [{"role": "user", "content": 42}],
    ],
)
async def test_bad_message_names_messages(client: Client, messages: list[Any]) -> None:
    _, c = client
    resp = await c.post(CHAT, json={"model": MODEL, "messages": messages})
    err = assert_error(resp, 400, type_="invalid_request_error")
    assert err["param"] is not None
    assert err["param"].startswith("messages.0")


async def test_unknown_model_is_404(client: Client) -> None:
    _, c = client
    for path, body in ((CHAT, chat_body()), (COMPLETIONS, completion_body())):
        resp = await c.post(path, json={**body, "model": "gpt-9"})
        err = assert_error(resp, 404, code="model_not_found", param="model")
        assert "gpt-9" in err["message"]


async def test_unknown_route_and_method_in_envelope(client: Client) -> None:
    _, c = client
    assert_error(await c.get("/v1/nope"), 404)
    assert_error(await c.get(CHAT), 405)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
async def test_a_bug_answers_500_in_the_envelope(
    client: Client, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception no handler expects still reaches the client as OpenAI's envelope, and the
    gateway keeps serving (the completion endpoints skip FastAPI's middleware, see GatewayApp)."""
    app, c = client
    body = chat_body() if path == CHAT else completion_body()
    counter = type(next(iter(gateway_of(app).models.values())).counter)

    def broken(*args: Any) -> int:
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(counter, "chat" if path == CHAT else "prompt", broken)
        err = assert_error(await c.post(path, json=body), 500)
        assert err["message"] == "internal error"
    assert (await c.post(path, json=body)).status_code == 200
    assert_idle(app)


async def test_body_limit(catalog: Catalog) -> None:
    s = settings(config(server={"max_body_bytes": 2048}), catalog)
    async with app_client(s) as (app, c):
        ok = await c.post(CHAT, json=chat_body("x" * 1000, max_tokens=2))
        assert ok.status_code == 200, ok.text
        big = await c.post(CHAT, json=chat_body("x" * 3000, max_tokens=2))
        err = assert_error(big, 413, type_="invalid_request_error", code="request_too_large")
        assert "2048" in err["message"]

        async def chunked() -> AsyncIterator[bytes]:
            # No content-length: the limit must hold while the body is read.
            for _ in range(10):
                yield b" " * 500

        streamed = await c.post(COMPLETIONS, content=chunked())
        assert_error(streamed, 413, code="request_too_large")
        assert_idle(app)


async def test_prompt_beyond_max_context_is_400(client: Client) -> None:
    app, c = client
    # The model's 131072-token context, or less where an instance's KV cache is smaller;
    # ~4 bytes per token without a tokenizer.
    limit = gateway_of(app).models[MODEL].max_context
    assert limit <= 131_072
    resp = await c.post(CHAT, json=chat_body("abcd" * 131_072, max_tokens=4))
    err = assert_error(resp, 400, type_="invalid_request_error", param="messages")
    assert f"maximum context length is {limit} tokens" in err["message"]
    resp = await c.post(COMPLETIONS, json=completion_body(list(range(131_070)), max_tokens=3))
    assert_error(resp, 400, param="prompt")


async def test_context_limit_counts_prompt_plus_completion(catalog: Catalog) -> None:
    # An aggregated H100 instance holds the whole 131072-token context in its KV cache.
    cfg = config(mode="aggregated", aggregated=pool("h100-sxm", 1, time_scale=1000))
    async with app_client(settings(cfg, catalog)) as (app, c):
        ids = list(range(131_070))
        over = await c.post(COMPLETIONS, json=completion_body(ids, max_tokens=3))
        assert_error(over, 400, param="prompt")
        at = await c.post(COMPLETIONS, json=completion_body(ids, max_tokens=2))
        assert at.status_code == 200, at.text[:300]
        assert at.json()["usage"] == {
            "prompt_tokens": 131_070,
            "completion_tokens": 2,
            "total_tokens": 131_072,
        }
        assert_idle(app)


async def test_max_tokens_beyond_context_is_400(client: Client) -> None:
    _, c = client
    resp = await c.post(CHAT, json=chat_body(max_tokens=200_000))
    assert_error(resp, 400, param="messages")
    resp = await c.post(COMPLETIONS, json=completion_body(max_tokens=10**9))
    assert_error(resp, 400, param="prompt")


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", "86401", ""])
async def test_invalid_timeout_header_is_400(client: Client, value: str) -> None:
    app, c = client
    resp = await c.post(CHAT, json=chat_body(max_tokens=2), headers={"X-PDGate-Timeout": value})
    assert_error(resp, 400, type_="invalid_request_error", param="x-pdgate-timeout")
    assert_idle(app)


# -- worker health ---------------------------------------------------------------------------


async def test_no_healthy_decode_worker_is_503_and_not_ready(catalog: Catalog) -> None:
    fakes = FakeFactory()
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (app, c):
        ready = await c.get("/ready")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready"}

        for f in fakes.role("decode"):
            f.healthy_flag = False
        ready = await c.get("/ready")
        err = assert_error(ready, 503, type_="service_unavailable", code="no_healthy_worker")
        assert f"{MODEL}/decode" in err["message"]
        assert f"{MODEL}/prefill" not in err["message"]
        resp = await c.post(CHAT, json=chat_body(max_tokens=4))
        assert_error(resp, 503, type_="service_unavailable", code="no_healthy_worker")
        assert_idle(app)

        # One healthy decode worker is enough again.
        fakes.role("decode")[1].healthy_flag = True
        assert (await c.get("/ready")).status_code == 200
        resp = await c.post(CHAT, json=chat_body(max_tokens=4))
        assert resp.status_code == 200, resp.text
        assert fakes.calls("decode") == [0, 1]


async def test_no_healthy_prefill_worker_is_503_before_stream(catalog: Catalog) -> None:
    fakes = FakeFactory()
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (app, c):
        for f in fakes.role("prefill"):
            f.healthy_flag = False
        err = assert_error(await c.get("/ready"), 503)
        assert f"{MODEL}/prefill" in err["message"]
        for path, body in ((CHAT, chat_body()), (COMPLETIONS, completion_body())):
            resp = await c.post(path, json={**body, "stream": True, "max_tokens": 4})
            assert_error(resp, 503, code="no_healthy_worker")
        assert fakes.calls("prefill") == [0, 0]
        assert fakes.calls("decode") == [0, 0]
        assert_idle(app)


async def test_no_healthy_decode_worker_stream_is_503_without_prefill(catalog: Catalog) -> None:
    fakes = FakeFactory()
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (_, c):
        for f in fakes.role("decode"):
            f.healthy_flag = False
        resp = await c.post(CHAT, json=chat_body(max_tokens=4, stream=True))
        assert_error(resp, 503, code="no_healthy_worker")
        assert fakes.calls("prefill") == [0, 0]


# -- deadlines and upstream failures ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
@pytest.mark.parametrize("stream", [False, True])
async def test_deadline_before_first_token_is_504(
    catalog: Catalog, mode: str, stream: bool
) -> None:
    fakes = FakeFactory(prefill_delay_s=1.0)
    async with app_client(settings(config(mode=mode), catalog), backend_factory=fakes) as (app, c):
        started = time.monotonic()
        resp = await c.post(
            CHAT,
            json=chat_body(max_tokens=4, stream=stream),
            headers={"X-PDGate-Timeout": "0.05"},
        )
        elapsed = time.monotonic() - started
        # Nothing was sent before the deadline, so the 504 is the HTTP status itself.
        assert_error(resp, 504, type_="timeout", code="deadline_exceeded")
        assert "x-request-id" in resp.headers
        assert elapsed < 0.8, "the slow leg was cancelled at the deadline"
        assert_idle(app)


async def test_deadline_mid_stream_ends_with_error_event(catalog: Catalog) -> None:
    fakes = FakeFactory(token_delay_s=0.01)
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (app, c):
        resp = await c.post(
            CHAT,
            json=chat_body(max_tokens=500, stream=True),
            headers={"X-PDGate-Timeout": "0.15"},
        )
        payloads = sse_payloads(resp)
        assert "[DONE]" not in payloads
        error = orjson.loads(payloads[-1])
        assert error["error"]["type"] == "timeout"
        assert error["error"]["code"] == "deadline_exceeded"
        chunks = [orjson.loads(p) for p in payloads[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert 1 < len(chunks) < 500
        assert_idle(app)
        assert fakes.calls("decode").count(1) == 1


async def test_prefill_failure_is_502(catalog: Catalog) -> None:
    fakes = FakeFactory(fail_prefill=True)
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (app, c):
        for stream in (False, True):
            resp = await c.post(COMPLETIONS, json=completion_body(max_tokens=4, stream=stream))
            err = assert_error(resp, 502, type_="upstream_error", code="upstream_failed")
            assert err["message"] == "the worker serving the request failed"  # no names, no body
        assert fakes.calls("decode") == [0, 0]
        assert_idle(app)


async def test_decode_failure(catalog: Catalog) -> None:
    fakes = FakeFactory(fail_after_tokens=3)
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (app, c):
        resp = await c.post(CHAT, json=chat_body(max_tokens=10))
        assert_error(resp, 502, type_="upstream_error", code="upstream_failed")
        assert_idle(app)

        stream = await c.post(CHAT, json=chat_body(max_tokens=10, stream=True))
        payloads = sse_payloads(stream)
        assert "[DONE]" not in payloads
        assert orjson.loads(payloads[-1])["error"]["code"] == "upstream_failed"
        text = "".join(
            orjson.loads(p)["choices"][0]["delta"].get("content") or "" for p in payloads[:-1]
        )
        assert len(text.split(" ")) == 3  # tokens 0..2 were delivered before the failure
        assert_idle(app)


async def test_decode_hang_cut_by_deadline(catalog: Catalog) -> None:
    fakes = FakeFactory(hang_after_tokens=2)
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (app, c):
        resp = await c.post(
            COMPLETIONS, json=completion_body(max_tokens=10), headers={"X-PDGate-Timeout": "0.1"}
        )
        assert_error(resp, 504, code="deadline_exceeded")
        assert_idle(app)


async def test_prompt_beyond_decode_kv_capacity_fails_cleanly(catalog: Catalog) -> None:
    """The setup of the two tests below: this config's decode instance holds < 70k tokens."""
    cfg = config(prefill=pool("h100-sxm", 1, time_scale=1000), decode=pool("groq-lpu-v1", 1))
    async with app_client(settings(cfg, catalog)) as (app, c):
        decode = [w for w in app.state.gateway.registry.workers() if w.role == "decode"]
        blocks = decode[0].backend.engine.total_blocks * decode[0].backend.engine.block_size
        assert 60_000 < blocks < 70_000
        resp = await c.post(COMPLETIONS, json=completion_body(list(range(70_000)), max_tokens=2))
        assert resp.status_code >= 400
        assert_idle(app)


async def test_prompt_beyond_decode_kv_capacity_is_400(catalog: Catalog) -> None:
    cfg = config(prefill=pool("h100-sxm", 1, time_scale=1000), decode=pool("groq-lpu-v1", 1))
    async with app_client(settings(cfg, catalog)) as (app, c):
        resp = await c.post(COMPLETIONS, json=completion_body(list(range(70_000)), max_tokens=2))
        assert_error(resp, 400, type_="invalid_request_error", param="prompt")
        prefill = [w for w in app.state.gateway.registry.workers() if w.role == "prefill"]
        assert prefill[0].backend.engine.stats.prompt_tokens == 0


async def test_completion_beyond_decode_kv_capacity_does_not_livelock(catalog: Catalog) -> None:
    cfg = config(
        prefill=pool("h100-sxm", 1, time_scale=1000), decode=pool("groq-lpu-v1", 1, time_scale=1000)
    )
    async with app_client(settings(cfg, catalog)) as (app, c):
        resp = await c.post(
            COMPLETIONS,
            json=completion_body(list(range(60_000)), max_tokens=8_000),
            headers={"X-PDGate-Timeout": "1.5"},
        )
        assert_idle(app)
        decode = [w for w in app.state.gateway.registry.workers() if w.role == "decode"]
        preemptions = decode[0].backend.engine.stats.preemptions
        # Rejected up front (400), or served to the capacity limit; never spun until the deadline.
        assert resp.status_code in (200, 400), resp.text[:300]
        assert preemptions < 10
