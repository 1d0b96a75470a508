"""Plan search speed: docs/plan.md's search (Llama 3.1 70B chat at 20 requests/s over H100,
H200, B200 and MI300X, LPU decode allowed), in wall seconds.

Usage::

    python loadtests/bench_plan.py [--jobs N] [--requests N]

Prints one JSON line: candidates screened, candidates simulated, simulation runs and wall
seconds (screen, and the whole search with replay and robustness). A measurement, not an
assertion; the target is at least 500 candidates in under three minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from backends.emulator.catalog import Catalog
from gateway.sim.plan.evaluate import PlanWorkload, Slos, parse_slo
from gateway.sim.plan.prices import PriceBook
from gateway.sim.plan.request import PlanRequest
from gateway.sim.plan.screen import screen
from gateway.sim.plan.search import search
from gateway.sim.workload import parse_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--requests", type=int, help="per simulation (default: the plan's)")
    args = parser.parse_args()
    catalog = Catalog.load()
    req = PlanRequest(
        model="llama-3.1-70b",
        workload=PlanWorkload(
            parse_length("lognormal:1000,600"), parse_length("lognormal:250,150")
        ),
        rate=20.0,
        slos=Slos((parse_slo("ttft:p90=1.0"), parse_slo("tpot:p90=0.05")), 0.9),
        devices=["h100-sxm", "h200-sxm", "b200", "mi300x"],
        decode_only=["groq-lpu-v1"],
        prices=PriceBook.load(),
        requests=args.requests,
        jobs=args.jobs,
    )
    t0 = time.perf_counter()
    screened, _ = screen(req, catalog, PriceBook.load())
    screen_s = time.perf_counter() - t0
    plan = search(req, catalog)
    print(
        json.dumps(
            {
                "candidates_screened": len(screened),
                "candidates_simulated": len(plan.evaluated),
                "simulation_runs": sum(e.sims for e in plan.evaluated),
                "screen_wall_s": screen_s,
                "search_wall_s": plan.wall_s,
                "jobs": args.jobs,
                "chosen": plan.best.candidate.label if plan.best else None,
            }
        )
    )


if __name__ == "__main__":
    main()
