"""`pdgate serve` as a real process under uvicorn, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from backends.emulator.catalog import Catalog
from backends.emulator.timing import StepShape, kv_transfer_time
from tests.helpers import MODEL, config, pool, run_server

pytestmark = pytest.mark.system

# One prefill and one decode instance, so the expected schedule is unambiguous.
SERVER_CONFIG = config(prefill=pool("h100-sxm", 1), decode=pool("groq-lpu-v1", 1))


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with run_server(SERVER_CONFIG) as base:
        yield base


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_chat_non_stream_reports_usage(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, seed=7
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert len(out.choices[0].message.content.split()) == 12  # one synthetic word per token


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Count to ten."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, seed=3)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=20,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == whole.choices[0].message.content
    assert finish == "length"
    assert usage is not None
    assert whole.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, 20)


def test_completions_stream(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True
    )
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert len("".join(pieces).split()) == 8


def test_timing_follows_the_emulated_schedule(client: openai.OpenAI, catalog: Catalog) -> None:
    """Client-measured TTFT and mean ITL are within 10% of the device schedule at low load.

    Expected values come from the same physics the engine uses: TTFT is one H100 prefill step
    of the whole prompt; the decode stream is the KV transfer plus one LPU step per token.
    """
    # ≈ 7,400 tokens: a prefill long enough (≈ 0.28 s on an H100) that client-side overheads of a
    # few milliseconds stay well inside the tolerance, yet one chunk (max_num_batched_tokens 8192).
    prompt = "lorem ipsum dolor sit amet " * 1100
    n = 120
    # Warm up both ends first (lazy imports in the client, first-request paths in the server).
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=n,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    assert usage is not None
    assert usage.completion_tokens == n
    prompt_tokens = usage.prompt_tokens
    assert prompt_tokens <= 8192  # one prefill step, as the expected schedule below assumes

    prefill = catalog.deployment("h100-sxm", MODEL)
    decode = catalog.deployment("groq-lpu-v1", MODEL)
    link = catalog.link("roce_200g")
    expected_ttft = prefill.step_time(StepShape.of([(prompt_tokens, 0)]))
    transfer = kv_transfer_time(
        link, prompt_tokens * prefill.kv_bytes_per_token, -(-prompt_tokens // 16)
    )
    steps = sum(decode.step_time(StepShape.of([(1, prompt_tokens + k)])) for k in range(n - 1))
    expected_itl = (transfer + steps) / (n - 1)

    ttft = stamps[0] - t0
    itl = (stamps[-1] - stamps[0]) / (n - 1)
    assert ttft == pytest.approx(expected_ttft, rel=0.10)
    assert itl == pytest.approx(expected_itl, rel=0.10)


def _metric_values(text: str, name: str) -> list[float]:
    return [float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)]


async def test_disconnects_free_every_slot(server: str) -> None:
    """Clients that hang up mid-stream leave no running sequence and no in-flight count."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long essay."}],
        "max_tokens": 4000,  # ~8 s of LPU decode: only a disconnect can end these early
        "stream": True,
    }

    async def open_and_drop(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    break  # leaving the block closes the connection mid-stream

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=server, timeout=30, limits=limits) as client:
        await asyncio.gather(*(open_and_drop(client) for _ in range(40)))
        dropped = time.monotonic()
        while True:
            metrics = (await client.get("/metrics")).text
            running = _metric_values(metrics, "pdgate_worker_running_sequences")
            in_flight = _metric_values(metrics, "pdgate_worker_in_flight")
            if not any(running) and not any(in_flight):
                break
            assert time.monotonic() - dropped < 1.0, f"still busy: {running=} {in_flight=}"
            await asyncio.sleep(0.02)
    assert running
    assert in_flight
    assert 'outcome="cancelled"' in metrics
