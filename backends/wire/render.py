"""OpenAI wire format: response bodies, SSE chunks and the error envelope, as bytes.

Shared by the gateway (``gateway/api``) and the emulated backend server (``backends/server``),
so the OpenAI format is written once.

Streaming chunks are the hot path: each is a precomputed prefix, the JSON-encoded text and a
precomputed suffix, so a token costs one ``orjson.dumps`` of a string and two concatenations —
no per-token dicts or pydantic objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from backends.wire.relay import Accumulator, stream_event

DONE = b"data: [DONE]\n\n"


def error_envelope(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> bytes:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    error = {"message": message, "type": type_, "param": param, "code": code}
    return orjson.dumps({"error": error})


def usage_dict(
    prompt: int,
    completion: int,
    cached: int | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``usage``; ``prompt_tokens_details.cached_tokens`` only where it is known; ``details``:
    an upstream's other usage fields (``completion_tokens_details``...), relayed."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if details:
        for key, value in details.items():
            usage.setdefault(key, value)
    if cached is not None:
        prompt_details = usage.get("prompt_tokens_details")
        merged = dict(prompt_details) if isinstance(prompt_details, dict) else {}
        usage["prompt_tokens_details"] = {**merged, "cached_tokens": cached}
    return usage


class WireFormat:
    """Chunks and bodies for one request of one API (``chat`` or ``completions``)."""

    def __init__(
        self, api: str, request_id: str, model: str, created: int, include_usage: bool
    ) -> None:
        self.api = api
        self.include_usage = include_usage
        chat = api == "chat"
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.created = created
        self._object = "chat.completion.chunk" if chat else "text_completion"
        head = orjson.dumps(
            {"id": self.id, "object": self._object, "created": created, "model": model}
        )[:-1]
        usage = b',"usage":null' if include_usage else b""
        if chat:
            self._prefix = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":'
            self._suffix = b'},"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"
            self._role = (
                b"data: " + head + b',"choices":[{"index":0,"delta":{"role":'
                b'"assistant","content":""},"logprobs":null,"finish_reason":null}]'
                + usage
                + b"}\n\n"
            )
        else:
            self._prefix = b"data: " + head + b',"choices":[{"index":0,"text":'
            self._suffix = b',"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"
            self._role = b""
        self._head = head
        self._usage_tail = usage

    def opening(self) -> bytes:
        """Sent before the first text (chat: the assistant role delta)."""
        return self._role

    def text(self, text: str) -> bytes:
        return self._prefix + orjson.dumps(text) + self._suffix

    def text_with_usage(self, text: str, prompt: int, completion: int) -> bytes:
        """A text chunk carrying running usage (vLLM's ``continuous_usage_stats``)."""
        close = b"}" if self.api == "chat" else b""
        return (
            self._prefix
            + orjson.dumps(text)
            + close
            + b',"logprobs":null,"finish_reason":null}],"usage":'
            + orjson.dumps(usage_dict(prompt, completion))
            + b"}\n\n"
        )

    def relayed(self, choice: Mapping[str, Any]) -> bytes:
        """An upstream's rich choice as one event of this stream (:mod:`backends.wire.relay`)."""
        return stream_event(self._head, choice, self._usage_tail)

    def finish(self, reason: str) -> bytes:
        empty = b'"delta":{}' if self.api == "chat" else b'"text":""'
        return (
            b"data: "
            + self._head
            + b',"choices":[{"index":0,'
            + empty
            + b',"logprobs":null,"finish_reason":'
            + orjson.dumps(reason)
            + b"}]"
            + self._usage_tail
            + b"}\n\n"
        )

    def usage(
        self,
        prompt: int,
        completion: int,
        cached: int | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> bytes:
        return (
            b"data: "
            + self._head
            + b',"choices":[],"usage":'
            + orjson.dumps(usage_dict(prompt, completion, cached, details))
            + b"}\n\n"
        )

    def body(
        self,
        text: str,
        finish_reason: str,
        prompt: int,
        completion: int,
        cached: int | None = None,
        extra: Mapping[str, Any] | None = None,
        relayed: Accumulator | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> bytes:
        """A whole non-streaming response; ``extra`` adds top-level fields (vLLM's
        ``kv_transfer_params``); ``relayed`` the message and choice fields an upstream's rich
        events carried; ``details`` its usage details."""
        choice: dict[str, Any]
        if self.api == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        if relayed is not None:
            message, fields = relayed.fields()
            if "message" in choice:
                if not text and "tool_calls" in message:
                    message["content"] = None  # a tool call's answer has no content
                choice["message"].update(message)
            choice.update(fields)
        out: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_dict(prompt, completion, cached, details),
        }
        if extra:
            out.update(extra)
        return orjson.dumps(out)
