"""`pdgate simulate` and `pdgate calibrate` as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from backends.emulator.catalog import Catalog
from backends.emulator.timing import StepShape

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
KEYS = {
    "ttft_s",
    "itl_s",
    "tpot_s",
    "e2e_s",
    "output_tokens_per_s",
    "requests_per_s",
    "goodput_requests_per_s",
    "requests",
    "kv_usage_peak",
    "preemptions",
    "usd_per_million_output_tokens",
    "joules_per_output_token",
}


def pdgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )


def test_simulate_json_reports_every_metric_and_matches_the_physics(catalog: Catalog) -> None:
    out = pdgate(
        "simulate", "--device", "h100-sxm", "--model", "llama-3.1-8b", "--isl", "1000",
        "--osl", "50", "--concurrency", "1", "--requests", "4", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    assert set(m) >= KEYS
    for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
        assert set(m[key]) == {"mean", "p50", "p90", "p99"}
    assert m["requests"] == 4
    dep = catalog.deployment("h100-sxm", "llama-3.1-8b")
    assert m["ttft_s"]["p50"] == pytest.approx(dep.step_time(StepShape.of([(1000, 0)])))
    assert m["itl_s"]["p50"] == pytest.approx(dep.step_time(StepShape.of([(1, 1024)])), rel=0.01)
    assert m["output_tokens_per_s"] == pytest.approx(50 / m["e2e_s"]["mean"], rel=0.01)
    assert m["usd_per_million_output_tokens"] > 0
    assert m["joules_per_output_token"] > 0


def test_simulate_a_disaggregated_config_under_poisson_load(tmp_path: Path) -> None:
    config = {
        "models": [
            {
                "name": "llama-3.1-70b",
                "mode": "disaggregated",
                "pools": {
                    "prefill": {
                        "policy": "least_loaded",
                        "kv_link": "ib_ndr",
                        "workers": [{"device": "h100-sxm", "tp": 2, "dtype": "fp8"}],
                    },
                    "decode": {"workers": [{"device": "groq-lpu-v1", "dtype": "fp8"}]},
                },
            }
        ]
    }
    path = tmp_path / "disagg.yaml"
    path.write_text(yaml.safe_dump(config))
    out = pdgate(
        "simulate", "--config", str(path), "--isl-dist", "lognormal:2000,800", "--osl", "200",
        "--rate", "2", "--duration", "60", "--seed", "3", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    assert m["failed"] == 0
    assert m["requests"] == pytest.approx(120, rel=0.3)
    assert m["itl_s"]["p50"] < 0.006  # the LPU's per-token pipeline latency, ~4 ms for 70B
    assert m["ttft_s"]["p50"] < 1.0
    assert {d["device"] for d in m["devices"]} == {"h100-sxm", "groq-lpu-v1"}


def test_simulate_human_report_and_errors() -> None:
    out = pdgate(
        "simulate", "--device", "cerebras-wse-3", "--model", "llama-3.1-8b", "--isl", "500",
        "--osl", "100", "--concurrency", "2", "--requests", "6", "--no-progress",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "TTFT s" in out.stdout
    assert "cerebras-wse-3" in out.stdout
    bad = pdgate("simulate", "--device", "h100-sxm", "--model", "llama-3.1-8b", "--isl", "5")
    assert bad.returncode == 2
    assert "give --isl/--isl-dist and --osl/--osl-dist" in bad.stderr or "load" in bad.stderr
    unknown = pdgate("simulate", "--device", "h1000", "--model", "llama-3.1-8b")
    assert unknown.returncode == 2
    assert "unknown device 'h1000'" in unknown.stderr


def test_calibrate_exit_status_follows_enforced_points(tmp_path: Path) -> None:
    point = {
        "id": "X1",
        "ref": "N3",
        "device": "h100-sxm",
        "model": "llama-3.1-70b",
        "dtype": "fp8",
        "tp": 2,
        "engine": "test",
        "date": "2025",
        "scenario": {"kind": "closed", "concurrency": 1, "isl": 500, "osl": 200, "requests": 1},
        "expect": {"itl_mean_s": 0.01891},
        "grade": "A",
        "source": "test",
    }
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"points": [point]}))
    ok = pdgate("calibrate", "--file", str(good))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1/1 enforced rows within tolerance" in ok.stdout
    bad = tmp_path / "bad.yaml"
    wrong = {**point, "expect": {"itl_mean_s": 0.005}}  # 4x too fast for the physics
    reported = {**point, "id": "X2", "grade": "B", "expect": {"itl_mean_s": 0.005}}
    bad.write_text(yaml.safe_dump({"points": [wrong, reported]}))
    miss = pdgate("calibrate", "--file", str(bad), "--json")
    assert miss.returncode == 1
    rows = [json.loads(line) for line in miss.stdout.splitlines()]
    assert [(r["point"], r["enforced"], r["passed"]) for r in rows] == [
        ("X1", True, False),
        ("X2", False, False),
    ]
