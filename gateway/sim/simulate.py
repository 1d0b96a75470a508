"""``pdgate simulate``: a deployment under a workload, in virtual time.

Either a device deployment::

    pdgate simulate --device h100-sxm --count 8 --tp 2 --model llama-2-70b --dtype fp8 \\
        --isl-dist lognormal:300,150 --osl 290 --rate 70 --duration 600 --json

(``count / tp`` aggregated instances behind a least-loaded balancer; for LPU and wafer-scale
devices ``--count`` may be omitted and is derived from memory), or a whole gateway config,
whose pools, modes and policies are simulated as they would serve::

    pdgate simulate --config disagg.yaml --isl 2000 --osl 200 --concurrency 64 --json

See :mod:`gateway.sim.run` for what the simulation runs and measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from backends.emulator.catalog import Catalog, EngineKnobs
from backends.errors import CatalogError
from gateway.settings import ConfigError, EmulatedWorker, Settings, load_settings
from gateway.sim.run import SimulationResult, SimulationSpec, Slo, device_settings, simulate
from gateway.sim.workload import (
    TRACE_BLOCK_TOKENS,
    Length,
    WorkloadError,
    load_trace,
    make_workload,
    parse_length,
)


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
    out.add_argument("--slo-ttft", type=float, help="goodput TTFT limit, s (default 2)")
    out.add_argument("--slo-tpot", type=float, help="goodput TPOT limit, s (default 0.2)")
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


def build(args: argparse.Namespace) -> tuple[SimulationSpec, str]:
    """The simulation the arguments describe, and a one-line title for the report."""
    catalog = Catalog.load()
    settings, model, title = _deployment(args, catalog)
    trace = load_trace(args.trace) if args.trace else None
    workload = make_workload(
        isl=_length(args.isl, args.isl_dist, "--isl"),
        osl=_length(args.osl, args.osl_dist, "--osl"),
        trace=trace,
        concurrency=args.concurrency,
        rate=args.rate,
        requests=args.requests,
        duration=args.duration,
        seed=args.seed,
    )
    served = settings.model(model)
    slo = served.slo if served is not None else None
    spec = SimulationSpec(
        settings,
        model,
        workload.requests,
        concurrency=workload.concurrency,
        stop_after_s=workload.stop_after_s,
        total=workload.total,
        slo=Slo(
            args.slo_ttft or (slo.ttft_s if args.config and slo else Slo.ttft_s),
            args.slo_tpot or (slo.tpot_s if args.config and slo else Slo.tpot_s),
        ),
        seed=args.seed,
        hash_block_tokens=TRACE_BLOCK_TOKENS,
        timeout_s=args.timeout,
        progress=not args.no_progress,
        catalog=catalog,
    )
    return spec, title


def _deployment(args: argparse.Namespace, catalog: Catalog) -> tuple[Settings, str, str]:
    if args.config is not None:
        if args.device is not None:
            raise ValueError("give --config or --device, not both")
        settings = load_settings(args.config, catalog=catalog)
        model = args.model or settings.models[0].name
        return settings, model, f"{args.config} ({model})"
    if args.device is None or args.model is None:
        raise ValueError("give --device and --model (or --config)")
    explicit = {
        name: getattr(args, name, None)
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "gpu_memory_utilization",
            "block_size",
            "enable_prefix_caching",
            "speculative_tokens",
            "acceptance_rate",
            "draft_cost_fraction",
        )
    }
    engine = catalog.engine_knobs(
        getattr(args, "engine", None),
        args.device,
        EngineKnobs(**{k: v for k, v in explicit.items() if v is not None}),
    )
    settings = device_settings(
        catalog,
        device=args.device,
        model=args.model,
        dtype=args.dtype,
        tp=args.tp,
        count=args.count,
        engine=engine,
    )
    worker = settings.models[0].pools["aggregated"].workers[0]
    assert isinstance(worker, EmulatedWorker)
    size = worker.count or 1
    title = (
        f"{size * worker.replicas} × {args.device} ({worker.replicas} instance"
        f"{'s' if worker.replicas > 1 else ''} of {size}, {args.dtype}), {args.model}"
    )
    return settings, args.model, title


def _length(value: str | None, dist: str | None, flag: str) -> Length | None:
    if value is not None and dist is not None:
        raise WorkloadError(f"give {flag} or {flag}-dist, not both")
    spec = value if value is not None else dist
    return parse_length(spec) if spec is not None else None


def report(title: str, result: SimulationResult, m: dict[str, Any]) -> str:
    """The human-readable summary (``--json`` prints ``m`` itself)."""
    lines = [
        f"{title}: {m['requests']} requests ({m['failed']} failed) in "
        f"{m['simulated_s']:.1f} simulated s ({result.wall_s:.1f} s wall)",
        f"{'':10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for key, label in (("ttft_s", "TTFT s"), ("itl_s", "ITL s"), ("tpot_s", "TPOT s")):
        lines.append(
            f"{label:10}" + "".join(_cell(m[key][q]) for q in ("mean", "p50", "p90", "p99"))
        )
    lines.append(
        f"{'E2E s':10}" + "".join(_cell(m["e2e_s"][q]) for q in ("mean", "p50", "p90", "p99"))
    )
    slo = m["slo"]
    lines.append(
        f"throughput {m['output_tokens_per_s']:,.0f} output tok/s, "
        f"{m['requests_per_s']:.2f} req/s, goodput {m['goodput_requests_per_s']:.2f} req/s "
        f"(TTFT ≤ {slo['ttft_s']:g} s, TPOT ≤ {slo['tpot_s']:g} s)"
    )
    lines.append(f"KV peak {m['kv_usage_peak']:.0%}, preemptions {m['preemptions']}")
    usd, joules = m["usd_per_million_output_tokens"], m["joules_per_output_token"]
    lines.append(
        f"cost {'$' + format(usd, '.3f') if usd is not None else 'n/a (no price)'} per million "
        f"output tokens, {format(joules, '.2f') + ' J' if joules is not None else 'n/a'} "
        "per output token (devices at TDP)"
    )
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{value:>10.4f}" if value is not None else f"{'-':>10}"
