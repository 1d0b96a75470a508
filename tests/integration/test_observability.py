"""Health, readiness and metrics, and that every exit path gives back what it held."""

from __future__ import annotations

import pytest

from backends.emulator.catalog import Catalog
from tests.helpers import MODEL, app_client, config, gateway_of, settings
from tests.integration.conftest import (
    CHAT,
    COMPLETIONS,
    Client,
    FakeFactory,
    assert_idle,
    chat_body,
    completion_body,
    metric_labels,
    metric_value,
    sse_chunks,
)

MODE = "disaggregated"


async def test_health_and_ready(client: Client) -> None:
    _, c = client
    health = await c.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = await c.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


async def test_metrics_after_a_request(client: Client) -> None:
    app, c = client
    resp = await c.post(CHAT, json=chat_body("x" * 200, max_tokens=10))
    usage = resp.json()["usage"]
    scrape = await c.get("/metrics")
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    text = scrape.text
    lab = {"model": MODEL, "mode": MODE}
    assert metric_value(text, "pdgate_time_to_first_token_seconds_count", **lab) == 1
    assert metric_value(text, "pdgate_e2e_request_latency_seconds_count", **lab) == 1
    assert metric_value(text, "pdgate_inter_token_latency_seconds_count", **lab) >= 1
    ttft = metric_value(text, "pdgate_time_to_first_token_seconds_sum", **lab)
    e2e = metric_value(text, "pdgate_e2e_request_latency_seconds_sum", **lab)
    assert 0 < ttft <= e2e
    for pool, phase in [
        ("prefill", "queue"),
        ("prefill", "prefill"),
        ("decode", "queue"),
        ("decode", "kv_transfer"),
        ("decode", "compute"),
    ]:
        count = metric_value(text, "pdgate_phase_seconds_count", pool=pool, phase=phase, **lab)
        assert count == 1, (pool, phase)
    transfer = metric_value(
        text, "pdgate_phase_seconds_sum", pool="decode", phase="kv_transfer", **lab
    )
    assert transfer > 0, "the KV handoff over the link takes modelled time"
    assert metric_value(text, "pdgate_prompt_tokens_total", model=MODEL) == usage["prompt_tokens"]
    assert metric_value(text, "pdgate_completion_tokens_total", model=MODEL) == 10
    assert metric_value(text, "pdgate_requests_total", outcome="ok", **lab) == 1
    assert {d["outcome"] for d in metric_labels(text, "pdgate_requests_total")} == {"ok"}

    gauges = metric_labels(text, "pdgate_worker_in_flight")
    assert {(g["model"], g["pool"]) for g in gauges} == {(MODEL, "prefill"), (MODEL, "decode")}
    assert all(g["worker"] for g in gauges)
    assert metric_value(text, "pdgate_worker_in_flight") == 0
    workers = {d["worker"] for d in metric_labels(text, "pdgate_worker_running_sequences")}
    assert workers == {w.name for w in gateway_of(app).registry.workers()}
    assert metric_value(text, "pdgate_worker_running_sequences") == 0
    assert metric_value(text, "pdgate_worker_kv_usage_ratio") == 0


async def test_metrics_count_streams_and_both_apis(client: Client) -> None:
    _, c = client
    await c.post(CHAT, json=chat_body(max_tokens=4, stream=True))
    await c.post(COMPLETIONS, json=completion_body(max_tokens=6))
    await c.post(COMPLETIONS, json=completion_body(max_tokens=1, stream=True))
    text = (await c.get("/metrics")).text
    assert metric_value(text, "pdgate_requests_total", outcome="ok") == 3
    assert metric_value(text, "pdgate_completion_tokens_total", model=MODEL) == 11
    assert metric_value(text, "pdgate_time_to_first_token_seconds_count") == 3
    # The one-token request never reached a decode worker.
    assert metric_value(text, "pdgate_phase_seconds_count", pool="decode", phase="queue") == 2


async def test_metrics_count_error_outcomes(catalog: Catalog) -> None:
    fakes = FakeFactory()
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (app, c):
        for f in fakes.role("decode"):
            f.healthy_flag = False
        assert (await c.post(CHAT, json=chat_body(max_tokens=3))).status_code == 503
        for f in fakes.role("decode"):
            f.healthy_flag = True
            f.fail_after_tokens = 2
        assert (await c.post(CHAT, json=chat_body(max_tokens=3))).status_code == 502
        # Rejected before dispatch: not a dispatched request.
        assert (await c.post(CHAT, json=chat_body(n=2))).status_code == 400

        text = (await c.get("/metrics")).text
        outcomes = {
            d["outcome"]: metric_value(text, "pdgate_requests_total", outcome=d["outcome"])
            for d in metric_labels(text, "pdgate_requests_total")
        }
        # Outcomes are the gateway error codes clients see in the error envelope.
        assert outcomes == {"no_healthy_worker": 1, "upstream_failed": 1}
        assert metric_value(text, "pdgate_worker_in_flight") == 0
        # Tokens delivered before each failure are counted: none for the first request (it fails
        # before its prefill), 1 from prefill + 1 from decode for the second.
        assert metric_value(text, "pdgate_completion_tokens_total") == 0 + 2
        assert_idle(app)


async def test_metrics_count_deadline_outcome(catalog: Catalog) -> None:
    fakes = FakeFactory(prefill_delay_s=1.0)
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (_, c):
        resp = await c.post(
            CHAT, json=chat_body(max_tokens=3), headers={"X-PDGate-Timeout": "0.05"}
        )
        assert resp.status_code == 504
        text = (await c.get("/metrics")).text
        assert metric_value(text, "pdgate_requests_total", outcome="cancelled") == 0
        assert metric_value(text, "pdgate_requests_total", outcome="deadline_exceeded") == 1


async def test_deadline_is_counted_as_not_ok(catalog: Catalog) -> None:
    fakes = FakeFactory(prefill_delay_s=1.0)
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (app, c):
        resp = await c.post(
            CHAT, json=chat_body(max_tokens=3), headers={"X-PDGate-Timeout": "0.05"}
        )
        assert resp.status_code == 504
        text = (await c.get("/metrics")).text
        assert metric_value(text, "pdgate_requests_total") == 1
        assert metric_value(text, "pdgate_requests_total", outcome="ok") == 0
        assert metric_value(text, "pdgate_prompt_tokens_total") == 0
        assert metric_value(text, "pdgate_worker_in_flight") == 0
        assert_idle(app)


# -- resources come back on every path --------------------------------------------------------


async def test_emulated_engines_idle_after_mixed_traffic(client: Client) -> None:
    app, c = client
    assert (await c.post(CHAT, json=chat_body(max_tokens=20))).status_code == 200
    sse_chunks(await c.post(CHAT, json=chat_body(max_tokens=20, stream=True)))
    assert (await c.post(COMPLETIONS, json=completion_body(max_tokens=1))).status_code == 200
    stop = await c.post(COMPLETIONS, json=completion_body(max_tokens=40, seed=3, stop=" the"))
    assert stop.status_code == 200
    assert (await c.post(CHAT, json=chat_body(n=5))).status_code == 400
    assert (await c.post(CHAT, json={**chat_body(), "model": "nope"})).status_code == 404
    assert_idle(app)
    text = (await c.get("/metrics")).text
    assert metric_value(text, "pdgate_worker_in_flight") == 0
    assert metric_value(text, "pdgate_worker_kv_usage_ratio") == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_emulated_engines_idle_after_deadline_mid_decode(
    client: Client, stream: bool
) -> None:
    app, c = client
    resp = await c.post(
        COMPLETIONS,
        json=completion_body("z" * 2000, max_tokens=5000, stream=stream),
        headers={"X-PDGate-Timeout": "0.3"},
    )
    if stream:
        assert resp.status_code == 200
        assert '"deadline_exceeded"' in resp.text
        assert "[DONE]" not in resp.text
    else:
        assert resp.status_code == 504
    # The decode leg was running when the deadline hit; both legs' KV came back.
    decode_generated = [
        w.backend.engine.stats.generation_tokens
        for w in gateway_of(app).registry.workers()
        if w.role == "decode"
    ]
    assert 0 < sum(decode_generated) < 5000
    assert_idle(app)
    text = (await c.get("/metrics")).text
    assert metric_value(text, "pdgate_worker_in_flight") == 0


async def test_fake_kv_released_after_failures(catalog: Catalog) -> None:
    fakes = FakeFactory(fail_after_tokens=4, token_delay_s=0.001)
    async with app_client(settings(config(), catalog), backend_factory=fakes) as (app, c):
        for stream in (False, True):
            await c.post(CHAT, json=chat_body(max_tokens=10, stream=stream))
        for f in fakes.fakes.values():
            f.fail_after_tokens = None
        fakes.role("prefill")[0].prefill_delay_s = 1.0
        fakes.role("prefill")[1].prefill_delay_s = 1.0
        resp = await c.post(
            CHAT, json=chat_body(max_tokens=10), headers={"X-PDGate-Timeout": "0.05"}
        )
        assert resp.status_code == 504
        assert all(f.held_kv == 0 for f in fakes.fakes.values())
        assert sum(fakes.calls("prefill")) == 3
        assert sum(fakes.calls("decode")) == 2
        assert_idle(app)
        text = (await c.get("/metrics")).text
        assert metric_value(text, "pdgate_worker_in_flight") == 0
        assert len(metric_labels(text, "pdgate_worker_in_flight")) == 4
