"""Chat completions over HTTP: OpenAI's shapes, lengths, request ids and SSE streaming."""

from __future__ import annotations

import re

from backends.emulator.catalog import Catalog
from tests.helpers import MODEL, app_client, config, settings
from tests.integration.conftest import CHAT, Client, chat_body, sse_chunks, sse_payloads


async def test_non_stream_has_openai_shape(client: Client) -> None:
    _, c = client
    resp = await c.post(CHAT, json=chat_body(max_tokens=12, seed=5))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert isinstance(body["created"], int)
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # The synthetic text is one word per token.
    assert len(choice["message"]["content"].split(" ")) == 12


async def test_max_completion_tokens_takes_precedence(client: Client) -> None:
    _, c = client
    resp = await c.post(CHAT, json=chat_body(max_completion_tokens=3, max_tokens=9, seed=1))
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3
    resp = await c.post(CHAT, json=chat_body(max_completion_tokens=7))
    assert resp.json()["usage"]["completion_tokens"] == 7


async def test_one_token_request_finishes_at_prefill(client: Client) -> None:
    _, c = client
    resp = await c.post(CHAT, json=chat_body(max_tokens=1, seed=2))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["usage"]["completion_tokens"] == 1
    assert body["choices"][0]["finish_reason"] == "length"
    assert " " not in body["choices"][0]["message"]["content"]


async def test_default_length_comes_from_config(catalog: Catalog) -> None:
    s = settings(config(default_max_tokens=5), catalog)
    async with app_client(s) as (_, c):
        chat = await c.post(CHAT, json=chat_body())
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["completion_tokens"] == 5
        comp = await c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
        assert comp.status_code == 200, comp.text
        assert comp.json()["usage"]["completion_tokens"] == 5


async def test_request_id_echoed_when_sent(client: Client) -> None:
    _, c = client
    resp = await c.post(CHAT, json=chat_body(max_tokens=2), headers={"X-Request-Id": "req-abc-1"})
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "req-abc-1"
    assert resp.json()["id"] == "chatcmpl-req-abc-1"
    stream = await c.post(
        CHAT, json=chat_body(max_tokens=2, stream=True), headers={"X-Request-Id": "req-abc-2"}
    )
    assert stream.headers["x-request-id"] == "req-abc-2"
    assert {ch["id"] for ch in sse_chunks(stream)} == {"chatcmpl-req-abc-2"}


async def test_request_id_generated_when_absent(client: Client) -> None:
    _, c = client
    first = await c.post(CHAT, json=chat_body(max_tokens=2))
    second = await c.post(CHAT, json=chat_body(max_tokens=2))
    ids = [r.headers["x-request-id"] for r in (first, second)]
    assert all(re.fullmatch(r"[0-9a-f]{16,}", i) for i in ids), ids
    assert ids[0] != ids[1]
    assert first.json()["id"] == "chatcmpl-" + ids[0]


# -- streaming -------------------------------------------------------------------------------


async def test_stream_matches_non_stream(client: Client) -> None:
    _, c = client
    whole = await c.post(CHAT, json=chat_body(max_tokens=16, seed=11))
    stream = await c.post(CHAT, json=chat_body(max_tokens=16, seed=11, stream=True))
    assert stream.headers["cache-control"] == "no-cache"
    chunks = sse_chunks(stream)
    ids = {ch["id"] for ch in chunks}
    assert len(ids) == 1
    assert ids.pop().startswith("chatcmpl-")
    for ch in chunks:
        assert ch["object"] == "chat.completion.chunk"
        assert ch["model"] == MODEL
        assert len(ch["choices"]) == 1
        assert ch["choices"][0]["index"] == 0
        assert "usage" not in ch, "no usage without stream_options.include_usage"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in ch["choices"][0]["delta"] for ch in chunks[1:])
    body = [ch["choices"][0] for ch in chunks[:-1]]
    assert all(ch["finish_reason"] is None for ch in body)
    text = "".join(ch["delta"].get("content") or "" for ch in body)
    assert text == whole.json()["choices"][0]["message"]["content"]
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "length"
    assert last["delta"] == {}


async def test_stream_include_usage(client: Client) -> None:
    _, c = client
    resp = await c.post(
        CHAT,
        json=chat_body(max_tokens=9, seed=4, stream=True, stream_options={"include_usage": True}),
    )
    chunks = sse_chunks(resp)
    *content, finish, usage = chunks
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 9
    assert usage["usage"]["total_tokens"] == (
        usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    )
    assert usage["usage"]["prompt_tokens"] > 0
    assert finish["choices"][0]["finish_reason"] == "length"
    for ch in [*content, finish]:
        assert "usage" in ch
        assert ch["usage"] is None
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in content)
    assert len(text.split(" ")) == 9


async def test_stream_usage_false_sends_no_usage_chunk(client: Client) -> None:
    _, c = client
    resp = await c.post(
        CHAT,
        json=chat_body(max_tokens=4, stream=True, stream_options={"include_usage": False}),
    )
    chunks = sse_chunks(resp)
    assert all(ch["choices"] for ch in chunks)
    assert all("usage" not in ch for ch in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_stream_one_token(client: Client) -> None:
    _, c = client
    resp = await c.post(CHAT, json=chat_body(max_tokens=1, seed=8, stream=True))
    payloads = sse_payloads(resp)
    assert payloads[-1] == "[DONE]"
    chunks = sse_chunks(resp)
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
    whole = await c.post(CHAT, json=chat_body(max_tokens=1, seed=8))
    assert text == whole.json()["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
