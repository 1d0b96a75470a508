"""``pdgate report``: the command line over :mod:`gateway.sim.report` (inputs, outputs and
examples are described there)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.settings import SLO_TPOT_S, SLO_TTFT_S
from gateway.sim.report import ReportError, default_out, load, write


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results",
        nargs="+",
        type=Path,
        help="a locust --csv PREFIX (or its _requests.csv), or pdgate simulate --json files",
    )
    parser.add_argument("--out", type=Path, help="output directory (default: beside the input)")
    parser.add_argument(
        "--slo-ttft", type=float, help=f"goodput TTFT target, s (default {SLO_TTFT_S:g})"
    )
    parser.add_argument(
        "--slo-tpot", type=float, help=f"goodput TPOT target, s (default {SLO_TPOT_S:g})"
    )
    parser.add_argument("--title", help="title of the plots and the summary")


def run(args: argparse.Namespace) -> int:
    try:
        report = load(args.results, slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot)
    except ReportError as exc:
        print(f"pdgate report: {exc}", file=sys.stderr)
        return 2
    if args.title:
        report.title = args.title
    out = args.out or default_out(args.results[0])
    try:
        files = write(report, out)
    except ImportError:
        print(
            "pdgate report: plotting needs matplotlib: pip install 'pdgate[report]'",
            file=sys.stderr,
        )
        return 2
    for f in files:
        print(f)
    return 0
