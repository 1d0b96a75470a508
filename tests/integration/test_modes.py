"""Serving modes, several models in one gateway, and how policies spread requests."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from backends.emulator.catalog import Catalog
from tests.helpers import MODEL, app_client, config, gateway_of, pool, settings
from tests.integration.conftest import (
    CHAT,
    COMPLETIONS,
    FakeFactory,
    assert_idle,
    chat_body,
    completion_body,
    emulated,
    sse_chunks,
    streamed_text,
)

BIG = "llama-3.1-70b"


def two_models() -> dict[str, Any]:
    small = config()["models"][0]
    big = {
        "name": BIG,
        "mode": "aggregated",
        "default_max_tokens": 3,
        "pools": {"aggregated": pool("h200-sxm", 1, dtype="fp8")},
    }
    return {"models": [small, big]}


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
async def test_aggregated_mode(catalog: Catalog, path: str) -> None:
    make = chat_body if path == CHAT else completion_body
    async with app_client(settings(config(mode="aggregated"), catalog)) as (app, c):
        whole = await c.post(path, json=make(max_tokens=12, seed=42))
        assert whole.status_code == 200, whole.text
        body = whole.json()
        assert body["usage"]["completion_tokens"] == 12
        assert body["choices"][0]["finish_reason"] == "length"
        stream = await c.post(
            path,
            json=make(max_tokens=12, seed=42, stream=True, stream_options={"include_usage": True}),
        )
        chunks = sse_chunks(stream)
        assert chunks[-1]["usage"] == body["usage"]
        choice = body["choices"][0]
        assert streamed_text(chunks[:-1]) == (
            choice["message"]["content"] if path == CHAT else choice["text"]
        )
        assert [role for role, _ in emulated(app)] == ["aggregated"]
        assert_idle(app)


async def test_aggregated_and_disaggregated_agree_on_text(catalog: Catalog) -> None:
    texts = []
    for mode in ("aggregated", "disaggregated"):
        async with app_client(settings(config(mode=mode), catalog)) as (_, c):
            resp = await c.post(COMPLETIONS, json=completion_body(max_tokens=10, seed=8))
            texts.append(resp.json()["choices"][0]["text"])
    assert texts[0] == texts[1]


async def test_two_models_listed_and_routed(catalog: Catalog) -> None:
    async with app_client(settings(two_models(), catalog)) as (app, c):
        listed = await c.get("/v1/models")
        assert listed.status_code == 200
        body = listed.json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == [MODEL, BIG]
        for m in body["data"]:
            assert m["object"] == "model"
            assert m["owned_by"] == "pdgate"
            assert isinstance(m["created"], int)

        gw = gateway_of(app)
        charged = {w.id: w.backend.engine.stats.prompt_tokens for w in gw.registry.workers()}
        assert set(charged) == {
            f"{MODEL}/prefill-0",
            f"{MODEL}/prefill-1",
            f"{MODEL}/decode-0",
            f"{MODEL}/decode-1",
            f"{BIG}/aggregated-0",
        }

        big = await c.post(CHAT, json={**chat_body("x" * 400), "model": BIG})
        assert big.status_code == 200, big.text
        assert big.json()["model"] == BIG
        assert big.json()["usage"]["completion_tokens"] == 3  # the 70B's default length
        after_big = {w.id: w.backend.engine.stats.prompt_tokens for w in gw.registry.workers()}
        assert after_big[f"{BIG}/aggregated-0"] == big.json()["usage"]["prompt_tokens"]
        assert all(after_big[k] == 0 for k in after_big if k.startswith(MODEL))

        small = await c.post(COMPLETIONS, json=completion_body("y" * 400, max_tokens=4))
        assert small.json()["model"] == MODEL
        after_small = {w.id: w.backend.engine.stats.prompt_tokens for w in gw.registry.workers()}
        assert after_small[f"{BIG}/aggregated-0"] == after_big[f"{BIG}/aggregated-0"]
        assert sum(after_small[f"{MODEL}/prefill-{i}"] for i in (0, 1)) == 100

        stream = await c.post(CHAT, json={**chat_body(max_tokens=2, stream=True), "model": BIG})
        assert {ch["model"] for ch in sse_chunks(stream)} == {BIG}
        assert_idle(app)


async def test_model_names_are_per_gateway(catalog: Catalog) -> None:
    async with app_client(settings(two_models(), catalog)) as (_, c):
        resp = await c.post(CHAT, json={**chat_body(), "model": "llama-3.1-405b"})
        assert resp.status_code == 404


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded"])
async def test_policies_spread_sequential_requests(catalog: Catalog, policy: str) -> None:
    cfg = config(
        prefill=pool("h100-sxm", 2, policy=policy), decode=pool("groq-lpu-v1", 2, policy=policy)
    )
    fakes = FakeFactory()
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        for _ in range(6):
            assert (await c.post(CHAT, json=chat_body(max_tokens=3))).status_code == 200
        assert fakes.calls("prefill") == [3, 3]
        assert fakes.calls("decode") == [3, 3]
        assert_idle(app)


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded"])
async def test_policies_spread_emulated_aggregated_pool(catalog: Catalog, policy: str) -> None:
    cfg = config(mode="aggregated", aggregated=pool("h100-sxm", 2, policy=policy))
    async with app_client(settings(cfg, catalog)) as (app, c):
        for _ in range(4):
            resp = await c.post(COMPLETIONS, json=completion_body(list(range(50)), max_tokens=2))
            assert resp.status_code == 200
        assert [b.engine.stats.prompt_tokens for _, b in emulated(app)] == [100, 100]


@pytest.mark.parametrize(
    ("policy", "expected"), [("least_loaded", [1, 3]), ("round_robin", [2, 2])]
)
async def test_least_loaded_avoids_busy_worker(
    catalog: Catalog, policy: str, expected: list[int]
) -> None:
    cfg = config(prefill=pool("h100-sxm", 2, policy=policy))
    fakes = FakeFactory()
    async with app_client(settings(cfg, catalog), backend_factory=fakes) as (app, c):
        slow = fakes.role("prefill")[0]
        slow.prefill_delay_s = 0.5
        first = asyncio.create_task(c.post(CHAT, json=chat_body(max_tokens=2)))
        for _ in range(500):  # until the first request sits on prefill-0
            if slow.running:
                break
            await asyncio.sleep(0.002)
        assert slow.running == 1
        slow.prefill_delay_s = 0.0
        for _ in range(3):
            assert (await c.post(CHAT, json=chat_body(max_tokens=2))).status_code == 200
        assert (await first).status_code == 200
        assert fakes.calls("prefill") == expected
        assert_idle(app)


async def test_concurrent_requests_all_complete(client: Any) -> None:
    app, c = client

    async def one(i: int) -> Any:
        body = (chat_body if i % 2 else completion_body)(
            max_tokens=8 + i, seed=i, stream=i % 3 == 0
        )
        return await c.post(CHAT if i % 2 else COMPLETIONS, json=body)

    responses = await asyncio.gather(*(one(i) for i in range(12)))
    assert [r.status_code for r in responses] == [200] * 12
    for i, r in enumerate(responses):
        if i % 3:
            assert r.json()["usage"]["completion_tokens"] == 8 + i
        else:
            assert len(streamed_text(sse_chunks(r)).split(" ")) == 8 + i
    prefill = [b.engine.stats.prompt_tokens for role, b in emulated(app) if role == "prefill"]
    assert all(n > 0 for n in prefill), "both prefill instances served"
    assert_idle(app)
