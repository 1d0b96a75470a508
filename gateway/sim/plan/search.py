"""The search: screen every candidate analytically, simulate the most promising, keep the
cheapest that meets the SLOs.

1. **Screen.** For every instance layout the catalog allows (:class:`~gateway.sim.plan.space.Space`)
   :mod:`~gateway.sim.plan.sizing` predicts what one instance sustains as an aggregated instance,
   a prefill instance, a decode instance and a conditional decode instance. Every mode × pool
   pairing (prefill on one device, decode on another: heterogeneous pools, the KV link between
   them) is then sized for the target rate by rate matching and scored by the objective.
2. **Simulate.** The best ``top`` candidates (and the best of each mode, so the comparison is
   honest) are simulated in virtual time at the target rate. One that misses gets an instance
   more in the pool its binding target points at (TTFT: prefill; TPOT: decode), a few times
   at most; one that meets is bisected for its highest rate under the SLOs (Vidur-Search), so
   its headroom is measured, not guessed. Candidates run in parallel over a process pool
   (``jobs``) or a Ray cluster.
3. **Check.** The chosen plan is replayed with another seed (another window of a trace) and
   run at the rate ±25 % and with one instance lost.

Example::

    plan = search(PlanRequest(model="llama-3.1-8b", workload=PlanWorkload(Length("fixed", 512),
                  Length("fixed", 128)), rate=20.0, slos=Slos((parse_slo("ttft:p90=1"),))))
    plan.best.candidate.label
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from backends.emulator.catalog import Catalog
from backends.errors import CatalogError
from gateway.sim.plan.evaluate import Outcome, PlanWorkload, Slos, run_candidate
from gateway.sim.plan.prices import PriceBook
from gateway.sim.plan.sizing import (
    Capacity,
    Demand,
    Targets,
    colocated,
    kv_handoff_s,
    prefill_only,
    prefill_time,
    size_pools,
)
from gateway.sim.plan.space import (
    CHUNK_BUDGETS,
    MAX_NUM_SEQS,
    MODES,
    TP_DEGREES,
    Candidate,
    Instance,
    Pool,
    Space,
    link_between,
)

OBJECTIVES = ("cost", "energy", "devices")
LOCAL_MAX_PROMPT = 512  # ConditionalConfig.local_max_prompt_tokens default
BUMPS = 4  # instances added to a missing candidate before it is given up
BISECT_STEPS = 4
TRIMS = 2  # instances taken from a candidate that met as sized, while it still meets


class PlanError(Exception):
    """The plan cannot be made (bad input, nothing to search, Ray missing)."""


@dataclass
class PlanRequest:
    model: str
    workload: PlanWorkload
    rate: float
    slos: Slos
    devices: Sequence[str] | None = None  # None: every device with a price (all for energy)
    decode_only: Sequence[str] = ()  # devices allowed only in decode pools (e.g. an LPU)
    modes: Sequence[str] = MODES
    dtype: str = "fp8"
    objective: str = "cost"
    max_devices: int = 64
    prices: PriceBook | None = None
    top: int = 8
    requests: int | None = None  # per simulation; None: a minute of arrivals (300 to 3,000)
    seed: int = 0
    jobs: int = 1
    ray_address: str | None = None
    same_vendor_link: str = "ib_ndr"
    cross_vendor_link: str = "roce_200g"
    progress: bool = False
    robustness: bool = True
    catalog_dir: str | None = None
    tp_degrees: Sequence[int] = TP_DEGREES
    max_num_seqs: Sequence[int] = MAX_NUM_SEQS
    chunk_budgets: Sequence[int] = CHUNK_BUDGETS


@dataclass
class Screened:
    """A candidate as the screen sees it: counts for the target rate and predictions."""

    candidate: Candidate
    est_rate: float  # highest total rate the screen predicts for these counts
    ttft_s: float
    tpot_s: float
    binding: str
    usd_per_hour: float | None
    watts: float | None


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


# -- screen ------------------------------------------------------------------------------------


def demand_of(workload: PlanWorkload, slos: Slos) -> Demand:
    sample = workload.sample()
    isl = sorted(r.prompt_tokens for r in sample)
    pct = slos.pct("ttft")
    tail = isl[max(0, math.ceil(pct * len(isl)) - 1)]
    local = sum(1 for x in isl if x <= LOCAL_MAX_PROMPT) / len(isl)
    return Demand(
        isl=sum(isl) / len(isl),
        osl=sum(r.output_tokens for r in sample) / len(sample),
        isl_tail=float(tail),
        local_share=local,
    )


@dataclass
class _Caps:
    instance: Instance
    aggregated: Capacity
    prefill: Capacity
    decode: Capacity
    cond_prefill: Capacity
    cond_decode: Capacity
    first_token_s: float


def _capacities(space: Space, demand: Demand, targets: Targets) -> list[_Caps]:
    out = []
    for inst in space.instances():
        dep = space.deployment(inst)
        local = demand.local_share
        out.append(
            _Caps(
                inst,
                aggregated=colocated(dep, demand, targets, 1.0),
                prefill=prefill_only(dep, demand, targets),
                decode=colocated(dep, demand, targets, 0.0),
                cond_prefill=prefill_only(dep, demand, targets, max(1e-9, 1.0 - local)),
                cond_decode=colocated(dep, demand, targets, local),
                first_token_s=prefill_time(dep, demand.isl_tail),
            )
        )
    return out


def screen(req: PlanRequest, catalog: Catalog, prices: PriceBook) -> tuple[list[Screened], Space]:
    """Every candidate the space holds, sized for ``req.rate`` (infeasible ones included with
    a zero ``est_rate``), in no particular order."""
    demand = demand_of(req.workload, req.slos)
    targets = Targets(
        ttft_s=req.slos.limit("ttft", math.inf),
        tpot_s=req.slos.limit("tpot", math.inf),
        ttft_pct=req.slos.pct("ttft"),
        tpot_pct=req.slos.pct("tpot"),
    )
    devices = list(req.devices) if req.devices else default_devices(catalog, prices, req.objective)
    devices += [d for d in req.decode_only if d not in devices]
    space = Space(
        catalog,
        req.model,
        devices,
        dtype=req.dtype,
        isl=demand.isl,
        osl=demand.osl,
        tp_degrees=req.tp_degrees,
        max_num_seqs=req.max_num_seqs,
        chunk_budgets=req.chunk_budgets,
    )
    caps = _capacities(space, demand, targets)
    both = [c for c in caps if c.instance.device not in req.decode_only]
    out: list[Screened] = []
    for c in both if "aggregated" in req.modes else []:
        out.append(_aggregated(c, req, catalog, prices))
    for mode in ("disaggregated", "conditional"):
        if mode not in req.modes:
            continue
        for p in both:
            for d in caps:
                out.append(_split(mode, p, d, req, catalog, prices, space, demand))
    return out, space


def default_devices(catalog: Catalog, prices: PriceBook, objective: str) -> list[str]:
    """Every catalog device with a price; every device for the energy and device objectives."""
    if objective != "cost":
        return sorted(catalog.devices)
    return [d for d in sorted(catalog.devices) if prices.usd_per_hour(d) is not None]


def _economics(
    c: Candidate, catalog: Catalog, prices: PriceBook
) -> tuple[float | None, float | None]:
    usd = 0.0
    watts = 0.0
    usd_known = watts_known = True
    for p in c.pools:
        price = prices.usd_per_hour(p.instance.device)
        tdp = catalog.device(p.instance.device).tdp_w
        if price is None:
            usd_known = False
        else:
            usd += price * p.devices
        if tdp is None:
            watts_known = False
        else:
            watts += tdp * p.devices
    return (usd if usd_known else None), (watts if watts_known else None)


def _aggregated(c: _Caps, req: PlanRequest, catalog: Catalog, prices: PriceBook) -> Screened:
    cap = c.aggregated
    n = max(1, math.ceil(req.rate / cap.rate - 1e-9)) if cap.rate > 0 else 1
    cand = Candidate("aggregated", (Pool("aggregated", c.instance, n),))
    usd, watts = _economics(cand, catalog, prices)
    return Screened(cand, cap.rate * n, cap.ttft_s, cap.tpot_s, cap.binding, usd, watts)


def _split(
    mode: str,
    p: _Caps,
    d: _Caps,
    req: PlanRequest,
    catalog: Catalog,
    prices: PriceBook,
    space: Space,
    demand: Demand,
) -> Screened:
    pre, dec = (p.prefill, d.decode) if mode == "disaggregated" else (p.cond_prefill, d.cond_decode)
    link = link_between(
        catalog, p.instance.device, d.instance.device, req.same_vendor_link, req.cross_vendor_link
    )
    if pre.rate > 0 and dec.rate > 0:
        n_p, n_d = size_pools(req.rate, pre.rate, dec.rate)
        est = min(n_p * pre.rate, n_d * dec.rate)
        binding = "ttft" if n_p * pre.rate < n_d * dec.rate else "tpot"
    else:
        n_p = n_d = 1
        est = 0.0
        binding = pre.binding if pre.rate <= 0 else dec.binding
    cand = Candidate(
        mode, (Pool("prefill", p.instance, n_p), Pool("decode", d.instance, n_d)), link
    )
    handoff = kv_handoff_s(space.deployment(p.instance), catalog.link(link), demand.isl)
    tpot = dec.tpot_s + handoff / max(1.0, demand.osl - 1)
    usd, watts = _economics(cand, catalog, prices)
    return Screened(cand, est, p.first_token_s, tpot, binding, usd, watts)


def score(s: Screened | Evaluated, objective: str, rate: float, osl: float) -> float:
    """Lower is better: $/hour, watts (∝ joules per token at the target rate) or devices."""
    if objective == "cost":
        return s.usd_per_hour if s.usd_per_hour is not None else math.inf
    if objective == "energy":
        return s.watts if s.watts is not None else math.inf
    return float(s.candidate.devices)


def shortlist(screened: Sequence[Screened], req: PlanRequest, osl: float) -> list[Screened]:
    """The ``top`` best feasible candidates by objective, plus the best of each mode."""
    ok = [
        s
        for s in screened
        if s.est_rate >= req.rate * (1 - 1e-9)
        and s.candidate.devices <= req.max_devices
        and math.isfinite(score(s, req.objective, req.rate, osl))
    ]
    ok.sort(key=lambda s: (score(s, req.objective, req.rate, osl), -s.est_rate))
    picked: dict[tuple[object, ...], Screened] = {}
    for s in ok:
        if len(picked) >= req.top:
            break
        picked.setdefault(_shape(s.candidate), s)
    for mode in req.modes:
        best = next((s for s in ok if s.candidate.mode == mode), None)
        if best is not None:
            picked.setdefault(_shape(best.candidate), best)
    mixed = next((s for s in ok if s.candidate.heterogeneous), None)
    if mixed is not None:
        picked.setdefault(_shape(mixed.candidate), mixed)
    for device in req.decode_only:  # asked for by name: show its best plan
        best = next((s for s in ok if s.candidate.pools[-1].instance.device == device), None)
        if best is not None:
            picked.setdefault(_shape(best.candidate), best)
    return list(picked.values())


def _shape(c: Candidate) -> tuple[object, ...]:
    """Candidates differing only in engine knobs share a shape; the best of them stands for it."""
    return (c.mode, *((p.role, p.instance.device, p.instance.count, p.replicas) for p in c.pools))


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
    for _ in range(2):  # find a rate it misses
        sims += 1
        if run(cand, probe).meets:
            lo, probe = probe, probe * 1.5
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
    return Evaluated(cand, task.screened, out, lo, sims)


T = TypeVar("T")
R = TypeVar("R")


def parallel_map(
    fn: Callable[[T], R], items: Sequence[T], jobs: int, ray_address: str | None, progress: bool
) -> list[R]:
    """``[fn(x) for x in items]``, in order, over a process pool or a Ray cluster, with a
    progress bar on a terminal."""
    bar = _bar(len(items), progress)
    try:
        if ray_address is not None:
            return _ray_map(fn, items, ray_address, bar)
        if jobs <= 1 or len(items) <= 1:
            out = []
            for x in items:
                out.append(fn(x))
                bar.update()
            return out
        results: dict[int, R] = {}
        with ProcessPoolExecutor(max_workers=min(jobs, len(items))) as pool:
            futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
            for f in as_completed(futures):
                results[futures[f]] = f.result()
                bar.update()
        return [results[i] for i in range(len(items))]
    finally:
        bar.close()


def _ray_map(fn: Callable[[T], R], items: Sequence[T], address: str, bar: Any) -> list[R]:
    try:
        import ray  # type: ignore[import-not-found]  # optional: pip install ray
    except ImportError:
        raise PlanError(
            "--ray needs the Ray package here and on the cluster: pip install 'pdgate[ray]'"
        ) from None
    ray.init(address=address, ignore_reinit_error=True)
    remote = ray.remote(fn)
    refs = [remote.remote(x) for x in items]
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        bar.update(len(done))
    return list(ray.get(refs))


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None


def _bar(total: int, enabled: bool) -> Any:
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit="plan", file=sys.stderr, leave=False)
    return _NoBar()


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
        e.usd_per_hour, e.watts = _economics(e.candidate, catalog, prices)
    meeting = [e for e in evaluated if e.meets and e.candidate.devices <= req.max_devices]
    meeting.sort(key=lambda e: (score(e, req.objective, req.rate, osl), -e.max_rate))
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
                f"plan needs as many {unit} and sustains less)"
            )
        return (
            f"aggregated: disaggregation does not pay here (the best {split.candidate.mode} "
            f"plan needs {more - 1:.0%} more {unit})"
        )
    if agg is None:
        return f"{best.candidate.mode}: no aggregated plan met the SLOs"
    saved = 1 - score(best, req.objective, req.rate, osl) / score(agg, req.objective, req.rate, osl)
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
