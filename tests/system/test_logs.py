"""`pdgate serve` with JSON-lines logs: every line is JSON, and a request's lines carry its id."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.backend_procs import run_gateway
from tests.helpers import MODEL, config, pool

pytestmark = pytest.mark.system

CONFIG = config(
    prefill=pool("h100-sxm"),
    decode=pool("groq-lpu-v1"),
    server={"log_format": "json", "access_log": True},
)
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_json_lines_carry_the_request_id() -> None:
    with run_gateway(CONFIG) as gw:
        sent = httpx.post(
            gw.url + "/v1/chat/completions", json=BODY, headers={"x-request-id": "c-1"}
        )
        generated = httpx.post(gw.url + "/v1/chat/completions", json={**BODY, "stream": True})
        gw.stop()
        lines = [json.loads(line) for line in gw.log().splitlines() if line.strip()]
    assert sent.headers["x-request-id"] == "c-1"
    new_id = generated.headers["x-request-id"]
    assert len(new_id) >= 16
    assert all({"timestamp", "level", "logger", "message"} <= set(e) for e in lines)
    assert any(e["logger"] == "uvicorn.error" and "startup complete" in e["message"] for e in lines)
    access = [e for e in lines if e["logger"] == "uvicorn.access" and "POST" in e["message"]]
    assert [e.get("request_id") for e in access] == ["c-1", new_id]
