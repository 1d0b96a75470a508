"""The shipped Prometheus config and Grafana dashboard against a real Prometheus.

One gateway serves three models — emulated disaggregated pools behind tight admission limits,
a conditional-mode model, and `pdgate backend` processes over HTTP, one of them failing a
share of its requests — while Prometheus (Debian's, started here on loopback) scrapes the
gateway and the backends every second. After a short mixed load that produces successes,
rejections, retries and errors, every PromQL expression of the dashboard and of the recording
rules must return data through Prometheus's HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.backend_procs import Proc, run_backend, run_gateway, spawn
from tests.helpers import MODEL, free_port, pool

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "deploy/prometheus/prometheus.yml"
RULES = ROOT / "deploy/prometheus/rules/pdgate.rules.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/pdgate.json"
COND, HTTP = "llama-cond", "llama-http"
SERVED = ("--served-model-name", HTTP)  # the backends answer to the name clients send
# Grafana's variables as "All" would expand them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$model": ".*", "$pool": ".*"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: scripts/test installs Debian's 'prometheus' package")
    return path


# -- what Prometheus runs against --------------------------------------------------------------


def gateway_config(prefill: Proc, decode: Proc) -> dict[str, Any]:
    """Three models, each exercising a different part of the dashboard."""
    tight = pool("h100-sxm", 2) | {"max_in_flight": 1, "max_queue": 1}  # bursts get 429
    http_worker = {"type": "http", "protocol": "vllm-nixl"}
    return {
        "models": [
            {
                "name": MODEL,
                "mode": "disaggregated",
                "pools": {"prefill": tight, "decode": pool("groq-lpu-v1", 2)},
            },
            {
                "name": COND,
                "profile": MODEL,
                "mode": "conditional",
                "conditional": {"local_max_prompt_tokens": 200},
                "pools": {"prefill": pool("h100-sxm", 1), "decode": pool("groq-lpu-v1", 1)},
            },
            {
                "name": HTTP,
                "profile": MODEL,
                "mode": "disaggregated",
                "retries": {"prefill": 1, "decode": 0, "backoff_s": 0},
                "circuit": {"failure_threshold": 1000},
                "pools": {
                    # Two workers on one failing instance, so a retry has somewhere to go.
                    "prefill": {
                        "workers": [
                            http_worker | {"url": prefill.url, "id": "p0"},
                            http_worker | {"url": prefill.url, "id": "p1"},
                        ]
                    },
                    "decode": {"workers": [http_worker | {"url": decode.url}]},
                },
            },
        ]
    }


def prometheus_config(gateway: Proc, prefill: Proc, decode: Proc) -> dict[str, Any]:
    """The shipped prometheus.yml with this test's targets and a 1 s scrape interval."""
    cfg: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(PROMETHEUS_YML.parent / f) for f in cfg["rule_files"]]
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert set(jobs) == {"pdgate", "pdgate-backend"}
    jobs["pdgate"]["static_configs"] = [{"targets": [_hostport(gateway)]}]
    jobs["pdgate-backend"]["static_configs"] = [
        {"targets": [_hostport(prefill)], "labels": {"pool": "prefill"}},
        {"targets": [_hostport(decode)], "labels": {"pool": "decode"}},
    ]
    return cfg


def _hostport(proc: Proc) -> str:
    return proc.url.removeprefix("http://")


@contextlib.contextmanager
def run_prometheus(cfg: dict[str, Any]) -> Iterator[str]:
    """Prometheus on a free loopback port with a throwaway TSDB; yields its base URL."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg))
        _check(_tool("promtool"), "check", "config", str(path))
        port = free_port()
        argv = [
            _tool("prometheus"),
            f"--config.file={path}",
            f"--storage.tsdb.path={Path(tmp) / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        with spawn(argv, "/-/ready", port) as proc:
            yield proc.url


def _check(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# -- load --------------------------------------------------------------------------------------


async def drive(gateway: str, seconds: float) -> Counter[int]:
    """Streaming users on every model plus bursts that overflow the admission queue."""
    statuses: Counter[int] = Counter()
    stop = time.monotonic() + seconds

    async def one(c: httpx.AsyncClient, model: str, words: int) -> None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "tell me more " * words}],
            "max_tokens": 12,
            "stream": True,
        }
        async with c.stream("POST", "/v1/chat/completions", json=body) as resp:
            async for _ in resp.aiter_bytes():
                pass
            statuses[resp.status_code] += 1

    async def user(c: httpx.AsyncClient, i: int) -> None:
        models = (MODEL, COND, HTTP)
        n = 0
        while time.monotonic() < stop:
            await one(c, models[(i + n) % 3], 40 if n % 2 else 400)
            n += 1

    async def bursts(c: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            await asyncio.gather(*(one(c, MODEL, 2000) for _ in range(8)))
            await asyncio.sleep(0.5)

    async with httpx.AsyncClient(base_url=gateway, timeout=30) as c:
        await asyncio.gather(bursts(c), *(user(c, i) for i in range(6)))
    return statuses


# -- queries -----------------------------------------------------------------------------------


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            exprs.append(expr)
    return exprs


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    return [r["expr"] for r in rules] + [r["record"] for r in rules]


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def wait_for_data(prom: str, exprs: list[str], timeout: float = 30.0) -> list[str]:
    """Poll until every expression returns a finite sample; returns the ones that never did."""
    missing = list(dict.fromkeys(exprs))
    deadline = time.monotonic() + timeout
    while missing and time.monotonic() < deadline:
        missing = [e for e in missing if not _has_data(_query(prom, e))]
        if missing:
            time.sleep(1.0)
    return missing


# -- the test ----------------------------------------------------------------------------------


def test_shipped_files_pass_promtool() -> None:
    _check(_tool("promtool"), "check", "rules", str(RULES))
    _check(_tool("promtool"), "check", "config", str(PROMETHEUS_YML))


def test_dashboard_is_a_provisionable_grafana_dashboard() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert {"uid", "title", "schemaVersion", "panels", "templating"} <= set(dash)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "pool"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["targets"], p["title"]
        assert p["description"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert '$model"' in exprs
    assert '$pool"' in exprs
    generator = ROOT / "deploy/grafana/dashboard.py"
    _check(sys.executable, str(generator), "--check")  # the JSON is what the generator writes


def test_every_dashboard_and_rule_query_returns_data() -> None:
    with (
        run_backend(*SERVED, "--fail-rate", "0.4", "--seed", "3", role="prefill") as prefill,
        run_backend(*SERVED, device="groq-lpu-v1", role="decode") as decode,
        run_gateway(gateway_config(prefill, decode)) as gateway,
        run_prometheus(prometheus_config(gateway, prefill, decode)) as prom,
    ):
        statuses = asyncio.run(drive(gateway.url, seconds=8.0))
        assert statuses[200] > 20, statuses
        assert statuses[429] > 0, statuses  # admission rejections
        assert sum(n for s, n in statuses.items() if s >= 500) > 0, statuses  # upstream errors

        targets = httpx.get(prom + "/api/v1/targets", timeout=10).json()["data"]
        health = {t["scrapeUrl"]: t["health"] for t in targets["activeTargets"]}
        assert len(health) == 3
        assert set(health.values()) == {"up"}, health

        dashboard = json.loads(DASHBOARD.read_text())
        missing = wait_for_data(prom, dashboard_queries(dashboard) + rule_queries())
        assert missing == [], "queries without data:\n" + "\n".join(missing)

        for var in dashboard["templating"]["list"][1:]:
            metric, label = var["definition"].removeprefix("label_values(")[:-1].split(", ")
            values = httpx.get(
                f"{prom}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10
            ).json()["data"]
            assert values, var["name"]
