"""A client's error is not a worker's failure, against real ``pdgate backend`` processes.

* An upstream's 4xx (here: a context longer than the LPU decode instance holds) goes back to
  the client with its status and envelope, is not retried, and leaves the circuit closed.
* A stopped (SIGSTOP) prefill worker is a 504 timeout, not a 503.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.backend_procs import MODEL, Proc, http_pools, run_backend, run_gateway

pytestmark = pytest.mark.timeout(120)


def _one_model(pools: dict[str, Any], **model: Any) -> dict[str, Any]:
    return {"models": [{"name": MODEL, "pools": pools, **model}]}


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("protocol", ["vllm-nixl", "sglang-bootstrap"])
def test_upstream_400_is_the_clients_and_keeps_the_model_up(protocol: str) -> None:
    """Before: three such requests opened the decode circuit and every later request (and
    /ready) answered 503."""
    bootstrap = protocol == "sglang-bootstrap"
    with (
        run_backend("--time-scale", "0", role="prefill", bootstrap=bootstrap) as p,
        run_backend("--time-scale", "0", role="decode", device="groq-lpu-v1") as d,
    ):
        data = _one_model(
            http_pools(protocol, [p], [d]), circuit={"failure_threshold": 2, "cooldown_s": 60}
        )
        with run_gateway(data) as g:
            too_long = {"model": MODEL, "prompt": "hello", "max_tokens": 100000}
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
            for path, stream in (
                ("/v1/completions", False),
                ("/v1/completions", True),
                ("/v1/chat/completions", True),  # the role event must not commit a 200
                ("/v1/chat/completions", False),
                ("/v1/completions", False),
            ):
                body = {**too_long, "stream": stream}
                if path == "/v1/chat/completions":
                    body = {**chat, "max_tokens": 100000, "stream": stream}
                r = httpx.post(g.url + path, json=body, timeout=30)
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert "maximum context length" in error["message"]
                assert error["type"] == "BadRequestError"  # the upstream's own envelope
                assert "decode-0" not in error["message"]
            ok = httpx.post(g.url + "/v1/completions", json={**too_long, "max_tokens": 4})
            assert ok.status_code == 200, ok.text
            assert httpx.get(g.url + "/ready").status_code == 200
            metrics = httpx.get(g.url + "/metrics").text
            assert _metric(metrics, "pdgate_retries_total") == 0
            assert _metric(metrics, "pdgate_worker_circuit_state") == 0


@contextlib.contextmanager
def _stopped(proc: Proc) -> Iterator[None]:
    os.kill(proc.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.process.pid, signal.SIGCONT)


def test_stopped_prefill_worker_is_a_timeout() -> None:
    with (
        run_backend("--time-scale", "0", role="prefill") as p,
        run_backend("--time-scale", "0", role="decode", device="groq-lpu-v1") as d,
    ):
        data = _one_model(
            http_pools("vllm-nixl", [p], [d]),
            timeouts={"prefill_s": 1.0},
            retries={"prefill": 2, "decode": 1, "backoff_s": 0.01},
        )
        with run_gateway(data) as g:
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
            assert httpx.post(g.url + "/v1/completions", json=body, timeout=30).status_code == 200
            with _stopped(p):
                started = time.monotonic()
                r = httpx.post(g.url + "/v1/completions", json=body, timeout=30)
                elapsed = time.monotonic() - started
            assert r.status_code == 504, r.text
            assert r.json()["error"]["code"] == "upstream_timeout"
            assert elapsed < 5.0, "one prefill_s, not one per retry on the same stalled worker"
            r = httpx.post(g.url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text  # resumed: served again
