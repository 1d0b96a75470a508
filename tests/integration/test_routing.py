"""Routing end to end: policies chosen in config, SLO-aware refusals, prefix affinity and the
routing metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from backends.emulator.catalog import Catalog
from backends.emulator.emulated import EmulatedBackend
from gateway.settings import ConfigError
from tests.helpers import MODEL, app_client, config, gateway_of, pool, settings
from tests.integration.conftest import (
    CHAT,
    FakeFactory,
    assert_error,
    assert_idle,
    chat_body,
    emulated,
    eventually,
    metric_labels,
    metric_value,
    sse_chunks,
)

TTFT_TARGET = "X-PDGate-TTFT-Target"


async def scrape(c: httpx.AsyncClient) -> str:
    resp = await c.get("/metrics")
    assert resp.status_code == 200
    return resp.text


def prompt_tokens_charged(app: Any, role: str) -> int:
    return sum(b.engine.stats.prompt_tokens for r, b in emulated(app) if r == role)


def fast(device: str, replicas: int, policy: str = "round_robin") -> dict[str, Any]:
    return pool(device, replicas, policy=policy, time_scale=100)


# -- SLO-aware routing ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_unattainable_ttft_target_is_refused_before_any_prefill(
    catalog: Catalog, stream: bool
) -> None:
    cfg = config(prefill=fast("h100-sxm", 2, "slo_aware"), decode=fast("groq-lpu-v1", 1))
    async with app_client(settings(cfg, catalog)) as (app, c):
        resp = await c.post(
            CHAT,
            json=chat_body("x" * 2000, max_tokens=4, stream=stream),
            headers={TTFT_TARGET: "0.000001"},
        )
        err = assert_error(resp, 429, type_="rate_limit_error", code="overloaded")
        assert "TTFT target" in err["message"]
        assert resp.headers["retry-after"] == "1"
        assert prompt_tokens_charged(app, "prefill") == 0
        assert prompt_tokens_charged(app, "decode") == 0
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_rejections_total", reason="slo_unattainable") == 1
        assert metric_value(metrics, "pdgate_requests_total", outcome="overloaded") == 1
        assert_idle(app)


async def test_generous_ttft_target_is_served_and_counted_as_goodput(catalog: Catalog) -> None:
    cfg = config(
        prefill=fast("h100-sxm", 2, "slo_aware"),
        decode=fast("groq-lpu-v1", 1),
        slo={"ttft_s": 30, "tpot_s": 5},
    )
    async with app_client(settings(cfg, catalog)) as (app, c):
        resp = await c.post(
            CHAT, json=chat_body("y" * 2000, max_tokens=4), headers={TTFT_TARGET: "30"}
        )
        assert resp.status_code == 200, resp.text
        usage = resp.json()["usage"]
        assert usage["completion_tokens"] == 4
        assert prompt_tokens_charged(app, "prefill") == usage["prompt_tokens"]
        # Without the header the config's target applies.
        resp = await c.post(CHAT, json=chat_body("z" * 2000, max_tokens=4))
        assert resp.status_code == 200, resp.text
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_slo_requests_total", met="both") == 2
        assert metric_value(metrics, "pdgate_rejections_total") == 0
        assert {lab["policy"] for lab in labels(metrics, "prefill")} == {"slo_aware"}
        assert_idle(app)


async def test_slo_aware_prefers_the_idle_prefill_worker(catalog: Catalog) -> None:
    """The busier instance predicts a later TTFT, so the next prompt goes to the other one."""
    cfg = config(
        prefill=pool("h100-sxm", 2, policy="slo_aware", time_scale=10),
        decode=fast("groq-lpu-v1", 1),
        slo={"ttft_s": 60},
    )
    async with app_client(settings(cfg, catalog)) as (app, c):
        workers = gateway_of(app).registry.pool(MODEL, "prefill").workers
        big = asyncio.create_task(c.post(CHAT, json=chat_body("b" * 100_000, max_tokens=2)))
        await eventually(lambda: any(w.in_flight for w in workers))
        busy = next(w for w in workers if w.in_flight)
        idle = next(w for w in workers if w is not busy)
        busy_s, idle_s = busy.estimate_prefill_s(500), idle.estimate_prefill_s(500)
        assert busy_s is not None
        assert idle_s is not None
        assert busy_s > idle_s
        small = await c.post(CHAT, json=chat_body("s" * 2000, max_tokens=2))
        assert small.status_code == 200, small.text
        assert (await big).status_code == 200
        assert isinstance(idle.backend, EmulatedBackend)
        assert idle.backend.engine.stats.prompt_tokens == small.json()["usage"]["prompt_tokens"]
        assert_idle(app)


async def test_slo_metric_counts_a_missed_tpot(catalog: Catalog) -> None:
    fakes = FakeFactory(token_delay_s=0.01)
    cfg = config(slo={"ttft_s": 30, "tpot_s": 0.000001})
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (_, c):
        assert (await c.post(CHAT, json=chat_body(max_tokens=4))).status_code == 200
        metrics = await scrape(c)
        assert metric_value(metrics, "pdgate_slo_requests_total", met="ttft") == 1
        assert metric_value(metrics, "pdgate_slo_requests_total", met="both") == 0


@pytest.mark.parametrize("value", ["0", "-1", "soon", "86401"])
async def test_invalid_ttft_target_header_is_400(catalog: Catalog, value: str) -> None:
    fakes = FakeFactory()
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (app, c):
        resp = await c.post(CHAT, json=chat_body(max_tokens=2), headers={TTFT_TARGET: value})
        assert_error(resp, 400, type_="invalid_request_error", param="x-pdgate-ttft-target")
        assert fakes.calls("prefill") == [0, 0]
        assert_idle(app)


# -- prefix-aware routing ---------------------------------------------------------------------


def conversation(topic: str, turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": f"You are an expert on {topic}. " * 40}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i} about {topic}? " * 10})
        messages.append({"role": "assistant", "content": f"Answer {i} about {topic}. " * 10})
    messages.append({"role": "user", "content": "And one more thing."})
    return messages


async def test_prefix_aware_keeps_conversations_on_their_worker(catalog: Catalog) -> None:
    fakes = FakeFactory()
    cfg = config(prefill=pool("h100-sxm", 2, policy="prefix_aware"))
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        first, second = fakes.role("prefill")
        first.prefill_delay_s = 0.2

        def body(topic: str, turns: int) -> dict[str, Any]:
            return {"model": MODEL, "messages": conversation(topic, turns), "max_tokens": 2}

        # Conversation A lands on prefill-0 (all idle: the first candidate); while it is in
        # flight, conversation B goes to the least loaded worker, prefill-1.
        a = asyncio.create_task(c.post(CHAT, json=body("kv caches", 0)))
        await eventually(lambda: first.running >= 1)
        b = await c.post(CHAT, json=body("schedulers", 0))
        assert b.status_code == 200
        assert (await a).status_code == 200
        assert (len(first.calls), len(second.calls)) == (1, 1)
        first.prefill_delay_s = 0.0

        # Idle again, so without prefixes both would go to prefill-0. Later turns of each
        # conversation follow their first turn instead.
        for turns in (1, 2):
            assert (await c.post(CHAT, json=body("schedulers", turns))).status_code == 200
            assert (len(first.calls), len(second.calls)) == (1, 1 + turns)
        assert (await c.post(CHAT, json=body("kv caches", 1))).status_code == 200
        assert (len(first.calls), len(second.calls)) == (2, 3)
        metrics = await scrape(c)
        assert (
            metric_value(
                metrics, "pdgate_routing_decisions_total", pool="prefill", worker="prefill-1"
            )
            == 3
        )
        assert_idle(app)


# -- routing metrics and options --------------------------------------------------------------


def labels(metrics: str, pool_name: str) -> list[dict[str, str]]:
    return [
        lab
        for lab in metric_labels(metrics, "pdgate_routing_decisions_total")
        if lab["pool"] == pool_name
    ]


async def test_routing_decisions_are_labelled_by_policy_and_worker(catalog: Catalog) -> None:
    fakes = FakeFactory()
    cfg = config(
        prefill=pool("h100-sxm", 2, policy="least_loaded"),
        decode=pool("groq-lpu-v1", 2, policy="round_robin"),
    )
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        for stream in (False, True, False, True):
            resp = await c.post(CHAT, json=chat_body(max_tokens=3, stream=stream))
            if stream:
                sse_chunks(resp)
            else:
                assert resp.status_code == 200
        metrics = await scrape(c)
        prefill, decode = labels(metrics, "prefill"), labels(metrics, "decode")
        assert {lab["policy"] for lab in prefill} == {"least_loaded"}
        assert {lab["policy"] for lab in decode} == {"round_robin"}
        assert {lab["worker"] for lab in decode} == {"decode-0", "decode-1"}
        assert {lab["worker"] for lab in prefill} <= {"prefill-0", "prefill-1"}
        assert {lab["model"] for lab in prefill + decode} == {MODEL}
        for role in ("prefill", "decode"):
            assert metric_value(metrics, "pdgate_routing_decisions_total", pool=role) == 4
        for i in (0, 1):
            assert (
                metric_value(
                    metrics, "pdgate_routing_decisions_total", pool="decode", worker=f"decode-{i}"
                )
                == 2
            )
        assert fakes.calls("decode") == [2, 2]
        assert_idle(app)


async def test_aggregated_routing_is_labelled_too(catalog: Catalog) -> None:
    fakes = FakeFactory()
    cfg = config(mode="aggregated", aggregated=pool("h100-sxm", 3, policy="power_of_two"))
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        for _ in range(6):
            assert (await c.post(CHAT, json=chat_body(max_tokens=2))).status_code == 200
        metrics = await scrape(c)
        agg = labels(metrics, "aggregated")
        assert {lab["policy"] for lab in agg} == {"power_of_two"}
        assert metric_value(metrics, "pdgate_routing_decisions_total", pool="aggregated") == 6
        assert sum(fakes.calls("aggregated")) == 6
        assert_idle(app)


@pytest.mark.parametrize(("by", "third_goes_to_light"), [("tokens", True), ("requests", False)])
async def test_least_loaded_dimension_from_policy_options(
    catalog: Catalog, by: str, third_goes_to_light: bool
) -> None:
    """``policy_options`` reach the policy: by tokens, one long request outweighs two short."""
    fakes = FakeFactory(token_delay_s=0.02)
    decode = {**pool("groq-lpu-v1", 2, policy="least_loaded"), "policy_options": {"by": by}}
    async with app_client(settings(config(decode=decode), catalog), backend_factory=fakes) as (
        app,
        c,
    ):
        d0, d1 = fakes.role("decode")
        long_one = asyncio.create_task(c.post(CHAT, json=chat_body("L" * 8000, max_tokens=30)))
        await eventually(lambda: d0.running + d1.running >= 1)
        heavy, light = (d0, d1) if d0.running else (d1, d0)
        shorts = []
        for _ in range(2):  # (1 request, ~2000 tokens) vs (0 or 1 request, ~30 tokens): light
            shorts.append(asyncio.create_task(c.post(CHAT, json=chat_body("s", max_tokens=30))))
            await eventually(lambda: light.running >= len(shorts))
        # Now (1 request, ~2000 tokens) vs (2 requests, ~60 tokens).
        third = await c.post(CHAT, json=chat_body("t", max_tokens=2))
        assert third.status_code == 200
        assert heavy.running == 1
        assert all(r.status_code == 200 for r in await asyncio.gather(long_one, *shorts))
        if third_goes_to_light:
            assert (len(heavy.calls), len(light.calls)) == (1, 3)
        else:
            assert (len(heavy.calls), len(light.calls)) == (2, 2)
        assert_idle(app)


def test_bad_policy_options_are_a_config_error(catalog: Catalog) -> None:
    decode = {**pool("groq-lpu-v1", 2, policy="least_loaded"), "policy_options": {"by": "vibes"}}
    with pytest.raises(ConfigError, match=r"pools\.decode"):
        settings(config(decode=decode), catalog)
