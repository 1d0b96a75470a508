"""Which P/D mode serves a workload best? Goodput of aggregated, disaggregated and conditional
on the same four H100s, in virtual time (``pdgate simulate --config``).

The configs are ``loadtests/configs/pd-modes/``: four aggregated instances, or two prefill +
two decode. Workloads:

* ``chat`` — short prompts (uniform 50–400 tokens), answers of 50–300 tokens, Poisson arrivals
  at each ``--rates`` value for ``--duration`` simulated seconds;
* ``mooncake`` — the first ``--requests`` of a Mooncake-format trace at its own timestamps
  (``--trace``: Kimi's ``conversation_trace.jsonl`` from ``kvcache-ai/Mooncake``,
  ``FAST25-release/traces/``; long, multi-turn prompts that share prefixes).

Goodput counts requests that met both SLOs (TTFT 2 s, TPOT 0.1 s: the configs' ``slo``).

    python -m loadtests.bench_modes --trace conversation_trace.jsonl
    python -m loadtests.bench_modes --rates 80,160 --duration 30      # chat only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).parent / "configs" / "pd-modes"
MODES = ("aggregated", "disaggregated", "conditional")


def simulate(mode: str, workload: list[str]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "gateway.cli",
        "simulate",
        "--config",
        str(CONFIGS / f"{mode}.yaml"),
    ]
    out = subprocess.run(
        [*cmd, *workload, "--json", "--no-progress"], capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def row(name: str, results: dict[str, dict[str, Any]]) -> str:
    good = {m: r["goodput_requests_per_s"] for m, r in results.items()}
    best_other = max(good["aggregated"], good["disaggregated"])
    ratio = good["conditional"] / best_other if best_other else float("nan")
    cells = " | ".join(f"{good[m]:.2f}" for m in MODES)
    return f"| {name} | {cells} | {ratio:.2f} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rates", default="80,160,240,320", help="chat arrival rates, requests/s")
    p.add_argument("--duration", type=float, default=60.0, help="simulated seconds per chat run")
    p.add_argument("--trace", type=Path, help="Mooncake-format trace (JSONL)")
    p.add_argument("--requests", type=int, default=3000, help="requests taken from the trace")
    p.add_argument("--jobs", type=int, default=2, help="simulations run at once")
    args = p.parse_args(argv)

    workloads: list[tuple[str, list[str]]] = []
    for rate in (r for r in args.rates.split(",") if r):
        chat = ["--isl", "uniform:50,400", "--osl", "uniform:50,300"]
        workloads.append(
            (
                f"chat, {rate} req/s",
                [*chat, "--rate", rate, "--duration", str(args.duration), "--seed", "1"],
            )
        )
    if args.trace is not None:
        trace = ["--trace", str(args.trace), "--requests", str(args.requests)]
        workloads.append((f"Mooncake conversation, {args.requests} requests", trace))

    jobs = [(name, mode, wl) for name, wl in workloads for mode in MODES]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda j: simulate(j[1], j[2]), jobs))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for (name, mode, _), result in zip(jobs, done, strict=True):
        results.setdefault(name, {})[mode] = result

    print("| workload | aggregated | disaggregated | conditional | conditional / best other |")
    print("|---|---:|---:|---:|---:|")
    for name, _ in workloads:
        print(row(name, results[name]))
    print("\ngoodput, requests/s meeting TTFT <= 2 s and TPOT <= 0.1 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
