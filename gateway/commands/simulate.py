"""``pdgate simulate``: the command line over :mod:`gateway.sim.simulate` (see there for
examples) and :mod:`gateway.sim.run`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from backends.errors import CatalogError
from gateway.settings import SLO_TPOT_S, SLO_TTFT_S, ConfigError
from gateway.sim.run import simulate
from gateway.sim.simulate import build, report
from gateway.sim.workload import WorkloadError


def configure(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to simulate")
    what.add_argument("--config", type=Path, help="a gateway YAML (instead of --device)")
    what.add_argument("--device", help="device profile, e.g. h100-sxm, groq-lpu-v1")
    what.add_argument("--count", type=int, help="devices in all (default: one instance's worth)")
    what.add_argument("--tp", type=int, help="devices per instance (tensor parallel degree)")
    what.add_argument("--model", help="model profile (with --config: a served model name)")
    what.add_argument("--dtype", default="bf16", choices=["bf16", "fp8", "fp4"])
    knobs = parser.add_argument_group("engine knobs (--device)")
    knobs.add_argument(
        "--engine",
        help="engine profile (config/engines: vllm-0.14, sglang-0.5, trtllm-1.1, ...); "
        "the knobs below override its defaults",
    )
    knobs.add_argument("--max-num-seqs", type=int, help="default 256 (or the engine's)")
    knobs.add_argument("--max-num-batched-tokens", type=int, help="default 8192")
    knobs.add_argument("--gpu-memory-utilization", type=float, help="default 0.9")
    knobs.add_argument("--block-size", type=int, help="default 16")
    knobs.add_argument("--enable-prefix-caching", action="store_true", default=None)
    knobs.add_argument("--speculative-tokens", type=int, help="drafts per step (default 0)")
    knobs.add_argument("--acceptance-rate", type=float, help="default 0.7")
    knobs.add_argument("--draft-cost-fraction", type=float, help="default 0.1")
    work = parser.add_argument_group("workload")
    work.add_argument("--isl", help="input length: N, or a distribution as for --isl-dist")
    work.add_argument("--osl", help="output length: N, or a distribution")
    work.add_argument("--isl-dist", help="uniform:LO,HI | normal:MEAN,STD | lognormal:MEAN,STD")
    work.add_argument("--osl-dist", help="as --isl-dist")
    work.add_argument("--trace", type=Path, help="Mooncake-format JSONL trace")
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=int, help="closed loop: clients sending back to back")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument("--requests", type=int, help="requests in all (default 200, or the trace)")
    load.add_argument("--duration", type=float, help="simulated seconds of arrivals")
    out = parser.add_argument_group("measurement")
    out.add_argument("--seed", type=int, default=0)
    out.add_argument("--slo-ttft", type=float, help=f"goodput TTFT, s (default {SLO_TTFT_S:g})")
    out.add_argument("--slo-tpot", type=float, help=f"goodput TPOT, s (default {SLO_TPOT_S:g})")
    out.add_argument("--timeout", type=float, help="per-request deadline, s (default: none)")
    out.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    try:
        spec, title = build(args)
        result = simulate(spec)
    except (ConfigError, CatalogError, WorkloadError, ValueError) as exc:
        print(f"pdgate simulate: {exc}", file=sys.stderr)
        return 2
    metrics = result.metrics()
    if args.json:
        print(json.dumps(metrics))
    else:
        print(report(title, result, metrics))
    return 0
