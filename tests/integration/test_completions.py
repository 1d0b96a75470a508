"""The legacy completions API: prompt forms, shapes, streaming."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import MODEL
from tests.integration.conftest import (
    COMPLETIONS,
    Client,
    assert_error,
    completion_body,
    sse_chunks,
    streamed_text,
)


async def test_non_stream_shape(client: Client) -> None:
    _, c = client
    resp = await c.post(COMPLETIONS, json=completion_body(max_tokens=6, seed=3))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"].startswith("cmpl-")
    assert body["id"] == "cmpl-" + resp.headers["x-request-id"]
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert isinstance(choice["text"], str)
    assert len(choice["text"].split(" ")) == 6
    assert choice["finish_reason"] == "length"
    assert "message" not in choice
    usage = body["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6


async def test_stream_matches_non_stream(client: Client) -> None:
    _, c = client
    whole = await c.post(COMPLETIONS, json=completion_body(max_tokens=10, seed=21))
    stream = await c.post(
        COMPLETIONS,
        json=completion_body(
            max_tokens=10, seed=21, stream=True, stream_options={"include_usage": True}
        ),
    )
    chunks = sse_chunks(stream)
    *content, finish, usage = chunks
    for ch in [*content, finish]:
        assert ch["object"] == "text_completion"
        assert ch["id"].startswith("cmpl-")
        assert "delta" not in ch["choices"][0]
        assert ch["usage"] is None
    assert all(ch["choices"][0]["finish_reason"] is None for ch in content)
    assert finish["choices"][0]["finish_reason"] == "length"
    assert finish["choices"][0]["text"] == ""
    assert streamed_text(content) == whole.json()["choices"][0]["text"]
    assert usage["choices"] == []
    assert usage["usage"] == whole.json()["usage"]


async def test_stream_without_usage(client: Client) -> None:
    _, c = client
    chunks = sse_chunks(await c.post(COMPLETIONS, json=completion_body(max_tokens=3, stream=True)))
    assert all(ch["choices"] for ch in chunks)
    assert all("usage" not in ch for ch in chunks)


async def test_prompt_as_token_ids(client: Client) -> None:
    _, c = client
    ids = list(range(100, 137))
    resp = await c.post(COMPLETIONS, json=completion_body(ids, max_tokens=4))
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (["The quick brown fox jumps"], "The quick brown fox jumps"),
        ([[5, 6, 7, 8, 9]], [5, 6, 7, 8, 9]),
    ],
    ids=["one-string", "one-id-list"],
)
async def test_one_element_prompt_list(client: Client, prompt: Any, expected: Any) -> None:
    _, c = client
    single = await c.post(COMPLETIONS, json=completion_body(expected, max_tokens=2, seed=1))
    listed = await c.post(COMPLETIONS, json=completion_body(prompt, max_tokens=2, seed=1))
    assert listed.status_code == 200, listed.text
    assert listed.json()["usage"] == single.json()["usage"]
    assert listed.json()["choices"][0]["text"] == single.json()["choices"][0]["text"]


async def test_string_prompt_counted_by_bytes(client: Client) -> None:
    _, c = client
    # Without a tokenizer the documented approximation is ceil(utf8_bytes / 4).
    resp = await c.post(COMPLETIONS, json=completion_body("x" * 41, max_tokens=1))
    assert resp.json()["usage"]["prompt_tokens"] == 11


@pytest.mark.parametrize(
    "prompt",
    [["first prompt", "second prompt"], [[1, 2], [3, 4]], []],
    ids=["two-strings", "two-id-lists", "empty"],
)
async def test_batched_or_empty_prompt_rejected(client: Client, prompt: Any) -> None:
    _, c = client
    resp = await c.post(COMPLETIONS, json=completion_body(prompt, max_tokens=2))
    assert_error(resp, 400, type_="invalid_request_error", param="prompt")
