"""``pdgate report``: reading locust runs and simulations, load levels, goodput, the files."""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.sim.report import (
    REQUEST_COLUMNS,
    Quantiles,
    ReportError,
    bucket_quantile,
    itl_buckets,
    itl_quantiles,
    load,
    quantile,
)

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(prefix: Path, rows: list[dict[str, object]], gaps: Sequence[float] = ()) -> None:
    with prefix.with_name(prefix.name + "_requests.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, REQUEST_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({c: row.get(c, "") for c in REQUEST_COLUMNS})
    bounds = itl_buckets()
    counts = [0] * len(bounds)
    for g in gaps:
        counts[bisect.bisect_left(bounds, g)] += 1
    with prefix.with_name(prefix.name + "_itl.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["le_s", "count"])
        w.writerows(
            [("+Inf" if math.isinf(b) else b, c) for b, c in zip(bounds, counts, strict=True)]
        )


def step_rows(rate: float, start: float, seconds: float, ttft: float) -> list[dict[str, object]]:
    """Requests at ``rate`` for ``seconds``, each 1 s long with 10 tokens."""
    n = round(rate * seconds)
    return [
        {
            "start_unix_s": start + i / rate,
            "kind": "chat",
            "offered_rps": rate,
            "users": 16,
            "completion_tokens": 10,
            "ttft_s": ttft,
            "tpot_s": 0.05,
            "e2e_s": 1.0,
            "ok": 1,
        }
        for i in range(n)
    ]


def test_quantiles() -> None:
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert quantile([7.0], 0.99) == 7.0
    q = Quantiles.of([float(i) for i in range(101)])
    assert q is not None
    assert (q.p50, q.p90, q.p99, q.mean) == (50.0, 90.0, 99.0, 50.0)
    assert Quantiles.of([]) is None


def test_bucket_quantile_interpolates_within_a_bucket() -> None:
    buckets = [(0.001, 0), (0.01, 100), (math.inf, 0)]
    assert bucket_quantile(buckets, 0.5) == pytest.approx(0.001 * 10**0.5)
    assert bucket_quantile(buckets, 1.0) == pytest.approx(0.01)
    assert math.isnan(bucket_quantile([(1.0, 0)], 0.5))


def test_levels_follow_the_offered_rate(tmp_path: Path) -> None:
    """A two-step run: each step is a level; the slower step misses the TTFT target."""
    rows = step_rows(2.0, 1000.0, 10, ttft=0.1) + step_rows(4.0, 1010.0, 10, ttft=3.0)
    rows.append({**rows[0], "ok": 0, "ttft_s": "", "tpot_s": "", "error": "HTTP 502"})
    write_run(tmp_path / "run", rows, gaps=[0.002] * 50)
    report = load([tmp_path / "run"])
    assert report.x_label == "offered load (requests/s)"
    low, high = report.levels
    assert (low.offered, high.offered) == (2.0, 4.0)
    assert (low.requests, low.failed, high.requests) == (21, 1, 40)
    assert low.throughput_rps == pytest.approx(2.0, rel=0.1)
    assert high.throughput_rps == pytest.approx(4.0, rel=0.1)
    assert low.goodput_rps == pytest.approx(low.throughput_rps, rel=0.15)
    assert high.goodput_rps < 0.5  # TTFT 3 s > the 2 s target: only the last step's stragglers
    assert high.tokens_per_s == pytest.approx(40.0, rel=0.1)
    itl = itl_quantiles(report)
    assert itl is not None
    assert itl.p50 == pytest.approx(0.002, rel=0.15)


def test_slo_targets_can_be_overridden(tmp_path: Path) -> None:
    write_run(tmp_path / "run", step_rows(4.0, 0.0, 5, ttft=3.0))
    assert load([tmp_path / "run"]).levels[0].goodput_rps == 0
    relaxed = load([tmp_path / "run"], slo_ttft=5.0)
    assert relaxed.levels[0].goodput_rps > 3.0


def test_closed_loop_groups_by_users(tmp_path: Path) -> None:
    rows = [{**r, "offered_rps": 0.0, "users": 4} for r in step_rows(4.0, 0.0, 5, 0.1)]
    write_run(tmp_path / "run", rows)
    report = load([tmp_path / "run_requests.csv"])
    assert report.x_label == "concurrent users"
    assert [lv.offered for lv in report.levels] == [4.0]
    assert not report.offered_is_rate


def simulation(rate: float, ttft_p50: float) -> dict[str, object]:
    q = {"mean": ttft_p50, "p50": ttft_p50, "p90": ttft_p50 * 2, "p99": ttft_p50 * 3}
    return {
        "ttft_s": q,
        "itl_s": {"mean": 0.01, "p50": 0.01, "p90": 0.02, "p99": 0.03},
        "tpot_s": q,
        "requests_per_s": rate * 0.98,
        "goodput_requests_per_s": rate * 0.9,
        "output_tokens_per_s": rate * 200,
        "requests": 100,
        "failed": 0,
        "slo": {"ttft_s": 1.5, "tpot_s": 0.2},
    }


def test_simulations_become_levels(tmp_path: Path) -> None:
    paths = []
    for rate in (8.0, 2.0):
        p = tmp_path / f"sim-{rate}.json"
        p.write_text(json.dumps(simulation(rate, 0.1 * rate)))
        paths.append(p)
    report = load(paths)
    assert [lv.offered for lv in report.levels] == [pytest.approx(1.96), pytest.approx(7.84)]
    assert report.x_label == "achieved load (requests/s)"
    assert report.slo == (1.5, 0.2)
    assert report.levels[1].ttft is not None
    assert report.levels[1].ttft.p99 == pytest.approx(2.4)


def test_simulations_with_an_offered_rate(tmp_path: Path) -> None:
    p = tmp_path / "runs.jsonl"
    p.write_text("\n".join(json.dumps({**simulation(r, 0.1), "offered_rps": r}) for r in (1, 3)))
    report = load([p])
    assert [lv.offered for lv in report.levels] == [1.0, 3.0]
    assert report.offered_is_rate


def test_bad_inputs_say_why(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"run_requests\.csv not found"):
        load([tmp_path / "run"])
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ReportError, match="not pdgate simulate"):
        load([bad])


def test_the_command_writes_plots_and_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = step_rows(2.0, 0.0, 5, 0.1) + step_rows(6.0, 5.0, 5, 0.4)
    write_run(tmp_path / "run", rows, gaps=[0.001, 0.002, 0.004] * 20)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "run"), "--out", str(out), "--title", "T"]) == 0
    for name in ("ttft.png", "itl.png", "load.png"):
        assert (out / name).read_bytes().startswith(PNG), name
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# T\n")
    assert "| 2 | 10 | 0 |" in summary
    assert "| 6 | 30 | 0 |" in summary
    assert "![load.png](load.png)" in summary
    assert str(out / "summary.md") in capsys.readouterr().out


def test_the_command_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
