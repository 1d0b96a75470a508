"""The analytic screen: every candidate the space holds, sized for the target rate by the
engines' physics (:mod:`.sizing`) and DistServe's rate matching, and scored by the objective;
then the shortlist that is worth simulating."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from backends.emulator.catalog import Catalog
from gateway.sim.plan.evaluate import PlanWorkload, Slos
from gateway.sim.plan.prices import PriceBook
from gateway.sim.plan.request import PlanRequest
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
from gateway.sim.plan.space import Candidate, Instance, Pool, Space, link_between

LOCAL_MAX_PROMPT = 512  # ConditionalConfig.local_max_prompt_tokens default


class Scored(Protocol):
    """A screened or a simulated candidate, as :func:`score` ranks it."""

    @property
    def candidate(self) -> Candidate: ...

    @property
    def usd_per_hour(self) -> float | None: ...

    @property
    def watts(self) -> float | None: ...


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
        engine=req.engine,
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


def economics(
    c: Candidate, catalog: Catalog, prices: PriceBook
) -> tuple[float | None, float | None]:
    usd = 0.0
    watts = 0.0
    usd_known = watts_known = True
    for p in c.pools:
        price = prices.usd_per_hour(p.instance.device, p.instance.count)
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
    usd, watts = economics(cand, catalog, prices)
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
    usd, watts = economics(cand, catalog, prices)
    return Screened(cand, est, p.first_token_s, tpot, binding, usd, watts)


def score(s: Scored, objective: str, rate: float, osl: float) -> float:
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
