"""``pdgate plan``: the cheapest deployment that meets a workload's SLOs.

    pdgate plan --model llama-3.1-70b --isl-dist lognormal:1000,500 --osl-dist lognormal:250,150 \\
        --rate 10 --slo ttft:p90=1.0 --slo tpot:p90=0.05 --attainment 0.9 \\
        --devices h100-sxm,h200-sxm,b200,mi300x --plot plan.png --write-config plan.yaml

See :mod:`gateway.sim.plan.search` for how the search works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from backends.emulator.catalog import Catalog
from backends.errors import CatalogError
from gateway.sim.plan.evaluate import PlanWorkload, Slos, parse_slo
from gateway.sim.plan.output import as_csv, as_json, plot, table, write_config
from gateway.sim.plan.prices import PriceBook, parse_price
from gateway.sim.plan.request import OBJECTIVES, PlanError, PlanRequest
from gateway.sim.plan.search import search
from gateway.sim.plan.space import MODES
from gateway.sim.simulate import _length
from gateway.sim.workload import WorkloadError, load_trace


def configure(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to serve")
    what.add_argument("--model", required=True, help="model profile, e.g. llama-3.1-70b")
    what.add_argument(
        "--dtype", default="fp8", choices=["bf16", "fp8", "fp4"], help="weights (default fp8)"
    )
    work = parser.add_argument_group("workload (as pdgate simulate takes it)")
    work.add_argument("--isl", help="input length: N, or a distribution as for --isl-dist")
    work.add_argument("--osl", help="output length: N, or a distribution")
    work.add_argument("--isl-dist", help="uniform:LO,HI | normal:MEAN,STD | lognormal:MEAN,STD")
    work.add_argument("--osl-dist", help="as --isl-dist")
    work.add_argument("--trace", type=Path, help="Mooncake-format JSONL trace (its lengths)")
    work.add_argument(
        "--rate",
        type=float,
        help="requests/s to sustain (a trace's arrivals are time-scaled to it; default: its own)",
    )
    slo = parser.add_argument_group("service levels")
    slo.add_argument(
        "--slo",
        action="append",
        default=[],
        metavar="METRIC:pNN=S",
        help="latency target, e.g. ttft:p90=1.0, tpot:p90=0.05, e2e:p99=30 (repeatable)",
    )
    slo.add_argument(
        "--attainment",
        type=float,
        default=0.9,
        help="share of requests meeting every target at once (default 0.9)",
    )
    space = parser.add_argument_group("search space")
    space.add_argument("--devices", help="comma-separated devices (default: every priced one)")
    space.add_argument(
        "--decode-devices", default="", help="comma-separated devices allowed only to decode"
    )
    space.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    space.add_argument(
        "--engine",
        default="default",
        help="engine profile from config/engines (e.g. vllm-0.14, sglang-0.5, trtllm-1.1) "
        "whose knobs every candidate runs with; 'default' searches batch caps and chunk budgets",
    )
    space.add_argument(
        "--objective",
        default="cost",
        choices=OBJECTIVES,
        help="minimise $/hour, watts at TDP (J/token) or devices (default cost)",
    )
    space.add_argument(
        "--max-devices", type=int, default=64, help="devices in all at most (default 64)"
    )
    space.add_argument(
        "--price", action="append", default=[], metavar="DEVICE=USD", help="$/device-hour"
    )
    space.add_argument("--link", default="ib_ndr", help="KV link between devices of one vendor")
    space.add_argument("--cross-link", default="roce_200g", help="KV link across vendors")
    run = parser.add_argument_group("search")
    run.add_argument("--top", type=int, default=8, help="candidates to simulate")
    run.add_argument(
        "--requests", type=int, help="requests per simulation (default: a minute's, 300-3,000)"
    )
    run.add_argument("--seed", type=int, default=0, help="arrivals and lengths (replay: +1)")
    run.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    run.add_argument("--ray", metavar="ADDRESS", help="run the simulations on a Ray cluster")
    run.add_argument("--no-robustness", action="store_true", help="skip the ±25%% and loss runs")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    out.add_argument("--csv", type=Path, help="write the simulated plans as CSV")
    out.add_argument("--plot", type=Path, help="write the Pareto frontier as a PNG")
    out.add_argument("--write-config", type=Path, help="write the chosen plan as a gateway YAML")


def build(args: argparse.Namespace) -> PlanRequest:
    catalog = Catalog.load()
    engine = None if args.engine == "default" else args.engine
    if engine is not None and engine not in catalog.engines:
        known = ", ".join(["default", *sorted(catalog.engines)])
        raise PlanError(f"--engine {engine!r}: no such engine profile; known: {known}")
    trace = load_trace(args.trace) if args.trace else None
    if trace is not None and any(
        x is not None for x in (args.isl, args.osl, args.isl_dist, args.osl_dist)
    ):
        raise WorkloadError("a trace brings its own lengths: drop --isl/--osl with --trace")
    workload = PlanWorkload(
        _length(args.isl, args.isl_dist, "--isl"), _length(args.osl, args.osl_dist, "--osl"), trace
    )
    if trace is None and (workload.isl is None or workload.osl is None):
        raise WorkloadError("give --isl/--isl-dist and --osl/--osl-dist, or --trace")
    rate = args.rate if args.rate is not None else workload.trace_rate()
    if rate is None:
        raise WorkloadError("give --rate: the trace has no arrival times to take a rate from")
    prices = PriceBook.load(overrides=dict(parse_price(p) for p in args.price))
    for device in prices.prices:
        catalog.device(device)
    devices = [d for d in args.devices.split(",") if d] if args.devices else None
    return PlanRequest(
        model=args.model,
        workload=workload,
        rate=rate,
        slos=Slos(tuple(parse_slo(s) for s in args.slo), args.attainment),
        devices=devices,
        decode_only=[d for d in args.decode_devices.split(",") if d],
        modes=[m for m in args.modes.split(",") if m],
        dtype=args.dtype,
        objective=args.objective,
        max_devices=args.max_devices,
        prices=prices,
        top=args.top,
        requests=args.requests,
        seed=args.seed,
        jobs=args.jobs,
        ray_address=args.ray,
        same_vendor_link=args.link,
        cross_vendor_link=args.cross_link,
        progress=not args.no_progress,
        robustness=not args.no_robustness,
        engine=engine,
    )


def run(args: argparse.Namespace) -> int:
    try:
        req = build(args)
        plan = search(req)
    except (PlanError, CatalogError, WorkloadError, ValueError) as exc:
        print(f"pdgate plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(as_json(plan)))
    else:
        print(table(plan))
    if args.csv:
        args.csv.write_text(as_csv(plan))
    if args.plot:
        plot(plan, args.plot)
    if args.write_config and plan.best is not None:
        write_config(plan, args.write_config)
    if plan.best is None:
        print(f"pdgate plan: {plan.infeasible}", file=sys.stderr)
        return 1
    return 0
