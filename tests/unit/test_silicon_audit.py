"""Rows no prediction from their inputs can match (gateway/sim/silicon_audit.py): the
single-sequence floor, the best share above it, and the harness's ``--audit``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from gateway.sim.silicon import Prediction, most_within, parse_row
from gateway.sim.silicon_audit import (
    audit,
    audit_table,
    faster_than_alone,
    single_client,
)
from gateway.sim.silicon_run import predict
from tests.unit.test_silicon import AGG


def test_faster_than_alone_is_out_of_reach_of_every_prediction_at_the_floor() -> None:
    # 5.5 ms within ±15 % accepts at most 6.325 ms: a floor of 10.8 ms cannot reach it.
    assert faster_than_alone(5.5, 10.8)
    # 9.5 ms accepts up to 10.925 ms, which is at the floor's 10.8 ms or above.
    assert not faster_than_alone(9.5, 10.8)
    # The boundary: 10.0 · 1.15 = 11.5, so a floor of 11.5 is still reached, 11.6 is not.
    assert not faster_than_alone(10.0, 11.5)
    assert faster_than_alone(10.0, 11.6)
    assert not faster_than_alone(12.0, 10.8)  # slower than alone is never flagged


def test_most_within_counts_the_deepest_band_at_or_above_the_floor() -> None:
    # No floor in the way: one prediction in [7.225, 9.2] takes 8.0 and 8.5.
    assert most_within([8.0, 8.5, 12.0], 0.15, 0.0) == 2
    # At 11 ms or more only 12.0 (which accepts [10.2, 13.8]) can be hit; 8.5 stops at 9.775.
    assert most_within([8.0, 8.5, 12.0], 0.15, 11.0) == 1
    # A floor above every band hits nothing.
    assert most_within([8.0, 8.5], 0.15, 20.0) == 0
    assert most_within([], 0.15, 1.0) == 0


def _row(rid: str, tpot_ms: float, clients: int = 16):  # type: ignore[no-untyped-def]
    source = f"db-dump; config_id=1; silicon_concurrency={clients}; measured=x"
    return parse_row(
        {**AGG, "id": rid, "silicon_tpot_ms": str(tpot_ms), "silicon_data_source": source}
    )


def test_audit_separates_twins_from_rows_faster_than_one_alone() -> None:
    # Group A: identical inputs measured at 5.5 and 10.3 ms, one sequence alone 10.8 ms.
    # Group B (other client count): 5.5 and 6.0 ms, which one prediction could share, but
    # only below the 10.8 ms floor.
    rows = [_row("a1", 5.5), _row("a2", 10.3), _row("b1", 5.5, 32), _row("b2", 6.0, 32)]
    alone = [Prediction(r.id, 300.0, 10.8) for r in rows]
    a = audit(rows, alone)
    assert (a.rows, a.inputs) == (4, 2)
    assert [r.id for r, _ in a.faster] == ["a1", "b1", "b2"]
    # Identical inputs only: one of group A (5.5 and 10.3 share no band), both of group B.
    assert a.tpot_ceiling == pytest.approx(3 / 4)
    # With the floor: only a2 (10.3 ms accepts up to 11.845 ms).
    assert a.tpot_attainable == pytest.approx(1 / 4)
    assert a.ttft_ceiling == 1.0  # every row measured 250 ms


def test_audit_leaves_out_rows_without_a_single_sequence_prediction() -> None:
    rows = [_row("a1", 5.5), _row("a2", 10.3)]
    alone = [Prediction("a1", None, None, "no profile"), Prediction("a2", 300.0, 10.8)]
    a = audit(rows, alone)
    assert a.rows == 1
    assert a.faster == ()
    empty = audit([], [])
    assert empty.rows == 0
    assert math.isnan(empty.tpot_attainable)


def test_audit_table_lists_the_rows_and_a_line_per_mode() -> None:
    rows = [_row("a1", 5.5), _row("a2", 10.3)]
    text = audit_table(rows, [Prediction(r.id, 300.0, 10.8) for r in rows])
    assert "a1: TPOT 5.50 ms measured, 10.80 ms for one sequence alone (0.51x)" in text
    assert "a2:" not in text
    all_line = next(line for line in text.splitlines() if line.startswith("all "))
    assert all_line.split()[1:4] == ["2", "1", "1"]  # rows, inputs, faster than one alone
    assert any(line.startswith("mode=agg ") for line in text.splitlines())


def test_single_client_runs_the_row_alone_and_is_no_slower_per_token() -> None:
    row = _row("r", 12.5, 64)
    one = single_client(row)
    assert one.concurrency == 1
    assert (one.agg, one.isl, one.osl) == (row.agg, row.isl, row.osl)
    busy, alone = predict(row), predict(one)
    assert busy.tpot_ms is not None
    assert alone.tpot_ms is not None
    assert alone.tpot_ms < busy.tpot_ms  # 64 sequences share every step


def test_bench_silicon_audit_flags_a_row_faster_than_its_layout_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loadtests import bench_silicon

    fast = {**AGG, "id": "fast", "silicon_tpot_ms": "1.0"}  # 1 ms a token for DeepSeek-R1
    plain = {**AGG, "id": "plain"}
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(AGG))
        w.writeheader()
        w.writerows([fast, plain])
    assert bench_silicon.main([str(path), "--audit", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "fast: TPOT 1.00 ms measured" in out
    assert "plain:" not in out
