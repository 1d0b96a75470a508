"""Relaying what an upstream says beyond text: tool calls, logprobs, refusals, reasoning, usage
details (design.md §4: the gateway relays, it does not filter).

Plain text takes the fast path (coalesced chunks, the gateway's own precomputed SSE framing).
An upstream event whose choice carries anything else is *rich*: its choice object is kept as
the upstream sent it (:func:`is_rich`) and travels on the chunk (``TokenChunk.choices``), to be

* streamed to the client as its own event, the choice unchanged but for ``index`` (the
  client's single choice), ``finish_reason`` (sent once, at the end) and the role (sent once,
  at the start) — :func:`stream_event`;
* or, for a client that did not ask for a stream (upstreams are always streamed from), folded
  into one message the way OpenAI's SDK accumulates deltas — :class:`Accumulator`: strings
  concatenated, tool calls merged by their ``index`` (arguments concatenated), logprob lists
  extended, anything else last-wins.

Usage details (``completion_tokens_details``, ``prompt_tokens_details`` beyond cached tokens,
anything else an upstream adds) are kept by :func:`usage_details` and merged back into the
client's ``usage``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

# Choice and delta keys the fast path renders itself.
_PLAIN_CHOICE = frozenset({"index", "delta", "text", "finish_reason", "logprobs", "stop_reason"})
_PLAIN_DELTA = frozenset({"role", "content"})
# Usage keys the gateway computes itself.
_OWN_USAGE = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})


def is_rich(choice: Mapping[str, Any]) -> bool:
    """Whether an upstream choice carries more than text (see the module docstring)."""
    if choice.get("logprobs") is not None or _carries(choice, _PLAIN_CHOICE):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and _carries(delta, _PLAIN_DELTA)


def _carries(fields: Mapping[str, Any], plain: frozenset[str]) -> bool:
    """Whether ``fields`` has a key beyond ``plain`` with a value (not None, not empty)."""
    if plain.issuperset(fields):
        return False  # the common case, without a look at the values
    return any(v is not None and v != [] for k, v in fields.items() if k not in plain)


def stream_event(head: bytes, choice: Mapping[str, Any], usage_tail: bytes) -> bytes:
    """One SSE event relaying ``choice`` under this response's ``head`` (its id, object,
    created and model, an unclosed JSON object)."""
    out = dict(choice)
    out["index"] = 0
    out["finish_reason"] = None
    out.pop("stop_reason", None)
    delta = out.get("delta")
    if isinstance(delta, dict) and "role" in delta:
        out["delta"] = {k: v for k, v in delta.items() if k != "role"}
    return b"data: " + head + b',"choices":[' + orjson.dumps(out) + b"]" + usage_tail + b"}\n\n"


class Accumulator:
    """Folds relayed choices into one non-streamed choice's extra fields."""

    def __init__(self) -> None:
        self.message: dict[str, Any] = {}  # beyond role and content (chat)
        self.choice: dict[str, Any] = {}  # beyond index, text/message and finish_reason
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, choices: Iterable[Mapping[str, Any]]) -> None:
        for choice in choices:
            for key, value in choice.items():
                if key in ("index", "finish_reason", "text", "stop_reason"):
                    continue
                if key == "delta" and isinstance(value, dict):
                    self._delta(value)
                elif key == "logprobs":
                    self.choice["logprobs"] = _merge(self.choice.get("logprobs"), value)
                else:
                    self.choice[key] = _merge(self.choice.get(key), value)

    def _delta(self, delta: Mapping[str, Any]) -> None:
        for key, value in delta.items():
            if key in ("role", "content"):
                continue
            if key == "tool_calls" and isinstance(value, list):
                for call in value:
                    if isinstance(call, dict):
                        self._call(call)
            else:
                self.message[key] = _merge(self.message.get(key), value)

    def _call(self, call: Mapping[str, Any]) -> None:
        index = call.get("index", len(self._calls))
        index = index if isinstance(index, int) else len(self._calls)
        known = self._calls.get(index)
        fields = {k: v for k, v in call.items() if k != "index"}
        self._calls[index] = fields if known is None else _merge(known, fields)

    def fields(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(extra message fields, extra choice fields) of the folded response."""
        message = dict(self.message)
        if self._calls:
            message["tool_calls"] = [self._calls[i] for i in sorted(self._calls)]
        return message, dict(self.choice)


def _merge(old: Any, new: Any) -> Any:
    """A delta's value folded into what came before (OpenAI SDK's accumulation)."""
    if old is None:
        return new
    if new is None:
        return old
    if isinstance(old, str) and isinstance(new, str):
        return old + new
    if isinstance(old, list) and isinstance(new, list):
        return old + new
    if isinstance(old, dict) and isinstance(new, dict):
        out = dict(old)
        for key, value in new.items():
            if key in ("id", "type") and key in out:
                continue  # identities are sent once; a repeat is the same value
            out[key] = _merge(out.get(key), value)
        return out
    return new


def usage_details(usage: Mapping[str, Any]) -> dict[str, Any] | None:
    """An upstream usage's fields beyond the three counts (None if there are none)."""
    extra = {k: v for k, v in usage.items() if k not in _OWN_USAGE and v is not None}
    return extra or None
