"""The locustfile, headless, against a real gateway: no failures, and timing that matches the
emulated schedule.

One gateway serves two models: ``llama-3.1-8b`` on H100 prefill and H100 decode slowed 10×
(``time_scale: 0.1``), one request at a time, so TTFT and inter-token latency are known from
the device physics; and ``fast`` (the same model 10× faster) for the mixed and trace
workloads, whose runs end with ``pdgate report`` on what locust wrote.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.emulator.catalog import Catalog
from backends.emulator.timing import StepShape
from gateway.cli import main as pdgate
from tests.helpers import MODEL, pool, run_server

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests/locustfile.py"
TRACE = ROOT / "loadtests/traces/mooncake_sample.jsonl"
# time_scale of the timed model: every device step takes 10× its real time, so the few
# milliseconds of HTTP and Python on a busy machine stay small beside a step.
SLOW = 0.1
PROMPT, OUTPUT = 400, 12


def slow_pool() -> dict[str, Any]:
    return pool("h100-sxm", 1, time_scale=SLOW)


CONFIG = {
    "models": [
        {
            "name": MODEL,
            "mode": "disaggregated",
            "pools": {"prefill": slow_pool(), "decode": slow_pool()},
        },
        {
            "name": "fast",
            "profile": MODEL,
            "mode": "disaggregated",
            "pools": {
                "prefill": pool("h100-sxm", 1, time_scale=10),
                "decode": pool("h100-sxm", 1, time_scale=10),  # KV room for the trace's 87k prompt
            },
        },
    ]
}


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    with run_server(CONFIG) as base:
        yield base


def locust(host: str, out: Path, *args: str, seconds: int = 5) -> Path:
    """Run the locustfile headless; returns the --csv prefix. Fails on a non-zero exit."""
    prefix = out / "run"
    argv = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
        "-t", f"{seconds}s", "--csv", str(prefix), "--html", str(out / "run.html"),
        "--only-summary", "--loglevel", "WARNING", *args,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return prefix


def stats(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with prefix.with_name("run_stats.csv").open() as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}


def requests(prefix: Path) -> list[dict[str, str]]:
    with prefix.with_name("run_requests.csv").open() as f:
        return list(csv.DictReader(f))


def assert_no_failures(prefix: Path) -> None:
    rows = stats(prefix)
    assert rows, "locust recorded nothing"
    failing = {k: r["Failure Count"] for k, r in rows.items() if r["Failure Count"] != "0"}
    assert failing == {}
    assert all(r["ok"] == "1" for r in requests(prefix))


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


def test_ttft_and_itl_follow_the_emulated_schedule(
    gateway: str, tmp_path: Path, catalog: Catalog
) -> None:
    """One user, closed loop: TTFT is one prefill step, ITL one decode step (both 10× slower).

    A TTFT taken one token late would read prefill + KV transfer + one decode step, ≈ 1.6×
    the expected value: far outside the bounds below.
    """
    prefix = locust(
        gateway, tmp_path, "-u", "1", "--workload", "chat",
        "--prompt-tokens", str(PROMPT), "--output-tokens", str(OUTPUT), seconds=6,
    )  # fmt: skip
    assert_no_failures(prefix)
    device = catalog.deployment("h100-sxm", MODEL)
    ttft = device.step_time(StepShape.of([(PROMPT, 0)])) / SLOW
    itl = device.step_time(StepShape.of([(1, PROMPT + OUTPUT // 2)])) / SLOW

    rows = stats(prefix)
    measured_ttft = float(rows[("TTFT", "chat")]["Median Response Time"]) / 1000
    measured_itl = float(rows[("ITL", "chat")]["Median Response Time"]) / 1000
    assert 0.9 * ttft <= measured_ttft <= 1.3 * ttft, (measured_ttft, ttft)
    assert measured_itl == pytest.approx(itl, rel=0.1, abs=0.001)  # locust rounds to 1 ms
    tokens_per_s = float(rows[("TOKENS_PER_S", "chat")]["Average Response Time"])
    assert tokens_per_s == pytest.approx(1 / itl, rel=0.15)

    done = requests(prefix)
    assert len(done) >= 4  # ≈ 1 s each
    assert {int(r["prompt_tokens"]) for r in done} == {PROMPT}
    assert {int(r["completion_tokens"]) for r in done} == {OUTPUT}
    assert 0.9 * ttft <= median([float(r["ttft_s"]) for r in done]) <= 1.3 * ttft
    assert (tmp_path / "run.html").stat().st_size > 0


def test_mixed_workload_in_poisson_steps(gateway: str, tmp_path: Path) -> None:
    """Two 3 s steps of open-loop arrivals, 4/s then 12/s: each step offers its own rate."""
    prefix = locust(
        gateway, tmp_path, "--model", "fast", "--workload", "mix", "--shape", "step",
        "--rate", "4", "--step-rate", "8", "--step-every", "3", "--steps", "2", "-u", "32",
        "--output-tokens", "uniform:8,32", "--rag-tokens", "2000",
        "--agent-system-tokens", "256", "--agent-tool-tokens", "64", "--seed", "3",
        seconds=20,  # the shape ends the run after its two steps
    )  # fmt: skip
    assert_no_failures(prefix)
    done = requests(prefix)
    assert {r["kind"] for r in done} == {"chat", "rag", "agent"}
    per_step = Counter(r["offered_rps"] for r in done)
    assert set(per_step) == {"4.0", "12.0"}
    assert 4 <= per_step["4.0"] <= 24, per_step  # Poisson around 12
    assert 18 <= per_step["12.0"] <= 60, per_step  # Poisson around 36
    assert max(float(r["late_s"]) for r in done) < 0.5, "enough users: arrivals on time"
    names = {name for _, name in stats(prefix)}
    assert {"chat", "rag", "agent"} <= names

    out = tmp_path / "report"
    assert pdgate(["report", str(prefix), "--out", str(out)]) == 0
    assert (out / "load.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "| 4 |" in summary
    assert "| 12 |" in summary


def test_trace_replay(gateway: str, tmp_path: Path) -> None:
    prefix = locust(
        gateway, tmp_path, "--model", "fast", "--workload", "trace", "--trace", str(TRACE),
        "--trace-limit", "40", "--trace-speedup", "8", "-u", "32",
    )  # fmt: skip
    assert_no_failures(prefix)
    done = requests(prefix)
    assert len(done) >= 5
    assert {r["kind"] for r in done} == {"trace"}
    lengths = {
        (int(line["input_length"]), int(line["output_length"]))
        for line in map(json.loads, TRACE.read_text().splitlines()[:40])
    }
    sent = {(int(r["prompt_tokens"]), int(r["completion_tokens"])) for r in done}
    assert sent <= lengths, "each request has the lengths of a trace line"
