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
from typing import Any

from backends.emulator.catalog import Catalog, EngineKnobs
from gateway.settings import EmulatedWorker, Settings, load_settings
from gateway.sim.run import SimulationResult, SimulationSpec, Slo, device_settings
from gateway.sim.workload import (
    TRACE_BLOCK_TOKENS,
    Length,
    WorkloadError,
    load_trace,
    make_workload,
    parse_length,
)


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
        f"{'s' if worker.replicas > 1 else ''} of {size}{spanning(catalog, args.device, size)}, "
        f"{args.dtype}), {args.model}"
    )
    return settings, args.model, title


def spanning(catalog: Catalog, device: str, size: int) -> str:
    """How an instance of ``size`` devices crosses the device's scale-up domains (NVLink
    nodes, NVL72 racks), as the title says it; empty when one domain holds it. Collectives
    beyond a domain run over the scale-out network, which the physics prices."""
    domain = getattr(catalog.device(device), "scale_up_domain", 0)
    if not domain or size <= domain:
        return ""
    return f" spanning {-(-size // domain)} scale-up domains of {domain}"


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
