"""Shared pieces of the integration suite: the app in-process, fake backends, SSE and metrics.

Every test drives the gateway over HTTP (``httpx.ASGITransport`` with the app's lifespan run),
so routing, validation, error rendering and resource accounting are exercised end to end.
``ASGITransport`` buffers a whole response: streaming tests check the SSE framing and content,
not timing or disconnects (those need a real server; see ``tests/system``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from backends.emulator.catalog import Catalog
from backends.emulator.emulated import EmulatedBackend
from backends.emulator.timing import Link
from gateway.settings import EmulatedWorker, ModelConfig, Settings
from tests.fakes import FakeBackend
from tests.helpers import MODEL, app_client, config, gateway_of, settings

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ERROR_KEYS = {"message", "type", "param", "code"}

Client = tuple[FastAPI, httpx.AsyncClient]


# -- request bodies --------------------------------------------------------------------------


def chat_body(
    content: str = "Tell me about disaggregated serving.", **fields: Any
) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def completion_body(prompt: Any = "Once upon a time", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, **fields}


# -- responses -------------------------------------------------------------------------------


def sse_payloads(resp: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the framing of every event."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    text = resp.text
    assert text.endswith("\n\n"), "every event ends with a blank line"
    payloads: list[str] = []
    for event in text.split("\n\n")[:-1]:
        assert event.startswith("data: "), f"not a data event: {event!r}"
        assert "\n" not in event, f"one line per event: {event!r}"
        payloads.append(event[len("data: ") :])
    return payloads


def sse_chunks(resp: httpx.Response) -> list[dict[str, Any]]:
    """The JSON events of a stream that ended normally with ``data: [DONE]``."""
    payloads = sse_payloads(resp)
    assert payloads, "empty stream"
    assert payloads[-1] == "[DONE]"
    assert payloads.count("[DONE]") == 1
    return [orjson.loads(p) for p in payloads[:-1]]


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    out = []
    for c in chunks:
        for choice in c["choices"]:
            part = choice["delta"].get("content") if "delta" in choice else choice.get("text")
            out.append(part or "")
    return "".join(out)


def assert_error(
    resp: httpx.Response,
    status: int,
    *,
    type_: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error envelope, exactly, with the given status (never FastAPI's ``detail``)."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str)
    assert err["message"]
    if type_ is not None:
        assert err["type"] == type_, err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


# -- metrics ---------------------------------------------------------------------------------


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        v
        for n, lab, v in metric_samples(text)
        if n == name and all(lab.get(k) == want for k, want in labels.items())
    )


def metric_labels(text: str, name: str) -> list[dict[str, str]]:
    return [lab for n, lab, _ in metric_samples(text) if n == name]


# -- backends --------------------------------------------------------------------------------


class FakeFactory:
    """A ``BackendFactory`` making :class:`FakeBackend` instances, kept by worker name."""

    def __init__(self, **knobs: Any) -> None:
        self.knobs = knobs
        self.fakes: dict[str, FakeBackend] = {}

    def __call__(
        self, name: str, spec: EmulatedWorker, model: ModelConfig, link: Link
    ) -> FakeBackend:
        assert name not in self.fakes, "FakeFactory serves one-model configs"
        fake = FakeBackend(name, **self.knobs)
        self.fakes[name] = fake
        return fake

    def role(self, prefix: str) -> list[FakeBackend]:
        return [f for n, f in sorted(self.fakes.items()) if n.startswith(prefix)]

    def calls(self, prefix: str) -> list[int]:
        return [len(f.calls) for f in self.role(prefix)]


def emulated(app: FastAPI) -> list[tuple[str, EmulatedBackend]]:
    out = []
    for w in gateway_of(app).registry.workers():
        assert isinstance(w.backend, EmulatedBackend)
        out.append((w.role, w.backend))
    return out


def assert_idle(app: FastAPI) -> None:
    """No leg in flight anywhere: registry counts, fakes' KV and emulated engines."""
    for w in gateway_of(app).registry.workers():
        assert w.in_flight == 0, (w.id, w.in_flight)
        b = w.backend
        if isinstance(b, FakeBackend):
            assert b.held_kv == 0, (w.id, b.held_kv)
            assert b.running == 0, (w.id, b.running)
        elif isinstance(b, EmulatedBackend):
            e = b.engine
            assert (len(e.running), len(e.waiting)) == (0, 0), w.id
            assert e.free_blocks == e.total_blocks, (w.id, e.free_blocks, e.total_blocks)


# -- waiting ---------------------------------------------------------------------------------


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``condition`` until it holds (a request reached some stage); fail after
    ``timeout_s`` rather than hang the test."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.001)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def default_settings(catalog: Catalog) -> Settings:
    """2 emulated H100 prefill instances, 2 emulated Groq LPU decode instances."""
    return settings(config(), catalog)


@pytest.fixture
async def client(default_settings: Settings) -> AsyncIterator[Client]:
    async with app_client(default_settings) as ac:
        yield ac
