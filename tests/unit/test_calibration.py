"""The calibration set (config/calibration.yaml) and `pdgate calibrate` on a representative subset.

The full run (`pdgate calibrate`, 5-7 minutes on two cores) is documented in
docs/accuracy.md; here, the quick points of each family of reference must stay within tolerance.
"""

from __future__ import annotations

import pytest

from backends.emulator.catalog import Catalog
from gateway.sim.calibrate import ENFORCED, load_points, run_point, select

# One or two fast points per source and device: TensorRT-LLM tables on H100, H200 and B200
# (TP1, TP2, TP8), NIM latency sweeps, MLPerf v4.1 offline, and the LPU/wafer speeds.
SUBSET = "N1,N2,N3,T1-5000,T3-2048,T4-5000,T5-2048,T6-2048,T7-5000,C1,C2,Q3"


def test_points_are_unique_sourced_and_their_known_misses_name_expected_metrics() -> None:
    points = load_points()
    ids = [p.id for p in points]
    assert len(ids) == len(set(ids))
    assert len(points) > 50
    for p in points:
        assert p.source
        assert set(p.known_miss) <= set(p.expect), p.id
        if p.known_miss:
            assert p.grade in ENFORCED  # only enforced rows need explaining
    refs = {p.ref for p in points}
    assert {"G1", "G2", "G3", "G4", "G5", "G6", "G7", "G8", "N1", "N2", "N3"} <= refs
    assert {f"T{i}" for i in range(1, 9)} <= refs


@pytest.mark.parametrize("point", select(load_points(), SUBSET), ids=lambda p: p.id)
def test_representative_points_are_within_tolerance(point: object, catalog: Catalog) -> None:
    rows = run_point(point, catalog)  # type: ignore[arg-type]
    for row in rows:
        assert row.predicted is not None
        if row.enforced:
            assert row.passed, f"{row.metric}: {row.error:+.1%} (±{row.tolerance:.0%})"
        elif row.point.grade == "B":
            assert abs(row.error or 0) < 0.5  # reported, but not wildly off
