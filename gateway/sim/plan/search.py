"""The search: screen every candidate analytically, simulate the most promising, keep the
cheapest that meets the SLOs.

1. **Screen** (:mod:`.screen`). For every instance layout the catalog allows, the sizing
   predicts what one instance sustains as an aggregated instance, a prefill instance, a decode
   instance and a conditional decode instance. Every mode × pool pairing (prefill on one
   device, decode on another: heterogeneous pools, the KV link between them) is then sized for
   the target rate by rate matching and scored by the objective.
2. **Simulate.** The best ``top`` candidates (and the best of each mode, so the comparison is
   honest) are simulated in virtual time at the target rate. One that misses gets an instance
   more in the pool its binding target points at (TTFT: prefill; TPOT: decode), a few times
   at most; one that meets as sized is trimmed while it still meets; then it is bisected for
   its highest rate under the SLOs (Vidur-Search), so its headroom is measured, not guessed.
   Candidates run in parallel over a process pool (``jobs``) or a Ray cluster.
3. **Check.** The chosen plan is replayed with another seed (another window of a trace);
   every plan that met is run at the rate ±25 % and with one instance lost.

Example::

    workload = PlanWorkload(parse_length("512"), parse_length("128"))
    slos = Slos((parse_slo("ttft:p90=1"),))
    plan = search(PlanRequest("llama-3.1-8b", workload, 20.0, slos, devices=["h100-sxm"]))
    plan.best.candidate.label   # 'aggregated A: 1 × (h100-sxm tp1 fp8 seqs 256 chunk 8192)'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from backends.emulator.catalog import Catalog
from backends.errors import CatalogError
from gateway.sim.plan.evaluate import Outcome, PlanWorkload, Slos, run_candidate
from gateway.sim.plan.parallel import parallel_map
from gateway.sim.plan.prices import PriceBook
from gateway.sim.plan.request import OBJECTIVES, PlanError, PlanRequest
from gateway.sim.plan.screen import Screened, demand_of, economics, score, screen, shortlist
from gateway.sim.plan.space import MODES, Candidate

BUMPS = 4  # instances added to a missing candidate before it is given up
BISECT_STEPS = 4
PROBES = 3  # rates tried above the target (1.5×, 3×, 6×) before the headroom is "at least"
TRIMS = 2  # instances taken from a candidate that met as sized, while it still meets


@dataclass
class Evaluated:
    """A simulated candidate: final counts, the run at the target rate, its highest rate."""

    candidate: Candidate
    screened: Screened
    outcome: Outcome
    max_rate: float
    sims: int
    usd_per_hour: float | None = None
    watts: float | None = None
    robustness: dict[str, Outcome] = field(default_factory=dict)  # rate ±25 %, one lost
    capped: bool = False  # met at every rate probed: max_rate is a lower bound

    @property
    def meets(self) -> bool:
        return self.outcome.meets


@dataclass
class Plan:
    request: PlanRequest
    screened: list[Screened]
    evaluated: list[Evaluated]
    best: Evaluated | None
    verdict: str
    infeasible: str | None = None
    replay: Outcome | None = None
    robustness: dict[str, Outcome] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    check_runs: int = 0  # replay and robustness simulations


# -- simulation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    screened: Screened
    model: str
    workload: PlanWorkload
    slos: Slos
    rate: float
    requests: int
    seed: int
    max_devices: int
    catalog_dir: str | None


def _bump(c: Candidate, binding: str) -> Candidate:
    """One instance more where the binding target points."""
    if c.mode == "aggregated":
        role = "aggregated"
    elif binding.startswith("ttft"):
        role = "prefill"
    else:
        role = "decode"
    return c.with_replicas(role, c.pool(role).replicas + 1)


def _trim(c: Candidate) -> Candidate | None:
    """One instance fewer in the largest pool that has more than one (None: none has)."""
    pools = [p for p in c.pools if p.replicas > 1]
    if not pools:
        return None
    pool = max(pools, key=lambda p: p.devices)
    return c.with_replicas(pool.role, pool.replicas - 1)


def evaluate(task: _Task) -> Evaluated:
    """Simulate one candidate: grow it until it meets the SLOs at the target rate (or the
    device cap), then bisect its highest rate under the SLOs."""

    def run(c: Candidate, rate: float) -> Outcome:
        return run_candidate(
            c,
            task.model,
            task.workload,
            task.slos,
            rate,
            requests=task.requests,
            seed=task.seed,
            catalog_dir=task.catalog_dir,
        )

    cand = task.screened.candidate
    out = run(cand, task.rate)
    sims = 1
    for _ in range(BUMPS):
        if out.meets:
            break
        bigger = _bump(cand, out.binding)
        if bigger.devices > task.max_devices:
            break
        cand, out = bigger, run(bigger, task.rate)
        sims += 1
    if not out.meets:
        return Evaluated(cand, task.screened, out, 0.0, sims)
    if sims == 1:  # met as the screen sized it: the screen may have sized it generously
        for _ in range(TRIMS):
            smaller = _trim(cand)
            if smaller is None:
                break
            sims += 1
            trial = run(smaller, task.rate)
            if not trial.meets:
                break
            cand, out = smaller, trial
    lo, hi = task.rate, None
    probe = task.rate * 1.5
    for _ in range(PROBES):  # find a rate it misses, doubling after the first step
        sims += 1
        if run(cand, probe).meets:
            lo, probe = probe, probe * 2
        else:
            hi = probe
            break
    if hi is not None:
        for _ in range(BISECT_STEPS - 1):
            mid = (lo + hi) / 2
            sims += 1
            if run(cand, mid).meets:
                lo = mid
            else:
                hi = mid
    return Evaluated(cand, task.screened, out, lo, sims, capped=hi is None)


# -- the whole search --------------------------------------------------------------------------


def search(req: PlanRequest, catalog: Catalog | None = None) -> Plan:
    import time

    wall = time.perf_counter()
    catalog = catalog or Catalog.load()
    prices = req.prices or PriceBook.load()
    _check(req, catalog)
    screened, space = screen(req, catalog, prices)
    if not space.instances():
        raise PlanError(
            f"no device can serve {req.model}: "
            + "; ".join(f"{d}: {why}" for d, why in space.skipped.items())
            if space.skipped
            else f"no devices to plan over for {req.model}"
        )
    osl = demand_of(req.workload, req.slos).osl
    req = replace(req, requests=req.requests or requests_for(req.rate))
    if req.objective == "cost" and all(s.usd_per_hour is None for s in screened):
        unpriced = sorted({p.instance.device for s in screened for p in s.candidate.pools})
        raise PlanError(
            f"no device in the search has a price ({', '.join(unpriced)}): give "
            "--price DEVICE=USD_PER_HOUR, or --objective energy or devices"
        )
    short = shortlist(screened, req, osl)
    tasks = [
        _Task(
            s,
            req.model,
            req.workload,
            req.slos,
            req.rate,
            req.requests or requests_for(req.rate),
            req.seed,
            req.max_devices,
            req.catalog_dir,
        )
        for s in short
    ]
    evaluated = parallel_map(evaluate, tasks, req.jobs, req.ray_address, req.progress)
    for e in evaluated:
        e.usd_per_hour, e.watts = economics(e.candidate, catalog, prices)
    meeting = [e for e in evaluated if e.meets and e.candidate.devices <= req.max_devices]
    # Ties on the objective go to the larger headroom, then to aggregated (one pool).
    meeting.sort(
        key=lambda e: (
            round(score(e, req.objective, req.rate, osl), 9),
            -e.max_rate,
            e.candidate.mode != "aggregated",
        )
    )
    rest = [e for e in evaluated if e not in meeting]
    ordered = meeting + rest
    best = meeting[0] if meeting else None
    plan = Plan(req, screened, ordered, best, _verdict(meeting, req, osl), skipped=space.skipped)
    if best is None:
        plan.infeasible = infeasible_message(req, screened, evaluated, catalog)
    else:
        _check_best(plan, req)
    plan.wall_s = time.perf_counter() - wall
    return plan


def requests_for(rate: float) -> int:
    """Requests per simulation: a minute of arrivals at the target rate, so a decode batch
    fills several times over (it fills in about ``osl · TPOT``, seconds), within 300-3,000."""
    return max(300, min(3000, round(rate * 60)))


def _check(req: PlanRequest, catalog: Catalog) -> None:
    try:
        catalog.model(req.model)
        for d in [*(req.devices or ()), *req.decode_only]:
            catalog.device(d)
    except CatalogError as exc:
        raise PlanError(str(exc)) from None
    bad = [m for m in req.modes if m not in MODES]
    if bad:
        raise PlanError(f"unknown mode(s) {bad}; known: {', '.join(MODES)}")
    if req.objective not in OBJECTIVES:
        raise PlanError(f"unknown objective '{req.objective}'; known: {', '.join(OBJECTIVES)}")
    if not req.rate > 0:
        raise PlanError("--rate must be positive")
    if not req.slos.targets:
        raise PlanError("give at least one --slo, e.g. --slo ttft:p90=1.0")


def _verdict(meeting: Sequence[Evaluated], req: PlanRequest, osl: float) -> str:
    if not meeting:
        return "no plan meets the SLOs"
    best = meeting[0]
    agg = next((e for e in meeting if e.candidate.mode == "aggregated"), None)
    split = next((e for e in meeting if e.candidate.mode != "aggregated"), None)
    unit = {"cost": "$/h", "energy": "W", "devices": "devices"}[req.objective]
    if best.candidate.mode == "aggregated":
        if split is None:
            return "aggregated: no disaggregated plan met the SLOs"
        more = score(split, req.objective, req.rate, osl) / score(
            best, req.objective, req.rate, osl
        )
        if more < 1.005:
            return (
                f"aggregated: disaggregation does not pay here (the best {split.candidate.mode} "
                f"plan needs as many {unit}; it sustains {split.max_rate:.3g} req/s against "
                f"{best.max_rate:.3g})"
            )
        return (
            f"aggregated: disaggregation does not pay here (the best {split.candidate.mode} "
            f"plan needs {more - 1:.0%} more {unit})"
        )
    if agg is None:
        return f"{best.candidate.mode}: no aggregated plan met the SLOs"
    saved = 1 - score(best, req.objective, req.rate, osl) / score(agg, req.objective, req.rate, osl)
    if saved < 0.005:
        return (
            f"{best.candidate.mode}: as many {unit} as the best aggregated plan, with more "
            f"headroom ({best.max_rate:.3g} req/s against {agg.max_rate:.3g})"
        )
    return f"{best.candidate.mode}: {saved:.0%} fewer {unit} than the best aggregated plan"


def infeasible_message(
    req: PlanRequest, screened: Sequence[Screened], evaluated: Sequence[Evaluated], catalog: Catalog
) -> str:
    """Why nothing meets the SLOs: the binding target and the best that is reachable."""
    limits = {t.metric: t for t in req.slos.targets}
    if evaluated:
        closest = min(
            evaluated,
            key=lambda e: max(e.outcome.values[t.name] / t.limit_s for t in req.slos.targets),
        )
        o = closest.outcome
        t = (
            next(t for t in req.slos.targets if t.name == o.binding)
            if o.binding in o.values
            else None
        )
        what = (
            f"{t.name} ≤ {t.limit_s:g} s: the closest plan reaches {o.values[t.name]:.3g} s"
            if t is not None
            else f"requests failed ({o.extra.get('errors')})"
        )
        return (
            f"no plan meets the SLOs at {req.rate:g} req/s within {req.max_devices} devices; "
            f"binding: {what} ({closest.candidate.label}, {closest.candidate.devices} devices, "
            f"attainment {o.attainment:.0%})"
        )
    feasible = [s for s in screened if s.est_rate > 0]
    if feasible:
        fewest = min(feasible, key=lambda s: s.candidate.devices * req.rate / s.est_rate)
        need = math.ceil(fewest.candidate.devices * req.rate / fewest.est_rate)
        return (
            f"no plan sustains {req.rate:g} req/s within {req.max_devices} devices (binding: "
            f"--max-devices); the fewest devices predicted is about {need} "
            f"({fewest.candidate.label}); best reachable within the cap: about "
            f"{fewest.est_rate * req.max_devices / max(1, fewest.candidate.devices):.3g} req/s"
        )
    bindings = [s.binding for s in screened]
    binding = max(set(bindings), key=bindings.count) if bindings else "ttft"
    if binding == "ttft" and "ttft" in limits:
        best = min(screened, key=lambda s: s.ttft_s)
        return (
            f"no plan can meet {limits['ttft'].name} ≤ {limits['ttft'].limit_s:g} s (binding: "
            f"TTFT): even unloaded, the fastest prefill of the workload's p"
            f"{limits['ttft'].pct * 100:g} prompt takes {best.ttft_s:.3g} s "
            f"({best.candidate.label}); best reachable TTFT ≈ {best.ttft_s:.3g} s"
        )
    if binding == "tpot" and "tpot" in limits:
        best = min(screened, key=lambda s: s.tpot_s)
        return (
            f"no plan can meet {limits['tpot'].name} ≤ {limits['tpot'].limit_s:g} s (binding: "
            f"TPOT): even at batch 1 the fastest decode step takes {best.tpot_s:.3g} s "
            f"({best.candidate.label}); best reachable TPOT ≈ {best.tpot_s:.3g} s"
        )
    return (
        f"no plan meets the SLOs (binding: {binding}: the model does not fit the devices' memory)"
    )


def _check_best(plan: Plan, req: PlanRequest) -> None:
    """Replay the chosen plan with another seed and window; every plan that met the SLOs at
    rate ±25 % and with one instance lost (its goodput in each)."""
    best = plan.best
    assert best is not None
    requests = req.requests or requests_for(req.rate)
    runs: list[tuple[Evaluated, str, Candidate, float, int, int]] = [
        (best, "replay", best.candidate, req.rate, req.seed + 1, 1)
    ]
    for e in plan.evaluated if req.robustness else []:
        if not e.meets:
            continue
        runs.append((e, "rate -25%", e.candidate, req.rate * 0.75, req.seed, 0))
        runs.append((e, "rate +25%", e.candidate, req.rate * 1.25, req.seed, 0))
        lost = _one_lost(e.candidate)
        if lost is not None:
            runs.append((e, "one instance lost", lost, req.rate, req.seed, 0))
    jobs = [
        _Run(c, req.model, req.workload, req.slos, rate, requests, seed, window, req.catalog_dir)
        for _, _, c, rate, seed, window in runs
    ]
    outs = parallel_map(_run, jobs, req.jobs, req.ray_address, req.progress)
    plan.check_runs = len(outs)
    plan.replay = outs[0]
    for (e, name, *_), o in zip(runs[1:], outs[1:], strict=True):
        e.robustness[name] = o
    for e in plan.evaluated if req.robustness else []:
        if e.meets and "one instance lost" not in e.robustness:
            e.robustness["one instance lost"] = replace(
                e.outcome, meets=False, goodput=0.0, attainment=0.0,
                binding="a pool of one instance: no spare",
            )  # fmt: skip
    plan.robustness = best.robustness


def _one_lost(c: Candidate) -> Candidate | None:
    """The candidate with one instance fewer in its largest pool (None: every pool has one)."""
    pool = max(c.pools, key=lambda p: p.replicas)
    if pool.replicas <= 1:
        return None
    return c.with_replicas(pool.role, pool.replicas - 1)


@dataclass(frozen=True)
class _Run:
    candidate: Candidate
    model: str
    workload: PlanWorkload
    slos: Slos
    rate: float
    requests: int
    seed: int
    window: int
    catalog_dir: str | None


def _run(r: _Run) -> Outcome:
    return run_candidate(
        r.candidate,
        r.model,
        r.workload,
        r.slos,
        r.rate,
        requests=r.requests,
        seed=r.seed,
        window=r.window,
        catalog_dir=r.catalog_dir,
    )
