"""Peer routers in front of `pdgate backend` processes: SGLang's and vLLM's Rust routers in P/D
mode, 2 prefill + 2 decode instances, chat and completions, streaming and not.

The routers are real software no one here wrote (PyPI ``sglang-router`` and ``vllm-router``).
If a router's binary cannot run on this machine at all (``--help`` fails), its tests skip with
the reason; once it runs, every failure is a failure.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from backends.tokens import TokenCounter
from tests.backend_procs import MODEL, Proc, run_pd_backends, spawn
from tests.helpers import free_port

pytestmark = pytest.mark.system

BIN = Path(sys.executable).parent
ROUTERS = {
    "vllm-router": [str(BIN / "vllm-router")],
    "sglang-router": [sys.executable, "-m", "sglang_router.launch_router"],
}


def _runnable(kind: str) -> str | None:
    """None if the router's binary runs here, else why not."""
    try:
        out = subprocess.run(
            [*ROUTERS[kind], "--help"], capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{kind} cannot start here: {exc}"
    if out.returncode != 0:
        return f"{kind} --help exited {out.returncode}: {out.stderr.decode()[-500:]}"
    return None


def router_argv(kind: str, port: int, prefill: list[Proc], decode: list[Proc]) -> list[str]:
    argv = [*ROUTERS[kind], "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--prometheus-port", str(free_port()), "--policy", "round_robin"]
    if kind == "vllm-router":
        argv += ["--vllm-pd-disaggregation", "--kv-connector", "nixl"]
        for p in prefill:
            argv += ["--prefill", p.url]
    else:
        argv += ["--pd-disaggregation"]
        for p in prefill:
            argv += ["--prefill", p.url, str(p.bootstrap_port)]
    for d in decode:
        argv += ["--decode", d.url]
    return argv


@pytest.fixture(scope="module")
def backends() -> Iterator[tuple[list[Proc], list[Proc]]]:
    with run_pd_backends(2, 2, "--time-scale", "10") as pd:
        yield pd


@pytest.fixture(scope="module", params=list(ROUTERS))
def router(
    request: pytest.FixtureRequest, backends: tuple[list[Proc], list[Proc]]
) -> Iterator[str]:
    kind: str = request.param
    reason = _runnable(kind)
    if reason is not None:
        print(f"skipping {kind} interop: {reason}")
        pytest.skip(reason)
    port = free_port()
    with spawn(router_argv(kind, port, *backends), "/health", port) as proc:
        _wait_serving(proc)
        yield proc.url


def _wait_serving(proc: Proc, limit_s: float = 60.0) -> None:
    """Routers register workers in the background: wait until one request goes through."""
    deadline = time.monotonic() + limit_s
    body = {"model": MODEL, "prompt": "ping", "max_tokens": 1}
    while True:
        try:
            if httpx.post(proc.url + "/v1/completions", json=body, timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"router never served a request:\n{proc.log()[-4000:]}")
        time.sleep(0.2)


def _chat(seed: int, **fields: Any) -> dict[str, Any]:
    content = "Explain prefill/decode disaggregation in one paragraph."
    messages = [{"role": "user", "content": content}]
    return {"model": MODEL, "messages": messages, "max_tokens": 16, "seed": seed, **fields}


def _completion(seed: int, **fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": "The KV cache moves",
        "max_tokens": 12,
        "seed": seed,
        **fields,
    }


def _expected_prompt(body: dict[str, Any]) -> int:
    counter = TokenCounter()
    return counter.chat(body["messages"]) if "messages" in body else counter.prompt(body["prompt"])


def _events(text: str) -> list[dict[str, Any]]:
    payloads = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
    assert payloads[-1] == "[DONE]", payloads[-3:]
    return [orjson.loads(p) for p in payloads[:-1]]


def _text(events: list[dict[str, Any]]) -> str:
    out = []
    for e in events:
        for c in e.get("choices") or []:
            out.append((c.get("delta") or {}).get("content") or c.get("text") or "")
    return "".join(out)


def _settled(backends: tuple[list[Proc], list[Proc]]) -> None:
    """Every prefill instance freed its KV: the decode side pulled it (no recompute)."""
    prefill, decode = backends
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        held = [httpx.get(p.url + "/get_load").json()["num_tokens"] for p in prefill]
        if not any(held):
            break
        time.sleep(0.02)
    assert not any(held), held
    for d in decode:
        assert "recomputing" not in d.log()
        assert "did not arrive" not in d.log()


@pytest.mark.parametrize(
    ("path", "make"), [("/v1/chat/completions", _chat), ("/v1/completions", _completion)]
)
def test_non_streaming(router: str, backends: Any, path: str, make: Any) -> None:
    body = make(seed=11)
    r = httpx.post(router + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    assert len(text.split()) == body["max_tokens"]
    assert out["usage"]["completion_tokens"] == body["max_tokens"]
    assert out["usage"]["prompt_tokens"] == _expected_prompt(body)
    _settled(backends)


@pytest.mark.parametrize(
    ("path", "make"), [("/v1/chat/completions", _chat), ("/v1/completions", _completion)]
)
def test_streaming_matches_non_streaming(router: str, backends: Any, path: str, make: Any) -> None:
    whole = httpx.post(router + path, json=make(seed=21), timeout=30).json()
    body = make(seed=21, stream=True, stream_options={"include_usage": True})
    r = httpx.post(router + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    events = _events(r.text)
    choice = whole["choices"][0]
    assert _text(events) == (
        choice["message"]["content"] if "message" in choice else choice["text"]
    )
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == body["max_tokens"]
    assert usage["prompt_tokens"] == _expected_prompt(body)
    _settled(backends)


def test_requests_spread_over_both_decode_instances(router: str, backends: Any) -> None:
    _, decode = backends
    before = [_generated(d) for d in decode]
    for seed in range(6):
        assert httpx.post(router + "/v1/chat/completions", json=_chat(seed), timeout=30).is_success
    after = [_generated(d) for d in decode]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def _generated(p: Proc) -> float:
    for line in httpx.get(p.url + "/metrics").text.splitlines():
        if line.startswith("vllm:generation_tokens_total{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
