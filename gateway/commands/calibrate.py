"""``pdgate calibrate``: the command line over :mod:`gateway.sim.calibrate` (what it checks
and the tolerances are described there)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from backends.emulator.catalog import Catalog
from backends.errors import CatalogError
from gateway.sim.calibrate import Row, load_points, run_point, select


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--points", help="comma-separated point ids or prefixes (default: all)")
    parser.add_argument("--file", type=Path, help="calibration YAML (default: the shipped one)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")


def run(args: argparse.Namespace) -> int:
    try:
        points = select(load_points(args.file), args.points)
    except CatalogError as exc:
        print(f"pdgate calibrate: {exc}", file=sys.stderr)
        return 2
    catalog = Catalog.load()
    emit: Callable[[Row], None] = _json_row if args.json else _text_row
    if not args.json:
        print(_HEADER)
    rows: list[Row] = []
    started = time.perf_counter()
    for point in points:
        try:
            result = run_point(point, catalog)
        except (CatalogError, ValueError) as exc:
            print(f"pdgate calibrate: {point.id}: {exc}", file=sys.stderr)
            result = [Row(point, k, v, None) for k, v in point.expect.items()]
        for row in result:
            emit(row)
        rows.extend(result)
    misses = [r for r in rows if r.enforced and not r.passed]
    if not args.json:
        print(_summary(rows, misses, time.perf_counter() - started))
    return 1 if misses else 0


_HEADER = (
    f"{'point':18} {'device':15} {'model':16} {'dtype':5} {'metric':28} {'reference':>11} "
    f"{'predicted':>11} {'error':>8}  grade  status"
)


def _text_row(r: Row) -> None:
    p = r.point
    err = f"{r.error * 100:+7.1f}%" if r.error is not None else f"{'-':>8}"
    pred = f"{r.predicted:11.4g}" if r.predicted is not None else f"{'-':>11}"
    status = ("ok" if r.passed else "MISS") if r.enforced else ("(ok)" if r.passed else "(miss)")
    if not r.passed and r.known_miss:
        status += " (known)"
    print(
        f"{p.id:18} {p.device:15} {p.model:16} {p.dtype:5} {r.metric:28} {r.reference:11.4g} "
        f"{pred} {err}  {p.grade:5}  {status}",
        flush=True,
    )


def _json_row(r: Row) -> None:
    print(json.dumps(r.as_dict()), flush=True)


def _summary(rows: list[Row], misses: list[Row], seconds: float) -> str:
    enforced = [r for r in rows if r.enforced]
    lines = [
        f"{len(enforced) - len(misses)}/{len(enforced)} enforced rows within tolerance "
        f"(A/A-: ±15% throughput, ITL, TPOT; ±25% TTFT); "
        f"{sum(1 for r in rows if not r.enforced and r.passed)}/"
        f"{sum(1 for r in rows if not r.enforced)} B/C rows within it ({seconds:.0f} s)"
    ]
    unexpected = [r for r in misses if not r.known_miss]
    if misses:
        lines.append(
            f"{len(misses)} enforced rows miss ({len(misses) - len(unexpected)} documented as "
            "known misses in the calibration file, with the reason):"
        )
    lines += [f"  MISS {r.point.id} {r.metric}: {r.known_miss or 'unexpected'}" for r in misses]
    return "\n".join(lines)
