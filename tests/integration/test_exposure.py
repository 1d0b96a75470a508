"""What the gateway exposes and to whom: metrics, docs and schema with API keys on, the admin
API's bounds, per-key token limits and what images are charged."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from backends.emulator.catalog import Catalog
from tests.helpers import app_client, config, settings
from tests.integration.conftest import CHAT, assert_error, chat_body, completion_body

KEY = "sk-test-0123456789"


def _with_keys(**extra: Any) -> dict[str, Any]:
    data = config()
    data["auth"] = {"api_keys": [{"name": "team", "key": KEY, "tokens_per_minute": 1000, **extra}]}
    return data


BEARER = {"Authorization": f"Bearer {KEY}"}


async def test_with_api_keys_on_metrics_and_docs_are_closed_by_default(catalog: Catalog) -> None:
    """Before: /metrics, /docs and /openapi.json stayed open with keys on, and the schema
    listed the admin routes."""
    async with app_client(settings(_with_keys(), catalog)) as (_, c):
        assert_error(await c.get("/metrics"), 401, code="invalid_api_key")
        assert (await c.get("/metrics", headers=BEARER)).status_code == 200
        assert (await c.get("/docs")).status_code == 404
        assert (await c.get("/openapi.json")).status_code == 404


async def test_exposure_is_a_setting(catalog: Catalog) -> None:
    data = _with_keys()
    data["server"] = {"public_metrics": True, "public_docs": True}
    async with app_client(settings(data, catalog)) as (_, c):
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/docs")).status_code == 200
        paths = (await c.get("/openapi.json")).json()["paths"]
        assert "/v1/chat/completions" in paths
        assert not [p for p in paths if p.startswith("/admin")]


async def test_without_keys_everything_stays_open_but_admin_is_not_in_the_schema(
    catalog: Catalog,
) -> None:
    async with app_client(settings(config(), catalog)) as (_, c):
        assert (await c.get("/metrics")).status_code == 200
        paths = (await c.get("/openapi.json")).json()["paths"]
        assert not [p for p in paths if p.startswith("/admin")]


async def test_a_request_larger_than_the_token_limit_is_refused_outright(
    catalog: Catalog,
) -> None:
    """Before: a 50,000-token request was admitted against a 1,000 tokens-per-minute key."""
    async with app_client(settings(_with_keys(), catalog)) as (_, c):
        big = completion_body(prompt="word " * 5000, max_tokens=4)
        resp = await c.post("/v1/completions", json=big, headers=BEARER)
        err = assert_error(resp, 400, code="request_too_large_for_limit", param="max_tokens")
        assert "1000" in err["message"]
        asks_too_much = completion_body(prompt="hi", max_tokens=5000)
        resp = await c.post("/v1/completions", json=asks_too_much, headers=BEARER)
        assert_error(resp, 400, code="request_too_large_for_limit")
        small = completion_body(prompt="hi", max_tokens=4)
        assert (await c.post("/v1/completions", json=small, headers=BEARER)).status_code == 200


async def test_an_inline_image_is_charged_against_the_limit(catalog: Catalog) -> None:
    """Before: a 1 MB data URL was charged 8 tokens and passed a 1,000-token limit."""
    url = "data:image/png;base64," + base64.b64encode(bytes(1_000_000)).decode()
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    body = chat_body(max_tokens=4)
    body["messages"] = [{"role": "user", "content": content}]
    data = _with_keys()
    data["server"] = {"max_body_bytes": 4 * 1024 * 1024}
    async with app_client(settings(data, catalog)) as (_, c):
        resp = await c.post(CHAT, json=body, headers=BEARER)
        assert_error(resp, 400, code="request_too_large_for_limit")


@pytest.mark.parametrize("replicas", [65, 1_000_000])
async def test_admin_cannot_add_an_unbounded_number_of_workers(
    catalog: Catalog, replicas: int
) -> None:
    """Before: ``"replicas": 1000000`` wedged the gateway building workers."""
    data = config()
    data["admin"] = {"api_key": "admin-key-123"}
    async with app_client(settings(data, catalog)) as (_, c):
        spec = {"device": "groq-lpu-v1", "replicas": replicas}
        body = {"model": "llama-3.1-8b", "role": "decode", "worker": spec}
        resp = await c.post(
            "/admin/workers", json=body, headers={"Authorization": "Bearer admin-key-123"}
        )
        assert_error(resp, 400, param="worker.replicas")
        listed = await c.get("/admin/workers", headers={"X-Admin-Key": "admin-key-123"})
        assert len(listed.json()["workers"]) == 4  # nothing was added
