"""Measured serving runs against the emulation: per-row measured vs emulated, and a summary.

Usage::

    python -m loadtests.bench_silicon ROWS.csv [--out PRED.csv] [--jobs N]
        [--sample K --seed S | --limit K] [--peer aiconfigurator] [--quiet]

``ROWS.csv`` is any file in the silicon-sample format (see the calibration data's
``silicon/README.md``). Each row is simulated (:mod:`gateway.sim.silicon_run`); the summary
gives rows covered, the share of TPOT within ±15 % and TTFT within ±25 %, and the median
|error| and median signed error (bias) of each, for all rows and by mode, deployment (given or
inferred), engine, model family, device, prompt length and client count, then the ceiling any
input-only predictor can reach on these rows. ``--out`` writes
``id,pred_ttft_ms,pred_tpot_ms,reason`` (blank predictions and a reason where a row is not
supported). Rows are spread over ``--jobs`` processes. ``--infer-deployments`` drops the
worker counts and batches the disaggregated rows record, to grade the rule that infers them.
``--explain ID`` shows how one row is simulated and where its TTFT goes, and for a
disaggregated row where its deployment comes from (:func:`gateway.sim.silicon_run.explain`).
``--audit`` finds the rows no prediction from their inputs can match
(:mod:`gateway.sim.silicon_audit`): identical inputs with differing results, and TPOT faster
than one sequence alone on the row's own layout.

``--peer aiconfigurator`` also asks NVIDIA's AIConfigurator (optional extra
``pip install 'pdgate[aiconfigurator]'``) for the same rows, offline, and prints its accuracy
beside ours.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import product
from pathlib import Path

from gateway.sim.silicon import (
    Prediction,
    RowError,
    SiliconRow,
    fit_objective,
    is_train,
    parse_row,
    read_rows,
    rel_error,
    sibling_deployments,
    summary_table,
    without_deployments,
)


def _predict(row: SiliconRow) -> Prediction:
    from gateway.sim.silicon_run import predict

    return predict(row)


def _predict_alone(row: SiliconRow) -> Prediction:
    from gateway.sim.silicon_audit import single_client
    from gateway.sim.silicon_run import predict

    return predict(single_client(row))


def _peer(row: SiliconRow) -> Prediction:
    from loadtests.peer_aiconfigurator import predict as peer_predict

    return peer_predict(row)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_silicon", description=__doc__.split("\n")[0])
    p.add_argument("rows", type=Path)
    p.add_argument("--out", type=Path, help="write id,pred_ttft_ms,pred_tpot_ms,reason")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--limit", type=int, help="the first K rows")
    p.add_argument("--sample", type=int, help="K rows at random (with --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ids", type=Path, help="only the ids listed in this file (one a line)")
    p.add_argument("--peer", choices=["aiconfigurator"], help="also predict with a peer tool")
    p.add_argument(
        "--peer-cache",
        type=Path,
        help="CSV of the peer's predictions: read where it has the row, else computed and added",
    )
    p.add_argument("--peer-only", action="store_true", help="only the peer (fills --peer-cache)")
    p.add_argument("--quiet", action="store_true", help="no per-row lines")
    p.add_argument(
        "--explain",
        action="append",
        metavar="ID",
        help="how this row is simulated, where its TTFT goes, and for a disaggregated row where "
        "its deployment comes from (repeatable)",
    )
    p.add_argument(
        "--split", choices=["train", "check"], help="only the train or the check half of the fit"
    )
    p.add_argument(
        "--fit",
        metavar="PROFILE",
        help="fit this engine profile's two factors on the train rows of its family (its agg "
        "rows; its disagg rows where it has no agg rows)",
    )
    p.add_argument(
        "--infer-deployments",
        action="store_true",
        help="infer every disaggregated row's xPyD deployment, ignoring the worker counts and "
        "batches it or a sibling records (how well the inference recovers recorded ones)",
    )
    p.add_argument(
        "--audit",
        action="store_true",
        help="find the rows no prediction from their inputs can match: identical inputs with "
        "differing results, and TPOT faster than one sequence alone on the row's layout",
    )
    p.add_argument("--fit-rows", type=int, default=24, help="train rows per fit (at random)")
    p.add_argument(
        "--fit-grid",
        action="append",
        metavar="KNOB=V1,V2,...",
        help="search this knob over these values instead of the default two (repeatable; "
        "every combination of the grids is scored)",
    )
    args = p.parse_args(argv)

    raw = read_rows(args.rows)
    rows: list[SiliconRow] = []
    bad: list[Prediction] = []
    for d in raw:
        try:
            rows.append(parse_row(d))
        except RowError as exc:
            bad.append(Prediction(d.get("id") or "?", None, None, f"unreadable row: {exc}"))
    rows = without_deployments(rows) if args.infer_deployments else sibling_deployments(rows)
    if args.ids:
        wanted = set(args.ids.read_text().split())
        rows = [r for r in rows if r.id in wanted]
    if args.split:
        rows = [r for r in rows if is_train(r.id) == (args.split == "train")]
    if args.fit:
        return _fit(args.fit, rows, args)
    if args.explain:
        from backends.errors import CatalogError
        from gateway.sim.silicon import Stalled
        from gateway.sim.silicon_run import explain

        by_id = {r.id: r for r in rows}
        for rid in args.explain:
            row = by_id.get(rid)
            try:
                if row is None:
                    raise RowError(f"no row {rid!r} in {args.rows}")
                print(explain(row))
            except (RowError, CatalogError, Stalled) as exc:
                print(f"{rid}: {exc}", file=sys.stderr)
                return 1
        return 0
    if args.sample:
        rows = random.Random(args.seed).sample(rows, min(args.sample, len(rows)))
    if args.limit:
        rows = rows[: args.limit]

    if args.audit:
        from gateway.sim.silicon_audit import audit_table

        print(audit_table(rows, _run(_predict_alone, rows, args.jobs)))
        return 0

    wall = time.perf_counter()
    preds = _run(_predict, rows, args.jobs) if not args.peer_only else []
    wall = time.perf_counter() - wall
    pairs = list(zip(rows, preds, strict=True)) if not args.peer_only else []
    if not args.quiet:
        for row, pred in pairs:
            print(_line(row, pred))
    if pairs:
        print(
            f"\npdgate: {len(rows)} rows in {wall:.1f} s wall "
            f"({wall / max(1, len(rows)):.2f} s/row, {args.jobs} jobs); "
            f"unreadable rows: {len(bad)}"
        )
        print(summary_table(pairs))
    if args.peer:
        cached = _read_preds(args.peer_cache) if args.peer_cache else {}
        todo = [r for r in rows if r.id not in cached]
        for row, pred in zip(todo, _run(_peer, todo, args.jobs), strict=True):
            cached[row.id] = pred
        if args.peer_cache:
            _write_preds(args.peer_cache, list(cached.values()))
        peer_pairs = [(r, cached[r.id]) for r in rows]
        print(f"\n{args.peer} on the same rows:")
        print(summary_table(peer_pairs))
    if args.out:
        _write_preds(args.out, [*preds, *bad])
    return 0


def _write_preds(path: Path, preds: list[Prediction]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "pred_ttft_ms", "pred_tpot_ms", "reason"])
        for pred in preds:
            w.writerow([pred.id, _num(pred.ttft_ms), _num(pred.tpot_ms), pred.reason])


def _read_preds(path: Path) -> dict[str, Prediction]:
    if not path.exists():
        return {}
    out = {}
    with path.open(newline="") as f:
        for d in csv.DictReader(f):
            ttft = float(d["pred_ttft_ms"]) if d["pred_ttft_ms"] else None
            tpot = float(d["pred_tpot_ms"]) if d["pred_tpot_ms"] else None
            out[d["id"]] = Prediction(d["id"], ttft, tpot, d["reason"])
    return out


# Coordinate search: the step overhead (TPOT at small batch) first, then the compute
# efficiency (TTFT, large-batch decode) at the chosen overhead.
OVERHEADS = (0.0, 0.001, 0.002, 0.004, 0.006)
EFFICIENCIES = (0.3, 0.5, 0.7, 0.85, 1.0)
DEFAULTS = {"compute_efficiency": 1.0, "step_overhead_s": 0.0}


def _fit(profile: str, rows: list[SiliconRow], args: argparse.Namespace) -> int:
    from functools import partial

    from gateway.sim.silicon_run import engine_profile

    family = [r for r in rows if is_train(r.id) and _profile_name(r, engine_profile) == profile]
    # Aggregated rows where the family has them; a serving stack measured only disaggregated
    # (Dynamo) fits on its xPyD rows.
    train = [r for r in family if r.mode == "agg"] or family
    train = random.Random(args.seed).sample(train, min(args.fit_rows, len(train)))
    if not train:
        print(f"no train rows for {profile}")
        return 1
    grids: list[tuple[str, tuple[float, ...]]] = [
        ("step_overhead_s", OVERHEADS),
        ("compute_efficiency", EFFICIENCIES),
    ]
    if args.fit_grid:
        grids = [_grid(spec) for spec in args.fit_grid]
    best = {name: grid[0] for name, grid in grids} if args.fit_grid else dict(DEFAULTS)

    def score(update: dict[str, float]) -> float:
        knobs = {**best, **update}
        fn = partial(_predict_override, overrides={profile: knobs})
        preds = _run(fn, train, args.jobs)
        value = fit_objective(list(zip(train, preds, strict=True)))
        print(f"  {knobs} -> {value:.3f}", flush=True)
        return value

    if args.fit_grid:
        # Every combination of the given grids: knobs that trade against each other (a host
        # cost and a latency that both lengthen TTFT) are not found one at a time.
        names = [name for name, _ in grids]
        combos = product(*(grid for _, grid in grids))
        trials = [dict(zip(names, values, strict=True)) for values in combos]
        scored = [(score(trial), trial) for trial in trials]
        best.update(min(scored, key=lambda st: st[0])[1])
    else:
        for name, grid in grids:
            scores = {v: score({name: v}) for v in grid}
            best[name] = min(scores, key=lambda v: scores[v])
    print(f"{profile}: {best} on {len(train)} train rows")
    return 0


def _grid(spec: str) -> tuple[str, tuple[float, ...]]:
    """``KNOB=V1,V2,...`` of ``--fit-grid``."""
    name, _, values = spec.partition("=")
    try:
        grid = tuple(float(v) for v in values.split(","))
    except ValueError:
        raise SystemExit(f"--fit-grid {spec!r}: values must be numbers") from None
    if not name or not values:
        raise SystemExit(f"--fit-grid {spec!r}: expected KNOB=V1,V2,...")
    return name, grid


def _profile_name(row: SiliconRow, lookup) -> str:  # type: ignore[no-untyped-def]
    try:
        return str(lookup(row).name)
    except Exception:
        return ""


def _predict_override(row: SiliconRow, overrides: dict[str, dict[str, float]]) -> Prediction:
    from gateway.sim.silicon_run import predict_with

    return predict_with(row, overrides)


def _run(fn, rows: list[SiliconRow], jobs: int) -> list[Prediction]:  # type: ignore[no-untyped-def]
    if jobs <= 1 or len(rows) <= 1:
        return [fn(r) for r in rows]
    # Long rows first (8192 output tokens) so the pool does not end on one straggler.
    order = sorted(range(len(rows)), key=lambda i: -rows[i].osl * (1 + rows[i].concurrency))
    out: list[Prediction | None] = [None] * len(rows)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for i, pred in zip(order, pool.map(fn, [rows[i] for i in order], chunksize=1), strict=True):
            out[i] = pred
    return [p for p in out if p is not None]


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def _line(row: SiliconRow, pred: Prediction) -> str:
    def cell(pred_ms: float | None, meas: float | None) -> str:
        e = rel_error(pred_ms, meas)
        if pred_ms is None or meas is None or e is None:
            return f"{'-':>9} {meas or 0:>9.1f} {'':>6}"
        return f"{pred_ms:>9.1f} {meas:>9.1f} {100 * e:>+5.0f}%"

    if not pred.covered:
        return f"{row.id[:70]:<70} unsupported: {pred.reason}"
    return (
        f"{row.id[:70]:<70} TTFT {cell(pred.ttft_ms, row.ttft_ms)}  "
        f"TPOT {cell(pred.tpot_ms, row.tpot_ms)}  {pred.wall_s:5.2f}s"
    )


if __name__ == "__main__":
    sys.exit(main())
