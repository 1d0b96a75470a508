"""``pdgate calibrate``: the command line over :mod:`gateway.sim.calibrate` (what it checks,
the tolerances and the grading are described there) and :mod:`gateway.sim.devices`
(``--devices``: the per-device table and the status derived from the checks)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from backends.emulator.catalog import Catalog
from backends.errors import CatalogError
from gateway.sim.calibrate import Row, load_set, run_point, select, summary_text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--points", help="comma-separated point ids or prefixes (default: all)")
    parser.add_argument("--file", type=Path, help="calibration YAML (default: the shipped one)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument(
        "--devices",
        action="store_true",
        help="one line per device: family, what its physics is based on, checks it passes",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="with --devices: the table as Markdown"
    )
    parser.add_argument(
        "--rows",
        type=Path,
        help="with --devices: grade the checks from a saved `pdgate calibrate --json` run "
        "instead of simulating them again",
    )


def run(args: argparse.Namespace) -> int:
    try:
        cal = load_set(args.file)
        points = select(cal.points, args.points)
    except CatalogError as exc:
        print(f"pdgate calibrate: {exc}", file=sys.stderr)
        return 2
    catalog = Catalog.load()
    if args.devices:
        from gateway.sim.devices import device_table, saved_rows

        try:
            runner = saved_rows(cal, args.rows) if args.rows else None
            print(device_table(catalog, cal, markdown=args.markdown, runner=runner), end="")
        except (OSError, LookupError, json.JSONDecodeError) as exc:
            print(f"pdgate calibrate: {exc}", file=sys.stderr)
            return 2
        return 0
    emit: Callable[[Row], None] = _json_row if args.json else _text_row
    if not args.json:
        print(_HEADER)
    rows: list[Row] = []
    started = time.perf_counter()
    for point in points:
        try:
            result = run_point(point, catalog, cal.services)
        except (CatalogError, ValueError) as exc:
            print(f"pdgate calibrate: {point.id}: {exc}", file=sys.stderr)
            result = [Row(point, k, v, None) for k, v in point.expect.items()]
        for row in result:
            emit(row)
        rows.extend(result)
    failed = [r for r in rows if r.failed]
    if not args.json:
        print(summary_text(cal, rows, time.perf_counter() - started))
    return 1 if failed else 0


_HEADER = (
    f"{'point':18} {'device':15} {'model':16} {'dtype':5} {'metric':28} {'reference':>11} "
    f"{'predicted':>11} {'error':>8}  grade  role   status"
)


def _text_row(r: Row) -> None:
    p = r.point
    err = f"{r.error * 100:+7.1f}%" if r.error is not None else f"{'-':>8}"
    pred = f"{r.predicted:11.4g}" if r.predicted is not None else f"{'-':>11}"
    print(
        f"{p.id:18} {p.device:15} {p.model:16} {p.dtype:5} {r.metric:28} {r.reference:11.4g} "
        f"{pred} {err}  {p.grade:5}  {p.role:5}  {r.status}",
        flush=True,
    )


def _json_row(r: Row) -> None:
    print(json.dumps(r.as_dict()), flush=True)
