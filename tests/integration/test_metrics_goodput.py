"""KV transfer bytes, cached prompt tokens and goodput per pool, through the app in-process."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any

from backends.base import GenerationParams, LegStats, ReportedUsage, TokenChunk
from backends.emulator.catalog import Catalog
from gateway.dispatch import _pool_met
from tests.fakes import FakeBackend
from tests.helpers import MODEL, app_client, config, settings
from tests.integration.conftest import CHAT, FakeFactory, chat_body, metric_labels, metric_value

LOOSE = {"ttft_s": 60.0, "tpot_s": 60.0}


async def test_kv_transfer_bytes_follow_the_prompt(catalog: Catalog) -> None:
    async with app_client(settings(config(slo=LOOSE), catalog)) as (_, c):
        resp = await c.post(CHAT, json=chat_body("x" * 2000, max_tokens=4))
        prompt = resp.json()["usage"]["prompt_tokens"]
        text = (await c.get("/metrics")).text
    per_token = catalog.model(MODEL).kv_bytes_per_token("bf16")
    lab = {"model": MODEL, "mode": "disaggregated"}
    assert metric_value(text, "pdgate_kv_transfer_bytes_count", **lab) == 1
    assert metric_value(text, "pdgate_kv_transfer_bytes_sum", **lab) == prompt * per_token


async def test_cached_tokens_are_counted_where_prompts_are_computed(catalog: Catalog) -> None:
    async with app_client(settings(config(slo=LOOSE), catalog)) as (_, c):
        await c.post(CHAT, json=chat_body(max_tokens=3))
        text = (await c.get("/metrics")).text
    pools = {d["pool"] for d in metric_labels(text, "pdgate_cached_prompt_tokens_total")}
    assert pools == {"prefill"}, "a remote decode leg computes no prompt, so it has no series"
    assert metric_value(text, "pdgate_cached_prompt_tokens_total") == 0


async def test_each_pool_is_judged_on_the_target_it_owns(catalog: Catalog) -> None:
    """A missed TTFT target fails the prefill pool's goodput, not the decode pool's."""
    async with app_client(settings(config(slo=LOOSE), catalog)) as (_, c):
        await c.post(CHAT, json=chat_body(max_tokens=4))
        await c.post(
            CHAT, json=chat_body(max_tokens=4), headers={"x-pdgate-ttft-target": "0.000001"}
        )
        text = (await c.get("/metrics")).text
    name = "pdgate_pool_slo_requests_total"
    assert metric_value(text, name, pool="prefill", met="true") == 1
    assert metric_value(text, name, pool="prefill", met="false") == 1
    assert metric_value(text, name, pool="decode", met="true") == 2
    assert metric_value(text, name, pool="decode", met="false") == 0
    assert metric_value(text, "pdgate_slo_requests_total", met="both") == 1
    assert metric_value(text, "pdgate_slo_requests_total", met="tpot") == 1


async def test_an_aggregated_pool_owns_both_targets(catalog: Catalog) -> None:
    data = config(mode="aggregated", slo={"ttft_s": 60.0, "tpot_s": 0.000001})
    async with app_client(settings(data, catalog)) as (_, c):
        await c.post(CHAT, json=chat_body(max_tokens=4))
        text = (await c.get("/metrics")).text
    name = "pdgate_pool_slo_requests_total"
    assert metric_value(text, name, pool="aggregated", met="false") == 1
    assert {d["pool"] for d in metric_labels(text, name)} == {"aggregated"}


def test_pool_targets() -> None:
    remote = ["prefill", "decode"]
    assert _pool_met("prefill", remote, ttft_ok=True, tpot_ok=False)
    assert _pool_met("decode", remote, ttft_ok=False, tpot_ok=True)
    assert not _pool_met("decode", ["decode"], ttft_ok=False, tpot_ok=True)  # local prefill
    assert not _pool_met("aggregated", ["aggregated"], ttft_ok=True, tpot_ok=False)


async def test_no_label_carries_a_request_id_or_prompt(catalog: Catalog) -> None:
    """Label values stay bounded: request ids and prompt text never become labels."""
    ids = [f"rid-{i}-unbounded" for i in range(3)]
    async with app_client(settings(config(slo=LOOSE), catalog)) as (_, c):
        for rid in ids:
            await c.post(
                CHAT,
                json=chat_body("secret prompt text", max_tokens=2),
                headers={"x-request-id": rid},
            )
        text = (await c.get("/metrics")).text
    assert "unbounded" not in text
    assert "secret prompt" not in text


class CachingUpstream(FakeBackend):
    """Reports, like vLLM, prompt tokens its prefix cache served in the last chunk's usage."""

    async def generate(self, params: GenerationParams) -> AsyncGenerator[TokenChunk, None]:
        async for chunk in super().generate(params):
            if chunk.finish_reason is not None:
                usage = ReportedUsage(params.prompt_tokens, cached_tokens=48)
                chunk = replace(chunk, usage=usage, stats=LegStats())
            yield chunk


class CachingFactory(FakeFactory):
    def __call__(self, name: str, spec: Any, model: Any, link: Any) -> FakeBackend:
        fake = CachingUpstream(name)
        self.fakes[name] = fake
        return fake


async def test_cached_tokens_reported_by_an_upstream_are_counted(catalog: Catalog) -> None:
    data = config(mode="aggregated", slo=LOOSE)
    async with app_client(settings(data, catalog), backend_factory=CachingFactory()) as (_, c):
        for _ in range(2):
            await c.post(CHAT, json=chat_body(max_tokens=3))
        text = (await c.get("/metrics")).text
    name = "pdgate_cached_prompt_tokens_total"
    assert metric_value(text, name, model=MODEL, pool="aggregated") == 96
