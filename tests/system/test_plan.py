"""`pdgate plan` as a process: its outputs, and the config it writes run unchanged by
`pdgate simulate --config` and by a real `pdgate serve --config` behind the openai client."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import yaml

from tests.helpers import run_server

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
MODEL = "llama-3.1-8b"


def pdgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], Path]:
    tmp = tmp_path_factory.mktemp("plan")
    out = pdgate(
        "plan", "--model", MODEL, "--isl", "1500", "--osl", "100", "--rate", "20",
        "--slo", "ttft:p90=0.5", "--slo", "tpot:p90=0.02", "--devices", "h100-sxm,h200-sxm",
        "--requests", "150", "--top", "4", "--jobs", "2", "--json", "--no-progress",
        "--csv", str(tmp / "plan.csv"), "--plot", str(tmp / "plan.png"),
        "--write-config", str(tmp / "plan.yaml"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), tmp


@pytest.mark.timeout(300)
def test_plan_outputs(planned: tuple[dict[str, object], Path]) -> None:
    result, tmp = planned
    plans = result["plans"]
    assert isinstance(plans, list)
    assert plans
    chosen = [p for p in plans if p["chosen"]]
    assert len(chosen) == 1
    assert chosen[0]["meets"]
    assert chosen[0]["ttft:p90"] <= 0.5
    assert chosen[0]["tpot:p90"] <= 0.02
    assert chosen[0]["headroom"] >= 1.0
    assert result["candidates_screened"] >= len(plans)
    assert result["replay"]["meets"]
    with open(tmp / "plan.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(plans)
    assert "usd_per_hour" in rows[0]
    assert (tmp / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(300)
def test_written_config_simulates_unchanged(planned: tuple[dict[str, object], Path]) -> None:
    result, tmp = planned
    config = yaml.safe_load((tmp / "plan.yaml").read_text())
    chosen = next(p for p in result["plans"] if p["chosen"])  # type: ignore[attr-defined]
    assert config["models"][0]["mode"] == chosen["mode"]
    out = pdgate(
        "simulate", "--config", str(tmp / "plan.yaml"), "--isl", "1500", "--osl", "100",
        "--rate", "20", "--requests", "150", "--json", "--no-progress",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    assert m["failed"] == 0
    assert m["requests"] == 150
    assert m["slo"] == {"ttft_s": 0.5, "tpot_s": 0.02}  # the plan's SLOs travel in the config
    assert m["ttft_s"]["p90"] <= 0.5


@pytest.mark.timeout(120)
def test_written_config_serves_unchanged(planned: tuple[dict[str, object], Path]) -> None:
    _, tmp = planned
    config = yaml.safe_load((tmp / "plan.yaml").read_text())
    with run_server(config) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8
        )
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 8


def test_infeasible_plan_exits_1_with_the_reason() -> None:
    out = pdgate(
        "plan", "--model", MODEL, "--isl", "1000", "--osl", "100", "--rate", "5",
        "--slo", "ttft:p90=0.0001", "--devices", "h100-sxm", "--requests", "50",
        "--jobs", "1", "--no-progress",
    )  # fmt: skip
    assert out.returncode == 1
    assert "binding: TTFT" in out.stderr
    assert "best reachable" in out.stderr


def test_bad_input_exits_2() -> None:
    out = pdgate("plan", "--model", MODEL, "--isl", "10", "--osl", "10", "--rate", "1",
                 "--slo", "ttft:90=1")  # fmt: skip
    assert out.returncode == 2
    assert "--slo" in out.stderr
