"""One candidate simulated in virtual time and judged against the SLOs.

A candidate becomes the gateway config a user would write (:func:`candidate_settings`), runs
through :func:`gateway.sim.run.simulate` — the production dispatch, policies and engines — under
the workload at a given rate, and is judged as DistServe and Vidur judge a deployment: every
latency target at its percentile, and the share of requests that meet all targets at once
(attainment) at or above the floor. A failed request misses every target.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from backends.emulator.catalog import Catalog, EngineKnobs
from gateway.settings import EmulatedWorker, ModelConfig, PoolConfig, Settings, SloConfig
from gateway.sim.plan.space import Candidate, Pool
from gateway.sim.run import RequestRecord, SimulationSpec, Slo, simulate
from gateway.sim.workload import Length, RequestSpec, poisson_arrivals

METRICS = ("ttft", "tpot", "e2e")


@dataclass(frozen=True)
class SloTarget:
    """``metric`` (ttft, tpot or e2e) at percentile ``pct`` must be at most ``limit_s``."""

    metric: str
    pct: float
    limit_s: float

    @property
    def name(self) -> str:
        return f"{self.metric}:p{self.pct * 100:g}"


def parse_slo(text: str) -> SloTarget:
    """``ttft:p90=1.0`` → SloTarget('ttft', 0.9, 1.0); ValueError naming the problem."""
    head, sep, value = text.partition("=")
    metric, colon, pct = head.partition(":")
    if not sep or not colon or metric not in METRICS or not pct.startswith("p"):
        raise ValueError(f"--slo {text!r}: expected METRIC:pNN=SECONDS, METRIC one of {METRICS}")
    try:
        p, limit = float(pct[1:]) / 100.0, float(value)
    except ValueError:
        raise ValueError(f"--slo {text!r}: percentile and limit must be numbers") from None
    if not 0 < p < 1 or not limit > 0:
        raise ValueError(f"--slo {text!r}: percentile in (0, 100), limit positive")
    return SloTarget(metric, p, limit)


@dataclass(frozen=True)
class Slos:
    targets: tuple[SloTarget, ...]
    attainment: float = 0.9

    def limit(self, metric: str, default: float) -> float:
        return next((t.limit_s for t in self.targets if t.metric == metric), default)

    def pct(self, metric: str, default: float = 0.9) -> float:
        return next((t.pct for t in self.targets if t.metric == metric), default)


@dataclass
class PlanWorkload:
    """Request lengths (distributions, or a trace's lines) and their arrivals at a rate.

    Synthetic lengths arrive as a Poisson process. A trace with timestamps keeps its own
    arrival pattern (bursts included), time-scaled so its mean rate is the rate asked for; a
    trace without them arrives as Poisson. ``window`` picks another stretch of the trace (or
    other length draws); a trace shorter than the run repeats, one mean gap after its end.
    """

    isl: Length | None = None
    osl: Length | None = None
    trace: Sequence[RequestSpec] | None = None

    def trace_rate(self) -> float | None:
        """The trace's own mean arrival rate (None: no usable timestamps)."""
        times = [r.arrival_s for r in self.trace or ()]
        if len(times) < 2 or any(t is None for t in times):
            return None
        ts = [t for t in times if t is not None]
        if ts != sorted(ts) or ts[-1] <= ts[0]:
            return None
        return (len(ts) - 1) / (ts[-1] - ts[0])

    def _trace_times(self, rate: float, start: int, count: int) -> list[float] | None:
        own = self.trace_rate()
        if own is None or self.trace is None:
            return None
        n = len(self.trace)
        first = self.trace[0].arrival_s or 0.0
        period = (self.trace[-1].arrival_s or 0.0) - first + 1.0 / own
        scale = own / rate
        times = []
        for i in range(start, start + count):
            k, j = divmod(i, n)
            times.append((k * period + (self.trace[j].arrival_s or 0.0) - first) * scale)
        return [t - times[0] for t in times]

    def requests(self, rate: float, count: int, seed: int, window: int = 0) -> list[RequestSpec]:
        times = poisson_arrivals(rate, count, random.Random(seed))
        if self.trace is not None:
            # Another window starts ``count`` lines on, or half the trace on when the trace
            # is shorter than two runs (``count`` lines on would wrap to the same lines).
            start = window * min(count, len(self.trace) // 2)
            times = self._trace_times(rate, start, count) or times
            lines = [self.trace[(start + i) % len(self.trace)] for i in range(count)]
            return [
                RequestSpec(r.prompt_tokens, r.output_tokens, t, r.block_hashes)
                for r, t in zip(lines, times, strict=True)
            ]
        assert self.isl is not None
        assert self.osl is not None
        draws = random.Random(seed * 7919 + 1 + window)
        return [RequestSpec(self.isl.draw(draws), self.osl.draw(draws), t) for t in times]

    def sample(self, count: int = 4000, seed: int = 0) -> list[RequestSpec]:
        return self.requests(1.0, count, seed)


@dataclass
class Outcome:
    """A simulated run judged against the SLOs."""

    rate: float
    meets: bool
    binding: str  # the target closest to (or furthest past) its limit; "errors" on failures
    values: dict[str, float]  # each target's measured value
    attainment: float
    goodput: float  # requests per second meeting every target: attainment × offered rate
    output_tokens_per_s: float
    tokens_per_s_per_user: float
    failed: int
    extra: dict[str, Any] = field(default_factory=dict)


def candidate_settings(candidate: Candidate, model: str, slos: Slos) -> Settings:
    """The gateway config of ``candidate``: what ``pdgate serve --config`` would run."""
    pools = {p.role: _pool_config(p, candidate.link) for p in candidate.pools}
    slo = SloConfig(ttft_s=slos.limit("ttft", 2.0), tpot_s=slos.limit("tpot", 0.1))
    served = ModelConfig(name=model, mode=candidate.mode, slo=slo, pools=pools)
    return Settings(models=[served])


def _pool_config(pool: Pool, link: str | None) -> PoolConfig:
    """An instance with an engine profile names it, as a user's config would, and the gateway
    applies the profile's knobs on the device (:meth:`Catalog.engine_knobs`): the same knobs
    the plan sized and simulated the instance with."""
    i = pool.instance
    worker = EmulatedWorker(
        device=i.device,
        count=i.count,
        tp=i.tp,
        dtype=i.dtype,
        replicas=pool.replicas,
        engine=EngineKnobs() if i.engine else i.knobs,
        engine_profile=i.engine,
    )
    if pool.role == "prefill" and link is not None:
        return PoolConfig(policy="least_loaded", kv_link=link, workers=[worker])
    return PoolConfig(policy="least_loaded", workers=[worker])


@functools.lru_cache(maxsize=4)
def _catalog(directory: str | None) -> Catalog:
    from pathlib import Path

    return Catalog.load(Path(directory) if directory else None)


def run_candidate(
    candidate: Candidate,
    model: str,
    workload: PlanWorkload,
    slos: Slos,
    rate: float,
    *,
    requests: int,
    seed: int,
    window: int = 0,
    catalog_dir: str | None = None,
) -> Outcome:
    """Simulate ``candidate`` at ``rate`` requests per second and judge it."""
    settings = candidate_settings(candidate, model, slos)
    spec = SimulationSpec(
        settings,
        model,
        workload.requests(rate, requests, seed, window),
        total=requests,
        slo=Slo(slos.limit("ttft", 2.0), slos.limit("tpot", 0.1)),
        seed=seed,
        catalog=_catalog(catalog_dir),
    )
    result = simulate(spec)
    return judge(result.records, slos, rate, result.metrics())


def _value(records: Sequence[RequestRecord], metric: str, pct: float) -> float:
    if metric == "ttft":
        xs = [r.ttft for r in records if r.error is None and r.first_at is not None]
    elif metric == "e2e":
        xs = [r.e2e for r in records if r.error is None and r.end_at is not None]
    else:
        xs = [t for r in records if r.error is None and (t := r.tpot) is not None]
    if not xs:
        return math.inf
    xs.sort()
    return xs[max(0, math.ceil(pct * len(xs)) - 1)]


def _meets_all(r: RequestRecord, slos: Slos) -> bool:
    if r.error is not None or r.end_at is None:
        return False
    for t in slos.targets:
        v = r.ttft if t.metric == "ttft" else r.e2e if t.metric == "e2e" else r.tpot
        if v is not None and v > t.limit_s:
            return False
    return True


def judge(
    records: Sequence[RequestRecord], slos: Slos, rate: float, metrics: dict[str, Any]
) -> Outcome:
    values = {t.name: _value(records, t.metric, t.pct) for t in slos.targets}
    ratios = {t.name: values[t.name] / t.limit_s for t in slos.targets}
    good = sum(1 for r in records if _meets_all(r, slos))
    attainment = good / len(records) if records else 0.0
    failed = sum(1 for r in records if r.error is not None)
    meets = (
        failed == 0 and all(v <= 1.0 for v in ratios.values()) and (attainment >= slos.attainment)
    )
    binding = "errors" if failed else max(ratios, key=lambda k: ratios[k], default="-")
    tpot_mean = (metrics.get("tpot_s") or {}).get("mean")
    return Outcome(
        rate=rate,
        meets=meets,
        binding=binding,
        values=values,
        attainment=attainment,
        goodput=attainment * rate,
        output_tokens_per_s=float(metrics.get("output_tokens_per_s") or 0.0),
        tokens_per_s_per_user=1.0 / tpot_mean if tpot_mean else 0.0,
        failed=failed,
        extra={"errors": metrics.get("errors", {})},
    )
