"""The upstream SSE parser (:mod:`backends.wire.parse`): events are parsed per read, so a burst
becomes one chunk of several tokens; lines split across reads, error events and ``[DONE]``."""

from __future__ import annotations

import orjson
import pytest

from backends.base import LegStats
from backends.errors import BackendOverloaded, LegFailed, UpstreamRejected
from backends.upstream.http import status_error
from backends.wire.parse import StreamParser
from backends.wire.render import DONE, WireFormat


def chat_events(words: list[str]) -> list[bytes]:
    """A vLLM-style chat stream with running usage, one event per token."""
    fmt = WireFormat("chat", "r1", "m", 0, include_usage=True)
    events = [fmt.opening()]
    events += [fmt.text_with_usage(w, 7, i + 1) for i, w in enumerate(words)]
    return [*events, fmt.finish("length"), fmt.usage(7, len(words), 2), DONE]


def test_a_burst_of_events_is_one_chunk_with_every_token() -> None:
    state = StreamParser("decode-0")
    chunk = state.feed(b"".join(chat_events(["a ", "b ", "c "])))
    assert chunk is not None
    assert (chunk.text, chunk.tokens) == ("a b c ", 3)
    assert state.done
    assert state.failure is None


def test_events_arriving_one_at_a_time_stay_one_per_chunk() -> None:
    state = StreamParser("decode-0")
    chunks = [state.feed(e) for e in chat_events(["a ", "b "])]
    assert [(c.text, c.tokens) for c in chunks if c is not None] == [("a ", 1), ("b ", 1)]


def test_lines_split_across_reads_are_joined() -> None:
    data = b"".join(chat_events(["one ", "two ", "three "]))
    state = StreamParser("decode-0")
    texts = []
    for i in range(0, len(data), 7):  # 7-byte reads: every event straddles reads
        chunk = state.feed(data[i : i + 7])
        if chunk is not None:
            texts.append(chunk.text)
    assert "".join(texts) == "one two three "
    assert state.counted == 3
    assert state.done


def test_usage_and_finish_reach_the_last_chunk() -> None:
    state = StreamParser("decode-0")
    state.feed(b"".join(chat_events(["a ", "b "])))
    last = state.last(LegStats())
    assert last.finish_reason == "length"
    assert last.tokens == 0
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.cached_tokens) == (7, 2)


def test_tokens_without_running_usage_count_one_per_event() -> None:
    fmt = WireFormat("completions", "r1", "m", 0, include_usage=False)
    state = StreamParser("decode-0")
    chunk = state.feed(fmt.text("x ") + fmt.text("y ") + fmt.text("z "))
    assert chunk is not None
    assert (chunk.text, chunk.tokens) == ("x y z ", 3)


def test_an_error_event_after_text_keeps_the_text_then_fails() -> None:
    events = chat_events(["a ", "b "])[:3]  # role, a, b
    error = b"data: " + orjson.dumps({"error": {"message": "boom", "code": 500}}) + b"\n\n"
    state = StreamParser("decode-0")
    chunk = state.feed(b"".join(events) + error + chat_events(["never "])[1])
    assert chunk is not None
    assert (chunk.text, chunk.tokens) == ("a b ", 2)
    assert isinstance(state.failure, LegFailed)
    assert "boom" in str(state.failure)


def test_an_unreadable_event_fails_the_stream() -> None:
    state = StreamParser("decode-0")
    assert state.feed(b"data: {not json\n\n") is None
    assert isinstance(state.failure, LegFailed)
    assert "invalid SSE event" in str(state.failure)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_comments_and_other_fields_are_skipped(newline: bytes) -> None:
    fmt = WireFormat("completions", "r1", "m", 0, include_usage=False)
    event = fmt.text("hi ").replace(b"\n", newline)
    state = StreamParser("decode-0")
    chunk = state.feed(b": keep-alive" + newline + b"event: message" + newline + event)
    assert chunk is not None
    assert chunk.text == "hi "


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (400, b'{"object":"error","message":"too long","type":"BadRequest"}', "client"),
        (422, b'{"error":{"message":"bad ids","type":"invalid_request_error"}}', "client"),
        (413, b"too large", "client"),
        (404, b'{"error":{"message":"no such model"}}', "worker"),
        (401, b"", "worker"),
        (429, b'{"error":{"message":"busy"}}', "busy"),
        (503, b'{"error":{"message":"kv full","code":"overloaded"}}', "busy"),
        (503, b"down", "worker"),
        (500, b'{"error":{"message":"boom"}}', "worker"),
    ],
)
def test_upstream_statuses_are_told_apart(status: int, body: bytes, kind: str) -> None:
    error = status_error("decode-0", status, body)
    expected = {"client": UpstreamRejected, "busy": BackendOverloaded, "worker": LegFailed}[kind]
    assert type(error) is expected
    if isinstance(error, UpstreamRejected):
        assert error.status == status
        assert "decode-0" not in error.message


def test_a_client_error_keeps_the_upstreams_envelope() -> None:
    raw = b'{"error":{"message":"m","type":"t","param":"prompt","code":"c"}}'
    error = status_error("x", 400, raw)
    assert isinstance(error, UpstreamRejected)
    assert (error.message, error.type, error.param, error.code) == ("m", "t", "prompt", "c")
