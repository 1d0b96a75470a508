"""Simulation speed: ten simulated minutes of an MLPerf-Server-like load, in wall seconds.

The scenario: 8 × H100 SXM as four TP2 instances serving Llama 2 70B in FP8 behind a
least-loaded balancer, Poisson arrivals at 70 requests/s for 600 simulated seconds, prompts
lognormal around 300 tokens and outputs around 290 (the MLPerf llama2-70b workload shape used
in config/calibration.yaml) — about 42,000 requests and 12 million output tokens. The same run
as::

    pdgate simulate --device h100-sxm --count 8 --tp 2 --model llama-2-70b --dtype fp8 \\
        --isl-dist lognormal:300,200 --osl-dist lognormal:290,250 --rate 70 --duration 600 \\
        --max-num-seqs 2048 --json

Usage::

    python loadtests/bench_simulate.py [--duration 600] [--rate 70]

Prints one JSON line: wall seconds, simulated seconds, requests, output tokens, and the
simulation's own figures. A measurement, not an assertion.
"""

from __future__ import annotations

import argparse
import json
import time

from backends.emulator.catalog import Catalog, EngineKnobs
from gateway.sim.run import SimulationSpec, device_settings, simulate
from gateway.sim.workload import make_workload, parse_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=70.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    catalog = Catalog.load()
    settings = device_settings(
        catalog,
        device="h100-sxm",
        model="llama-2-70b",
        dtype="fp8",
        tp=2,
        count=8,
        engine=EngineKnobs(max_num_seqs=2048, max_num_batched_tokens=8192),
    )
    workload = make_workload(
        isl=parse_length("lognormal:300,200"),
        osl=parse_length("lognormal:290,250"),
        rate=args.rate,
        duration=args.duration,
        seed=args.seed,
    )
    spec = SimulationSpec(
        settings, "llama-2-70b", workload.requests, total=workload.total, catalog=catalog
    )
    started = time.perf_counter()
    result = simulate(spec)
    wall = time.perf_counter() - started
    m = result.metrics()
    print(
        json.dumps(
            {
                "wall_s": wall,
                "simulated_s": m["simulated_s"],
                "speedup": m["simulated_s"] / wall,
                "requests": m["requests"],
                "output_tokens": m["output_tokens"],
                "output_tokens_per_wall_s": m["output_tokens"] / wall,
                "engine_steps": sum(e.stats.steps for e in result.engines),
                "ttft_mean_s": m["ttft_s"]["mean"],
                "tpot_mean_s": m["tpot_s"]["mean"],
                "output_tokens_per_s": m["output_tokens_per_s"],
            }
        )
    )


if __name__ == "__main__":
    main()
