"""Reading what an OpenAI-compatible upstream answers: SSE streams, whole JSON bodies and
their ``usage``; and writing the body of an upstream leg.

The stream parser works per read, not per line: whatever arrived together becomes one
:class:`~backends.base.TokenChunk` of several tokens. Each event is reduced to an
:class:`Event` — its text, finish reason and usage, plus the rest of its choice (``delta`` or
``message`` fields other than the text, and the choice's own other fields) in ``extra``, so
fields an upstream adds (tool calls, logprobs, reasoning) are at hand without another parse.

Example::

    parser = StreamParser("decode-0")
    chunk = parser.feed(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\\n\\n')
    chunk.text, chunk.tokens          # ("Hi", 1)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from backends.base import GenerationParams, LegStats, ReportedUsage, TokenChunk
from backends.errors import LegFailed
from backends.wire.relay import is_rich, usage_details

_NOT_EXTRA = frozenset(("index", "delta", "message", "text", "finish_reason", "content"))


@dataclass(slots=True)
class Event:
    """One SSE event's first choice, reduced."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    # Everything else the choice carried (its delta's or message's other fields, and the
    # choice's own, e.g. ``logprobs``), for callers that pass fields through.
    extra: dict[str, Any] = field(default_factory=dict)


def event_of(obj: Mapping[str, Any], *, extra: bool = True) -> Event:
    """An event (a parsed ``data:`` object, or a whole response body) reduced to its parts;
    ``extra=False`` skips collecting the other fields (the streaming hot path, until a caller
    passes them through)."""
    usage = obj.get("usage")
    event = Event(usage=usage if isinstance(usage, dict) else None)
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        inner = choice.get("delta")
        if not isinstance(inner, dict):
            inner = choice.get("message")
        part = inner.get("content") if isinstance(inner, dict) else choice.get("text")
        if isinstance(part, str):
            event.text += part
        event.finish_reason = choice.get("finish_reason") or event.finish_reason
        if extra:
            _collect(event.extra, inner if isinstance(inner, dict) else {}, choice)
    return event


def _collect(into: dict[str, Any], inner: Mapping[str, Any], choice: Mapping[str, Any]) -> None:
    for fields in (inner, choice):
        for key, value in fields.items():
            if value is not None and key not in _NOT_EXTRA:
                into[key] = value


class StreamParser:
    """Turns SSE bytes into chunks, counting tokens from running or final usage.

    :meth:`feed` takes whatever was read and returns one chunk with the text of every complete
    ``data:`` line in it (None if none had text). An error event or an unreadable one ends
    the stream: the text before it is still returned, and :attr:`failure` is set to raise
    next, so tokens already produced are delivered (and a leg that produced some is never
    retried)."""

    __slots__ = ("counted", "done", "failure", "finish", "keep_extra", "name", "partial", "usage")

    def __init__(self, name: str, *, keep_extra: bool = False) -> None:
        self.name = name
        self.keep_extra = keep_extra  # collect each event's other fields (Event.extra)
        self.partial = b""  # an incomplete last line, waiting for the next read
        self.counted = 0
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False  # [DONE] seen
        self.failure: LegFailed | None = None

    def feed(self, data: bytes) -> TokenChunk | None:
        """One chunk of every complete event read so far; when one of them carried more than
        text (:func:`~backends.wire.relay.is_rich`), the chunk also carries their choices as
        the upstream sent them, to be relayed."""
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        text: list[str] = []
        tokens = 0
        choices: list[dict[str, Any]] = []
        rich = False
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                break
            try:
                part, n, choice = self._event(payload)
            except LegFailed as exc:
                self.failure = exc
                break
            if part:
                text.append(part)
            tokens += n
            if choice is not None and n:
                choices.append(choice)
                rich = rich or is_rich(choice)
        if not tokens:
            return None
        return TokenChunk("".join(text), tokens, choices=tuple(choices) if rich else ())

    def _event(self, payload: bytes) -> tuple[str, int, dict[str, Any] | None]:
        """One event's text, the tokens it carries, and its choice (relayed when rich)."""
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise LegFailed(f"{self.name}: invalid SSE event: {snippet(payload)}") from exc
        if not isinstance(obj, dict):
            return "", 0, None
        if "error" in obj:
            error = snippet(orjson.dumps(obj["error"]))
            raise LegFailed(f"{self.name}: upstream stream failed: {error}")
        event = event_of(obj, extra=self.keep_extra)
        usage = event.usage
        if usage is not None:
            self.usage = usage
        self.finish = event.finish_reason or self.finish
        choices = obj.get("choices")
        choice = choices[-1] if isinstance(choices, list) and choices else None
        choice = choice if isinstance(choice, dict) else None  # n=1: one choice
        if not event.text and (choice is None or not is_rich(choice)):
            return "", 0, None
        if usage is not None and isinstance(usage.get("completion_tokens"), int):
            tokens = usage["completion_tokens"] - self.counted
        else:
            tokens = 1
        tokens = max(tokens, 1)  # an event with something in it is at least one token
        self.counted += tokens
        return event.text, tokens, choice

    def last(self, stats: LegStats) -> TokenChunk:
        usage = self.usage or {}
        total = usage.get("completion_tokens")
        extra = total - self.counted if isinstance(total, int) and total > self.counted else 0
        return TokenChunk("", extra, self.finish or "length", stats, reported_usage(usage))


def reported_usage(data: Mapping[str, Any] | None) -> ReportedUsage | None:
    """Prompt (and cached) tokens from a ``usage`` object, if it counts the prompt."""
    if not isinstance(data, Mapping) or not isinstance(data.get("prompt_tokens"), int):
        return None
    details = data.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return ReportedUsage(
        data["prompt_tokens"], cached if isinstance(cached, int) else None, usage_details(data)
    )


def body_usage(data: Mapping[str, Any]) -> ReportedUsage | None:
    """:func:`reported_usage` of a whole response body."""
    usage = data.get("usage")
    return reported_usage(usage if isinstance(usage, dict) else None)


def message(data: Mapping[str, Any]) -> tuple[str, str | None]:
    """A whole response's text and finish reason (chat ``message`` or completions ``text``)."""
    event = event_of(data)
    return event.text, event.finish_reason


def relayed_choice(data: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """A whole response's choice as one streamed event's (its chat ``message`` as a
    ``delta``), when it carries more than text; empty otherwise."""
    choices = data.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    if not isinstance(choice, dict):
        return ()
    event = dict(choice)
    if isinstance(event.get("message"), dict):
        event["delta"] = event.pop("message")
    return (event,) if is_rich(event) else ()


def upstream_body(
    params: GenerationParams, *, stream: bool, continuous: bool = False, **fields: Any
) -> dict[str, Any]:
    """The client's body for an upstream leg: explicit ``max_tokens``, our stream options."""
    body = dict(params.body)
    body.pop("max_completion_tokens", None)
    body["max_tokens"] = params.max_tokens
    body["stream"] = stream
    if stream:
        options: dict[str, Any] = {"include_usage": True}
        if continuous:
            options["continuous_usage_stats"] = True
        body["stream_options"] = options
    else:
        body.pop("stream_options", None)
    body.update(fields)
    return body


def snippet(raw: bytes, limit: int = 300) -> str:
    """The start of a body or event, for an error message."""
    return raw[:limit].decode("utf-8", "replace")
