"""The client has its answer as soon as the last token is in; the request's remaining work
(closing the legs, releasing slots, metrics) runs after it, off the latency path.

Real uvicorn in this process, with fake legs that, after their last token, wait for the test
before they end: the response must arrive while they wait.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from tests.fakes import FakeBackend
from tests.helpers import MODEL, config, gateway_of, settings, uvicorn_in_process
from tests.integration.conftest import FakeFactory, eventually, metric_value

pytestmark = pytest.mark.system


@pytest.fixture
async def served() -> AsyncIterator[tuple[FastAPI, str, asyncio.Event]]:
    wind_down = asyncio.Event()
    app = create_app(settings(config()), backend_factory=FakeFactory(wind_down=wind_down))
    async with uvicorn_in_process(app) as url:
        yield app, url, wind_down


def _requests(app: FastAPI) -> float:
    text = gateway_of(app).metrics.render().decode()
    return metric_value(
        text, "pdgate_requests_total", model=MODEL, mode="disaggregated", outcome="ok"
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_answer_goes_out_before_the_legs_wind_down(
    served: tuple[FastAPI, str, asyncio.Event], stream: bool
) -> None:
    app, url, wind_down = served
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "stream": stream}
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        resp = await client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    if stream:
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    else:
        answer = resp.json()
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 5

    # Answered, while the decode leg is still winding down: its slot is held, not yet counted.
    decoding = [w for w in gateway_of(app).registry.workers() if w.in_flight]
    assert [w.role for w in decoding] == ["decode"]
    assert isinstance(decoding[0].backend, FakeBackend)
    assert decoding[0].backend.running == 1
    assert _requests(app) == 0

    wind_down.set()
    await eventually(lambda: not any(w.in_flight for w in gateway_of(app).registry.workers()))
    await eventually(lambda: _requests(app) == 1)
