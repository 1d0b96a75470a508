"""docs/accelerators.md: its device table is the generator's output (gateway/sim/devices.py).

The static columns (vendor, family, fitted constants, what the physics rests on, how many
checks each device has) are compared for every device. Pass marks and the status derived from
them are compared by running the device's quick checks (single-stream and step points) live;
a device whose checks are all quick is compared line for line. The GPUs' throughput checks
(TensorRT-LLM tables, MLPerf) take minutes and are graded by `pdgate calibrate`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends.emulator.catalog import Catalog
from gateway.sim.calibrate import Point, Row, load_set, run_point
from gateway.sim.devices import BEGIN, END, check_points, device_lines, render, splice

PAGE = Path(__file__).resolve().parents[2] / "docs" / "accelerators.md"
QUICK = ("step", "closed")


def _table() -> dict[str, list[str]]:
    text = PAGE.read_text()
    body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = {}
    for line in body.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    return rows


def _no_run(point: Point) -> list[Row]:
    return []


def test_the_page_lists_every_catalog_device(catalog: Catalog) -> None:
    assert sorted(_table()) == sorted(catalog.devices)


def test_the_static_columns_match_the_generator(catalog: Catalog) -> None:
    cal = load_set()
    page = _table()
    for line in device_lines(catalog, cal, runner=_no_run):
        generated = render([line], markdown=True).splitlines()[-1]
        cells = [c.strip() for c in generated.strip("|").split("|")]
        got = page[line.name]
        assert got[:3] == cells[:3], line.name  # device, vendor, family
        assert got[5:] == cells[5:], line.name  # fitted constants, physics basis
        denominator = f"/{len(line.checks)}" if line.checks else "no published figure"
        assert denominator in got[4], line.name


@pytest.mark.timeout(300)
def test_pass_marks_and_status_match_a_live_run_of_the_quick_checks(catalog: Catalog) -> None:
    cal = load_set()
    page = _table()

    def quick(point: Point) -> list[Row]:
        if point.scenario.kind not in QUICK:
            return []  # not run here: only lines of all-quick devices are compared whole
        return run_point(point, catalog, cal.services)

    lines = {d.name: d for d in device_lines(catalog, cal, runner=quick)}
    for name in sorted(catalog.devices):
        checks = check_points(cal, name)
        cells = page[name]
        line = lines[name]
        if all(p.scenario.kind in QUICK for p in checks):
            generated = render([line], markdown=True).splitlines()[-1]
            assert [c.strip() for c in generated.strip("|").split("|")] == cells, name
            continue
        for point in checks:
            if point.scenario.kind in QUICK:
                assert (point.id in cells[4]) == (point.id in line.passed), (name, point.id)
        if any(p.id in cells[4] for p in checks):
            assert cells[3] == "calibrated", name
        else:
            assert cells[3] == "spec-only", name


def test_splice_replaces_only_the_table() -> None:
    page = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert splice(page, "new\n") == f"intro\n{BEGIN}\nnew\n{END}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        splice("no markers", "x")


def _rows_file(path: Path, predicted: dict[str, float]) -> Path:
    """A saved run: every point's rows, predicted at ``predicted[id] x reference`` (1 if unset)."""
    cal = load_set()
    lines = []
    for p in cal.points:
        for metric, ref in p.expect.items():
            value = ref * predicted.get(p.id, 1.0)
            lines.append(json.dumps({"point": p.id, "metric": metric, "predicted": value}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_status_is_derived_from_check_rows_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    # every figure reproduced: each device with a check point is calibrated
    exact = _rows_file(tmp_path / "exact.jsonl", {})
    assert main(["calibrate", "--devices", "--rows", str(exact)]) == 0
    out = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()[1:]}
    assert out["mi300x"] == "calibrated"
    assert out["corsair"] == "spec-only"  # its points are train points: a fit is no check
    # MI300X's one check 40% off: spec-only; its train points cannot rescue it
    off = _rows_file(tmp_path / "off.jsonl", {"M1": 1.4})
    assert main(["calibrate", "--devices", "--rows", str(off)]) == 0
    out = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()[1:]}
    assert out["mi300x"] == "spec-only"
    assert out["h100-sxm"] == "calibrated"


def test_a_stale_saved_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    stale = tmp_path / "stale.jsonl"
    stale.write_text(json.dumps({"point": "Q1", "metric": "x", "predicted": 1.0}) + "\n")
    assert main(["calibrate", "--devices", "--rows", str(stale)]) == 2
    assert "no rows for point" in capsys.readouterr().err
