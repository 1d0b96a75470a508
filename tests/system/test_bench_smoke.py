"""The gateway benchmark in its quickest mode: every row of the table is there and its numbers
are sane (no assertions on performance: those belong to benchmark runs, not tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from loadtests import bench_modes
from loadtests.bench_gateway import SCENARIOS, TARGETS
from loadtests.bench_memory import SoakResult

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
FRONTS = {"pdgate", "pdgate-sglang", "sglang-router", "vllm-router"}  # measured processes


@pytest.mark.timeout(400)  # about 40 s alone; every router process competes for two cores
def test_quick_benchmark_has_every_row_with_sane_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "loadtests.bench_gateway", "--quick", "--duration", "1"]
    run = subprocess.run(
        [*argv, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-3000:]
    skipped = {line.split()[1] for line in run.stderr.splitlines() if " skipped: " in line}
    assert not skipped & {"direct", "direct-pd", "pdgate", "pdgate-sglang"}, run.stderr
    targets = [t for t in TARGETS if t not in skipped]

    results = orjson.loads(out.read_bytes())
    rows = [(r["scenario"], r["target"]) for r in results]
    assert rows == [(s.name, t) for s in SCENARIOS for t in targets]
    for s in SCENARIOS:
        for t in targets:
            assert f"| {s.name} | {t} |" in run.stdout

    tokens = {s.name: s.max_tokens for s in SCENARIOS}
    for r in results:
        where = f"{r['scenario']}/{r['target']}"
        assert r["errors"] == 0, (where, r["error_kinds"])
        assert r["requests"] > 0, where
        assert r["rps"] == pytest.approx(r["requests"] / r["duration_s"]), where
        # every answer is exactly max_tokens long: tokens/s is requests/s times that
        assert r["tokens_per_s"] == pytest.approx(r["rps"] * tokens[r["scenario"]]), where
        assert 0 < r["ttft_p50_ms"] <= r["p50_ms"] <= r["p99_ms"], where
        assert r["ttft_p50_ms"] <= r["ttft_p99_ms"], where
        assert r["backend_cpu_ms_per_req"] >= 0, where
        if r["target"] in FRONTS:
            assert r["cpu_ms_per_req"] > 0, where
            assert 20 < r["rss_mb"] < 2000, where
        else:
            assert r["cpu_ms_per_req"] is None, where
    assert "c64 CPU per request, pdgate / sglang-router" in run.stdout or skipped
    turns = next(line for line in run.stdout.splitlines() if "c1 in turns (100 rounds)" in line)
    assert all(f" {t} " in turns for t in targets), turns
    assert re.search(r"c1 added latency vs direct-pd, in turns: [+-]\d+\.\d\d ms", run.stdout)


def test_ab_compares_two_versions_round_by_round() -> None:
    """HEAD against the working tree: one table row per round, then the paired ratios."""
    argv = [sys.executable, "-m", "loadtests.bench_ab", "--a", "HEAD", "--b", "."]
    quick = ["--rounds", "2", "--duration", "0.5", "--warmup", "0.2"]
    run = subprocess.run([*argv, *quick], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2, run.stdout
    for line in rows:
        cells = [float(c) for c in line.strip("| ").split(" | ")[1:]]
        assert all(c > 0 for c in cells), line  # req/s and CPU per request, both versions
    ratios = re.search(
        r"req/s ([\d.]+), tokens/s ([\d.]+), gateway CPU per request ([\d.]+)", run.stdout
    )
    assert ratios is not None, run.stdout
    assert all(0.2 < float(r) < 5 for r in ratios.groups()), ratios.groups()


def test_soak_slope_is_the_least_squares_fit_after_the_warm_up() -> None:
    samples = [(float(t), 100.0 + 0.5 * t / 60) for t in range(0, 600, 5)]
    samples[0] = (0.0, 10.0)  # start-up, left out with the warm-up
    soak = SoakResult(minutes=10, requests=1, errors=0, samples=samples, warmup_s=30)
    assert soak.slope() == pytest.approx(0.5)
    assert "+0.500 MB/min" in soak.report()


def test_mode_comparison_prints_a_goodput_row_per_workload(
    capsys: pytest.CaptureFixture[str],
) -> None:
    trace = ROOT / "loadtests" / "traces" / "mooncake_sample.jsonl"
    argv = ["--rates", "40", "--duration", "5", "--trace", str(trace), "--requests", "40"]
    assert bench_modes.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| workload |")
    by_name = {r.split(" | ")[0][2:]: r.split(" | ")[1:] for r in rows[1:]}
    assert set(by_name) == {"chat, 40 req/s", "Mooncake conversation, 40 requests"}
    chat = [float(v.strip(" |")) for v in by_name["chat, 40 req/s"]]
    # A light chat load meets the SLOs in every mode: every request counts (requests over the
    # simulated time, the drain after the 5 s of arrivals included).
    assert all(15 < g <= 45 for g in chat[:3]), chat
    assert max(chat[:3]) - min(chat[:3]) < 0.05 * max(chat[:3]), chat
