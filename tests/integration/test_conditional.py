"""Conditional disaggregation: per request, prefill remotely or on the decode worker itself,
with the reason counted, and the same text and usage either way."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from backends.emulator import synth
from backends.emulator.catalog import Catalog
from backends.tokens import TokenCounter
from gateway.prefix import chat_block_hashes
from tests.fakes import FakeBackend
from tests.helpers import MODEL, app_client, config, gateway_of, pool, settings
from tests.integration.conftest import (
    CHAT,
    FakeFactory,
    assert_idle,
    chat_body,
    emulated,
    metric_value,
    sse_chunks,
    streamed_text,
)

DECISIONS = ("remote", "short_prompt", "prefix_hit", "prefill_busy", "decode_full")
SHORT = "How are you?"
LONG = "Explain the KV cache handoff between prefill and decode in detail. " * 60  # ~1000 tokens


def conditional(
    decode_replicas: int = 2, decode_policy: str = "round_robin", **rules: Any
) -> dict[str, Any]:
    return config(
        mode="conditional",
        decode=pool("groq-lpu-v1", decode_replicas, policy=decode_policy),
        conditional=rules,
    )


async def decisions(c: httpx.AsyncClient) -> dict[str, float]:
    text = (await c.get("/metrics")).text
    return {
        d: metric_value(text, "pdgate_disaggregation_decisions_total", decision=d)
        for d in DECISIONS
    }


def only(decision: str, n: int = 1) -> dict[str, float]:
    out = dict.fromkeys(DECISIONS, 0.0)
    out[decision] = float(n)
    return out


async def ask(
    c: httpx.AsyncClient, content: str, *, seed: int = 5, max_tokens: int = 6, stream: bool = False
) -> None:
    """One chat request; checks its text and usage against what any route must produce."""
    body = chat_body(content, max_tokens=max_tokens, seed=seed, stream=stream)
    prompt = TokenCounter().chat(body["messages"])
    usage = {"prompt_tokens": prompt, "completion_tokens": max_tokens}
    usage["total_tokens"] = prompt + max_tokens
    if stream:
        body["stream_options"] = {"include_usage": True}
        chunks = sse_chunks(await c.post(CHAT, json=body))
        assert streamed_text(chunks) == synth.text(seed, 0, max_tokens)
        assert chunks[-1]["usage"] == usage
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    else:
        resp = await c.post(CHAT, json=body)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["choices"][0]["message"]["content"] == synth.text(seed, 0, max_tokens)
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"] == usage


def calls(fakes: FakeFactory, role: str) -> list[str]:
    return [call for f in fakes.role(role) for call in f.calls]


# -- the four decisions -----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_short_prompt_prefills_locally(catalog: Catalog, stream: bool) -> None:
    fakes = FakeFactory()
    async with app_client(settings(conditional(), catalog), backend_factory=fakes) as (app, c):
        await ask(c, SHORT, stream=stream)
        assert calls(fakes, "prefill") == []
        assert calls(fakes, "decode") == ["generate"]
        assert await decisions(c) == only("short_prompt")
        assert_idle(app)


@pytest.mark.parametrize("stream", [False, True])
async def test_long_prompt_prefills_remotely(catalog: Catalog, stream: bool) -> None:
    fakes = FakeFactory()
    async with app_client(settings(conditional(), catalog), backend_factory=fakes) as (app, c):
        await ask(c, LONG, stream=stream)
        assert calls(fakes, "prefill") == ["prefill"]
        assert calls(fakes, "decode") == ["decode"]
        assert await decisions(c) == only("remote")
        assert_idle(app)


async def test_prompt_length_threshold_is_inclusive(catalog: Catalog) -> None:
    messages = [{"role": "user", "content": LONG}]
    tokens = TokenCounter().chat(messages)
    fakes = FakeFactory()
    cfg = conditional(local_max_prompt_tokens=tokens)
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        await ask(c, LONG)  # exactly at the threshold: local
        await ask(c, LONG + "!" * 8)  # two tokens more: remote
        assert await decisions(c) == {**only("short_prompt"), "remote": 1.0}
        assert calls(fakes, "prefill") == ["prefill"]
        assert_idle(app)


async def test_emulated_engines_are_charged_where_the_prefill_ran(catalog: Catalog) -> None:
    cfg = config(
        mode="conditional",
        prefill=pool("h100-sxm", 2, time_scale=100),
        decode=pool("groq-lpu-v1", 1, time_scale=100),
    )
    async with app_client(settings(cfg, catalog)) as (app, c):

        def charged(role: str) -> int:
            return sum(b.engine.stats.prompt_tokens for r, b in emulated(app) if r == role)

        short = await c.post(CHAT, json=chat_body(SHORT, max_tokens=4, seed=1))
        assert short.status_code == 200, short.text
        short_prompt = short.json()["usage"]["prompt_tokens"]
        assert charged("prefill") == 0  # the prefill pool was never touched
        assert charged("decode") == short_prompt

        long = await c.post(CHAT, json=chat_body(LONG, max_tokens=4, seed=1))
        assert long.status_code == 200, long.text
        long_prompt = long.json()["usage"]["prompt_tokens"]
        assert charged("prefill") == long_prompt
        # Both responses carry the same synthetic continuation for the same seed.
        assert short.json()["choices"][0] == long.json()["choices"][0]
        assert await decisions(c) == {**only("short_prompt"), "remote": 1.0}
        assert_idle(app)


async def test_repeated_conversation_is_a_prefix_hit(catalog: Catalog) -> None:
    fakes = FakeFactory()
    cfg = conditional(decode_replicas=1, local_max_prompt_tokens=8, local_min_prefix_hit=1.0)
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        await ask(c, LONG, seed=1)
        assert await decisions(c) == only("remote")
        # The decode worker now holds this prompt's KV: the same prompt stays there.
        await ask(c, LONG, seed=2)
        assert await decisions(c) == {**only("remote"), "prefix_hit": 1.0}
        assert calls(fakes, "prefill") == ["prefill"]
        assert calls(fakes, "decode") == ["decode", "generate"]
        # A different long prompt shares nothing: remote again.
        await ask(c, LONG.replace("KV", "kv"), seed=3)
        assert (await decisions(c))["remote"] == 2
        assert calls(fakes, "prefill") == ["prefill", "prefill"]
        assert_idle(app)


async def test_conversation_continuation_is_a_prefix_hit(catalog: Catalog) -> None:
    fakes = FakeFactory()
    cfg = conditional(decode_replicas=1, local_max_prompt_tokens=8, local_min_prefix_hit=0.5)
    first = [{"role": "user", "content": LONG}]
    follow_up = [
        *first,
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "Go on."},
    ]
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        for messages in (first, follow_up):
            resp = await c.post(CHAT, json={"model": MODEL, "messages": messages, "max_tokens": 3})
            assert resp.status_code == 200, resp.text
            assert resp.json()["usage"]["completion_tokens"] == 3
        assert await decisions(c) == {**only("remote"), "prefix_hit": 1.0}
        shared = chat_block_hashes(first)
        assert chat_block_hashes(follow_up)[: len(shared)] == shared
        assert_idle(app)


@pytest.mark.parametrize(("busy_wait_s", "decision"), [(0.001, "prefill_busy"), (5.0, "remote")])
async def test_predicted_prefill_wait_decides(
    catalog: Catalog, busy_wait_s: float, decision: str
) -> None:
    fakes = FakeFactory(prefill_delay_s=0.02)  # a fake predicts its delay × (1 + running)
    cfg = conditional(prefill_busy_wait_s=busy_wait_s)
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        await ask(c, LONG)
        assert await decisions(c) == only(decision)
        expected = [] if decision == "prefill_busy" else ["prefill"]
        assert calls(fakes, "prefill") == expected
        assert_idle(app)


@pytest.mark.parametrize(
    ("kv_usage", "waiting_tokens", "decision"),
    [
        (0.79, 0, "short_prompt"),
        (0.8, 0, "remote"),
        (0.5, 2_900, "short_prompt"),
        (0.5, 3_000, "remote"),
    ],
)
async def test_local_prefill_needs_kv_room_on_the_decode_worker(
    catalog: Catalog, kv_usage: float, waiting_tokens: int, decision: str
) -> None:
    """A short prompt still goes remote when the decode worker's KV — held, queued, and this
    request's prompt and output — would pass ``local_max_kv_usage`` (0.8 of 10,000 tokens)."""
    fakes = FakeFactory()
    async with app_client(settings(conditional(), catalog), backend_factory=fakes) as (app, c):
        for f in fakes.role("decode"):
            f.kv_capacity_tokens, f.kv_usage, f.waiting_tokens = 10_000, kv_usage, waiting_tokens
        await ask(c, SHORT, max_tokens=6)
        assert await decisions(c) == only(decision)
        assert calls(fakes, "prefill") == ([] if decision == "short_prompt" else ["prefill"])
        assert_idle(app)


@pytest.mark.parametrize(("max_running", "decision"), [(None, "short_prompt"), (1, "short_prompt")])
async def test_local_prefill_needs_a_seat_in_the_decode_batch(
    catalog: Catalog, max_running: int | None, decision: str
) -> None:
    fakes = FakeFactory()
    async with app_client(settings(conditional(), catalog), backend_factory=fakes) as (app, c):
        for f in fakes.role("decode"):
            f.max_running = max_running
        await ask(c, SHORT)
        assert await decisions(c) == only(decision)
        assert_idle(app)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt", [SHORT, LONG])
@pytest.mark.parametrize("full", ["batch", "kv"])
async def test_full_decode_pool_runs_the_whole_request_on_a_prefill_worker(
    catalog: Catalog, stream: bool, prompt: str, full: str
) -> None:
    """No seat in the decode batch: a local request would queue for its first token and a
    remote one for its decode, so a prefill worker with room (a seat and KV) runs the request
    end to end."""
    fakes = FakeFactory()
    async with app_client(settings(conditional(), catalog), backend_factory=fakes) as (app, c):
        for f in fakes.role("decode"):
            f.max_running = 0
        busy = fakes.role("prefill")[0]  # this one has no room either
        if full == "batch":
            busy.max_running = 0
        else:
            busy.kv_capacity_tokens, busy.kv_usage = 10_000, 0.8
        await ask(c, prompt, stream=stream)
        assert await decisions(c) == only("decode_full")
        assert calls(fakes, "decode") == []
        assert [f.calls for f in fakes.role("prefill")] == [[], ["generate"]]
        text = (await c.get("/metrics")).text
        met = metric_value(text, "pdgate_pool_slo_requests_total", pool="prefill", met="true")
        assert met == 1  # the prefill pool ran both phases: it owns both targets
        assert_idle(app)


async def test_with_every_batch_full_the_request_prefills_remotely(catalog: Catalog) -> None:
    fakes = FakeFactory()
    async with app_client(settings(conditional(), catalog), backend_factory=fakes) as (app, c):
        for f in (*fakes.role("decode"), *fakes.role("prefill")):
            f.max_running = 0
        await ask(c, SHORT)
        assert await decisions(c) == only("remote")
        assert calls(fakes, "prefill") == ["prefill"]
        assert calls(fakes, "decode") == ["decode"]
        assert_idle(app)


@pytest.mark.parametrize("stream", [False, True])
async def test_unhealthy_prefill_pool_counts_as_busy(catalog: Catalog, stream: bool) -> None:
    fakes = FakeFactory()
    async with app_client(settings(conditional(), catalog), backend_factory=fakes) as (app, c):
        for f in fakes.role("prefill"):
            f.healthy_flag = False
        await ask(c, LONG, stream=stream)
        assert calls(fakes, "prefill") == []
        assert calls(fakes, "decode") == ["generate"]
        assert await decisions(c) == only("prefill_busy")
        assert_idle(app)


async def test_local_prefill_failure_is_retried_on_another_decode_worker(
    catalog: Catalog,
) -> None:
    fakes = FakeFactory()
    async with app_client(settings(conditional(), catalog), backend_factory=fakes) as (app, c):
        d0, d1 = fakes.role("decode")
        d0.fail_after_tokens = 0  # the local prefill fails before its first token
        await ask(c, SHORT)
        assert (d0.calls, d1.calls) == (["generate"], ["generate"])
        text = (await c.get("/metrics")).text
        assert metric_value(text, "pdgate_retries_total", pool="decode") == 1
        assert_idle(app)


async def test_remote_decode_runs_where_the_prefix_is_recorded(catalog: Catalog) -> None:
    """The prefix is recorded for the worker that decoded; with ``prefix_aware`` choosing the
    decode worker, the repeat lands there and is a prefix hit (the rule is evaluated on the
    chosen decode worker, so the decode pool's policy decides where prefixes are found)."""
    fakes = FakeFactory()
    cfg = conditional(
        decode_policy="prefix_aware", local_max_prompt_tokens=8, local_min_prefix_hit=1.0
    )
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        await ask(c, LONG, seed=1)
        decoded = [f for f in fakes.role("decode") if f.calls == ["decode"]]
        assert len(decoded) == 1
        store = gateway_of(app).registry.store
        hashes = chat_block_hashes([{"role": "user", "content": LONG}])
        holder = f"{MODEL}/{decoded[0].name}"
        assert store.match_prefix(hashes) == {holder: len(hashes)}
        text = (await c.get("/metrics")).text
        assert metric_value(text, "pdgate_routing_decisions_total", pool="decode") == 1
        # The repeat is a prefix hit; it must run where that prefix actually is.
        await ask(c, LONG, seed=2)
        hit: list[FakeBackend] = [f for f in fakes.role("decode") if "generate" in f.calls]
        assert hit == decoded
