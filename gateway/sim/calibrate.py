"""``pdgate calibrate``: every reference point in ``config/calibration.yaml``, simulated.

Each point is a published measurement keyed by (device, model, dtype, tp, engine, date) with
the scenario it was measured under; the point is simulated exactly as ``pdgate simulate``
would (same code path), each metric compared with the reference, and a table printed::

    pdgate calibrate                  # every point
    pdgate calibrate --points T1,N1   # some (ids, or a prefix such as T)
    pdgate calibrate --json           # one JSON object per row

Grading. Every point is ``train`` (a constant was fitted on it: the file's ``free_parameters``
name the points each was fitted on, and the two must agree) or ``check`` (nothing was fitted on
it); the summary prints the free parameters, train rows, check rows and the check pass rate.
Grades A and A- are enforced: within ±15% for throughput and mean ITL/TPOT, ±25% for mean TTFT,
or inside ``expect_range`` where a reference is a range. B and C points are reported only.

MLPerf Server and Interactive points (a scenario with ``limits``) are graded as MLPerf grades
them: the highest Poisson rate whose p99 TTFT and p99 TPOT stay within the round's limits is
found by bisection, and the throughput at that rate is compared with the published one. Their
mean latencies, at the published rate, are reported as diagnostics, not enforced.

A row that cannot be met is quarantined in the file, with its reason and its recorded error:
it does not fail the run while its error stays within the recorded one (errors can only
shrink), and at most :data:`QUARANTINE_SHARE` of the enforced rows may be quarantined.
The exit status is 1 when an enforced row misses outside quarantine, when a quarantined row's
error has grown, or when the quarantine is over budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from backends.emulator.accelerators import service_ttft
from backends.emulator.catalog import Catalog, EngineKnobs, format_validation_error
from backends.emulator.timing import StepShape
from backends.errors import CatalogError
from gateway.sim.run import SimulationSpec, device_settings, simulate
from gateway.sim.workload import make_workload, parse_length

if TYPE_CHECKING:
    from gateway.sim.run import SimulationResult

ENFORCED = ("A", "A-")
QUARANTINE_SHARE = 0.10  # at most this share of the enforced rows may be quarantined
ERROR_SLACK = 0.005  # a quarantined row fails when its |error| grows past the recorded one by this
LATENCY_METRICS = ("ttft_mean_s", "tpot_mean_s", "itl_mean_s")
# Bisection of the MLPerf Server rate: bracket by factors of BRACKET, then halve (geometrically)
# until the bracket is within RATE_PRECISION; every probe is one simulation.
BRACKET = 1.5
RATE_PRECISION = 0.02
MAX_PROBES = 14
# What a row reports beside its figure where that figure is not the device's alone.
DETAIL = (
    "device_ttft_mean_s",
    "service_network_rtt_s",
    "service_frontend_s",
    "service_rebatch_wait_s",
    "max_rate_req_s",
)
TOLERANCE = {
    "output_tokens_per_s": 0.15,
    "steady_output_tokens_per_s": 0.15,
    "per_user_tokens_per_s": 0.15,
    "itl_mean_s": 0.15,
    "tpot_mean_s": 0.15,
    "ttft_mean_s": 0.25,
    "step_ms": 0.15,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    """An MLPerf round's latency limits (p99), from mlcommons/inference loadgen mlperf.conf."""

    ttft_p99_s: float = Field(gt=0)
    tpot_p99_s: float = Field(gt=0)


class Scenario(_Strict):
    """How a point was measured.

    * ``offline``: all ``requests`` queued at once; throughput over the whole run, drain
      included (TensorRT-LLM's ``trtllm-bench`` at unbounded rate);
    * ``saturated``: ``concurrency`` clients back to back for ``requests`` requests; throughput
      while requests were still being sent, drain excluded (MLPerf Offline, which runs long
      enough for its drain not to count);
    * ``server``: Poisson arrivals at ``rate`` for ``duration_s`` (MLPerf Server);
    * ``closed``: ``concurrency`` clients back to back (single stream when 1);
    * ``step``: one engine step of ``tokens`` new tokens per sequence over ``context`` cached
      tokens, for ``seqs`` sequences, straight from the physics (step-time tables).
    """

    kind: Literal["offline", "saturated", "server", "closed", "step"]
    isl: str | int | None = None
    osl: str | int | None = None
    requests: int | None = Field(None, gt=0)
    concurrency: int | None = Field(None, gt=0)
    rate: float | None = Field(None, gt=0)
    duration_s: float | None = Field(None, gt=0)
    tokens: int = Field(1, gt=0)
    context: int = Field(0, ge=0)
    seqs: int = Field(1, gt=0)
    limits: Limits | None = Field(
        None, description="server only: grade the highest rate meeting these p99 limits"
    )


class Quarantined(_Strict):
    """A row that misses for a documented reason; its error may only shrink."""

    reason: str = Field(min_length=1)
    error: float = Field(description="signed relative error when quarantined")


class Point(_Strict):
    id: str
    ref: str = Field(description="the point's id in the reference table")
    device: str
    model: str
    dtype: Literal["bf16", "fp8", "fp4"]
    tp: int | None = Field(None, gt=0)
    count: int | None = Field(None, gt=0)
    engine: str = Field(description="serving engine and version the reference was measured on")
    date: str
    knobs: EngineKnobs = EngineKnobs()
    scenario: Scenario
    expect: dict[str, float] = Field(min_length=1)
    grade: Literal["A", "A-", "B", "C"]
    source: str
    note: str = ""
    tolerance: float | None = Field(
        None, gt=0, description="relative tolerance where the issue that set the target says so"
    )
    role: Literal["train", "check"] = Field(
        description="train: a constant was fitted on this point; check: none was"
    )
    service: str | None = Field(
        None, description="service profile added to the device (API figures: network, queue)"
    )
    expect_range: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="metric -> [low, high] where the reference is a range"
    )
    quarantine: dict[str, Quarantined] = Field(
        default_factory=dict,
        description="metric -> why these physics cannot meet it, with the error recorded",
    )


class FreeParameter(_Strict):
    """A constant fitted on calibration points (the rest are set from specs or priors)."""

    name: str = Field(description="device.field, e.g. h100-sxm.efficiency.kv_bandwidth")
    fitted_on: list[str] = Field(min_length=1, description="point ids or id prefixes")


class ServiceProfile(_Strict):
    """What an API service adds to a device's time to first token.

    ``ttft = device_ttft + network_rtt_s + frontend_s + rebatch_tokens / 2 · device_itl``: one
    round trip between the client and the API, the service's front end (TLS termination,
    authentication, tokenisation, routing), and the wait for the next batch boundary of a
    service that re-forms its batch every ``rebatch_tokens`` decode steps (on average half a
    round). The per-token stream is the device's: a constant network delay does not change
    the gap between tokens.
    """

    network_rtt_s: float = Field(ge=0)
    frontend_s: float = Field(ge=0)
    rebatch_tokens: float = Field(ge=0)
    sources: dict[str, str] = Field(min_length=1)

    def ttft_s(self, device_ttft_s: float, device_itl_s: float) -> float:
        return service_ttft(
            device_ttft_s, device_itl_s, self.network_rtt_s, self.frontend_s, self.rebatch_tokens
        )

    def parts(self, device_itl_s: float) -> dict[str, float]:
        """What the service adds, term by term (they sum to ``ttft_s − device_ttft``)."""
        return {
            "service_network_rtt_s": self.network_rtt_s,
            "service_frontend_s": self.frontend_s,
            "service_rebatch_wait_s": self.rebatch_tokens / 2 * device_itl_s,
        }


class CalibrationSet(_Strict):
    free_parameters: list[FreeParameter] = Field(default_factory=list)
    services: dict[str, ServiceProfile] = Field(default_factory=dict)
    points: list[Point]

    @model_validator(mode="after")
    def _consistent(self) -> CalibrationSet:
        fitted: set[str] = set()
        for fp in self.free_parameters:
            hit = [p.id for p in self.points if any(_matches(p.id, k) for k in fp.fitted_on)]
            if not hit:
                raise ValueError(f"free parameter {fp.name}: fitted_on names no point")
            fitted.update(hit)
        for p in self.points:
            if (p.role == "train") != (p.id in fitted):
                why = (
                    "no free parameter names it"
                    if p.role == "train"
                    else "a parameter was fitted on it"
                )
                raise ValueError(f"point {p.id} is marked {p.role}, but {why}")
            if p.service is not None and p.service not in self.services:
                raise ValueError(f"point {p.id}: unknown service '{p.service}'")
            for metric in [*p.quarantine, *p.expect_range]:
                if metric not in p.expect:
                    raise ValueError(f"point {p.id}: '{metric}' is not an expected metric")
        enforced = sum(1 for p in self.points for m in p.expect if is_enforced(p, m))
        quarantined = sum(len(p.quarantine) for p in self.points)
        if quarantined > QUARANTINE_SHARE * enforced:
            raise ValueError(
                f"{quarantined} quarantined rows exceed {QUARANTINE_SHARE:.0%} of the "
                f"{enforced} enforced rows"
            )
        return self


def _matches(point_id: str, key: str) -> bool:
    return point_id == key or point_id.startswith(key + "-")


def is_enforced(point: Point, metric: str) -> bool:
    """Grades A and A- are enforced, except the mean latencies of MLPerf Server points, which
    MLPerf does not grade (they are diagnostics beside the rate at the p99 limits)."""
    if point.grade not in ENFORCED:
        return False
    return not (point.scenario.limits is not None and metric in LATENCY_METRICS)


@dataclass(frozen=True)
class Row:
    point: Point
    metric: str
    reference: float
    predicted: float | None
    # What the row's figure is made of, where it is not the device alone: the device's own
    # TTFT under a service profile, the rate an MLPerf Server point was graded at.
    detail: tuple[tuple[str, float], ...] = ()

    @property
    def error(self) -> float | None:
        if self.predicted is None or not math.isfinite(self.predicted):
            return None
        return self.predicted / self.reference - 1.0

    @property
    def tolerance(self) -> float:
        if self.point.tolerance is not None:
            return self.point.tolerance
        return TOLERANCE.get(self.metric.split("@")[0], 0.15)

    @property
    def enforced(self) -> bool:
        return is_enforced(self.point, self.metric)

    @property
    def passed(self) -> bool:
        e = self.error
        if e is None or self.predicted is None:
            return False
        if self.metric in self.point.expect_range:
            lo, hi = self.point.expect_range[self.metric]
            return lo <= self.predicted <= hi
        return abs(e) <= self.tolerance

    @property
    def quarantine(self) -> Quarantined | None:
        """Why this row is expected to miss (documented in the calibration file), if it is."""
        return self.point.quarantine.get(self.metric)

    @property
    def grew(self) -> bool:
        """A quarantined row whose error is now larger than the recorded one."""
        q, e = self.quarantine, self.error
        if q is None:
            return False
        return e is None or abs(e) > abs(q.error) + ERROR_SLACK

    @property
    def failed(self) -> bool:
        """Fails the run: an enforced miss outside quarantine, or a quarantined row that grew."""
        if not self.enforced:
            return False
        if self.quarantine is not None:
            return self.grew
        return not self.passed

    @property
    def status(self) -> str:
        if not self.enforced:
            return "(ok)" if self.passed else "(miss)"
        if self.passed:
            return "ok"
        if self.quarantine is not None:
            return "GREW" if self.grew else "quarantined"
        return "MISS"

    def as_dict(self) -> dict[str, Any]:
        p = self.point
        return {
            "point": p.id,
            "device": p.device,
            "model": p.model,
            "dtype": p.dtype,
            "tp": p.tp,
            "engine": p.engine,
            "date": p.date,
            "grade": p.grade,
            "metric": self.metric,
            "reference": self.reference,
            "predicted": self.predicted,
            "error": self.error,
            "tolerance": self.tolerance,
            "role": p.role,
            "enforced": self.enforced,
            "passed": self.passed,
            "status": self.status,
            "quarantine": self.quarantine.reason if self.quarantine else None,
            "quarantined_error": self.quarantine.error if self.quarantine else None,
            **dict(self.detail),
        }


def default_path() -> Path:
    return Catalog.default_dir() / "calibration.yaml"


def load_points(path: Path | None = None) -> list[Point]:
    return load_set(path).points


def load_set(path: Path | None = None) -> CalibrationSet:
    path = path or default_path()
    try:
        data = yaml.safe_load(path.read_text())
        return CalibrationSet.model_validate(data)
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        raise CatalogError(f"{path}: {format_validation_error(exc)}") from exc


def select(points: Iterable[Point], wanted: str | None) -> list[Point]:
    """Points whose id equals, or starts with, one of the comma-separated ``wanted``."""
    points = list(points)
    if not wanted:
        return points
    keys = [w.strip() for w in wanted.split(",") if w.strip()]
    chosen = [p for p in points if any(p.id.startswith(k) for k in keys)]
    if not chosen:
        raise CatalogError(f"no calibration point matches {wanted!r}")
    return chosen


def run_point(
    point: Point, catalog: Catalog, services: dict[str, ServiceProfile] | None = None
) -> list[Row]:
    """Simulate one point; one row per expected metric.

    A point with a ``service`` adds that service's time to its TTFT (the device's own TTFT is
    reported beside it as ``device_ttft_mean_s``, and what the service adds term by term as
    ``service_*``, :meth:`ServiceProfile.parts`); a server point with ``limits`` is graded at
    the highest rate meeting them (:func:`max_rate_under_limits`).
    """
    sc = point.scenario
    if sc.kind == "step":
        measured = _step_metrics(point, catalog)
    else:
        raw = _run(point, catalog).metrics()
        measured = _metrics(raw)
        if sc.limits is not None and sc.rate is not None:
            rate, tput = max_rate_under_limits(point, catalog, sc.limits, sc.rate, raw)
            measured["steady_output_tokens_per_s"] = tput
            measured["max_rate_req_s"] = rate
        if point.service is not None:
            service = (services or {})[point.service]
            measured["device_ttft_mean_s"] = measured["ttft_mean_s"]
            measured["ttft_mean_s"] = service.ttft_s(
                measured["device_ttft_mean_s"], measured["itl_mean_s"]
            )
            measured.update(service.parts(measured["itl_mean_s"]))
    detail = tuple((k, measured[k]) for k in DETAIL if k in measured)
    return [Row(point, k, v, measured.get(k), detail) for k, v in point.expect.items()]


def _step_metrics(point: Point, catalog: Catalog) -> dict[str, float]:
    sc = point.scenario
    dep = catalog.deployment(
        point.device, point.model, dtype=point.dtype, count=point.count, tp=point.tp or 1
    )
    shape = StepShape.of([(sc.tokens, sc.context)] * sc.seqs)
    return {"step_ms": dep.step_time(shape) * 1000.0}


def _run(point: Point, catalog: Catalog, rate: float | None = None) -> SimulationResult:
    sc = point.scenario
    settings = device_settings(
        catalog,
        device=point.device,
        model=point.model,
        dtype=point.dtype,
        tp=point.tp,
        count=point.count,
        engine=point.knobs,
    )
    isl = parse_length(sc.isl) if sc.isl is not None else None
    osl = parse_length(sc.osl) if sc.osl is not None else None
    if sc.kind == "offline":
        workload = make_workload(isl=isl, osl=osl, concurrency=sc.requests, requests=sc.requests)
    elif sc.kind in ("saturated", "closed"):
        workload = make_workload(
            isl=isl, osl=osl, concurrency=sc.concurrency or 1, requests=sc.requests
        )
    else:
        workload = make_workload(
            isl=isl, osl=osl, rate=rate or sc.rate, duration=sc.duration_s, requests=sc.requests
        )
    spec = SimulationSpec(
        settings,
        point.model,
        workload.requests,
        concurrency=workload.concurrency,
        stop_after_s=workload.stop_after_s,
        total=workload.total,
        catalog=catalog,
    )
    return simulate(spec)


def _metrics(m: dict[str, Any]) -> dict[str, float]:
    itl = m["itl_s"]["mean"]
    return {
        "output_tokens_per_s": m["output_tokens_per_s"],
        "steady_output_tokens_per_s": m["steady_output_tokens_per_s"],
        "ttft_mean_s": _num(m["ttft_s"]["mean"]),
        "tpot_mean_s": _num(m["tpot_s"]["mean"]),
        "itl_mean_s": _num(itl),
        "per_user_tokens_per_s": 1.0 / itl if itl else math.nan,
    }


def meets_limits(m: dict[str, Any], limits: Limits) -> bool:
    """MLPerf's Server validity: every request served, p99 TTFT and p99 TPOT within limits."""
    ttft, tpot = m["ttft_s"]["p99"], m["tpot_s"]["p99"]
    if m["failed"] or ttft is None:
        return False
    return ttft <= limits.ttft_p99_s and (tpot is None or tpot <= limits.tpot_p99_s)


def max_rate_under_limits(
    point: Point,
    catalog: Catalog,
    limits: Limits,
    start: float,
    first: dict[str, Any] | None = None,
) -> tuple[float, float]:
    """The highest Poisson rate (requests/s) whose run meets ``limits``, and the steady output
    throughput at it: bracket from ``start`` by factors of :data:`BRACKET`, then bisect
    geometrically to :data:`RATE_PRECISION`. ``(0, 0)`` when no rate down to
    ``start / BRACKET⁶`` meets them. ``first``: the metrics of a run at ``start`` already made.
    """

    def probe(rate: float, m: dict[str, Any] | None = None) -> tuple[bool, float]:
        m = m if m is not None else _run(point, catalog, rate).metrics()
        return meets_limits(m, limits), float(m["steady_output_tokens_per_s"])

    probes = 0
    ok, tput = probe(start, first)
    probes += 1
    lo: tuple[float, float] | None = (start, tput) if ok else None
    hi: float | None = None if ok else start
    rate = start
    while (lo is None or hi is None) and probes < MAX_PROBES // 2:
        rate = rate * BRACKET if ok else rate / BRACKET
        ok, tput = probe(rate)
        probes += 1
        if ok:
            lo = (rate, tput) if lo is None or rate > lo[0] else lo
        else:
            hi = rate if hi is None or rate < hi else hi
    if lo is None:
        return 0.0, 0.0
    if hi is None:
        return lo
    while hi / lo[0] > 1.0 + RATE_PRECISION and probes < MAX_PROBES:
        mid = math.sqrt(lo[0] * hi)
        ok, tput = probe(mid)
        probes += 1
        if ok:
            lo = (mid, tput)
        else:
            hi = mid
    return lo


def _num(v: float | None) -> float:
    return math.nan if v is None else v


def summary_text(cal: CalibrationSet, rows: list[Row], seconds: float) -> str:
    """Free parameters, train and check rows, the check pass rate, quarantine and misses."""
    enforced = [r for r in rows if r.enforced]
    train = [r for r in enforced if r.point.role == "train"]
    check = [r for r in enforced if r.point.role == "check"]
    other = [r for r in rows if not r.enforced]
    other_check = [r for r in other if r.point.role == "check"]
    quarantined = [r for r in enforced if r.quarantine is not None]
    failed = [r for r in rows if r.failed]

    def rate(part: list[Row]) -> str:
        n = sum(1 for r in part if r.passed)
        return f"{n}/{len(part)}" + (f" ({n / len(part):.0%})" if part else "")

    lines = [
        f"{len(cal.free_parameters)} free parameters, fitted on "
        f"{sum(1 for p in cal.points if p.role == 'train')} train points; "
        f"{sum(1 for p in cal.points if p.role == 'check')} check points "
        f"({len({r.point.id for r in rows})} run)",
        f"enforced rows (A/A-: ±15% throughput, ITL, TPOT; ±25% TTFT; MLPerf Server at its p99 "
        f"limits): train {rate(train)}, check {rate(check)} within tolerance",
        f"reported rows (B/C and MLPerf Server mean latencies): check {rate(other_check)}, "
        f"all {rate(other)} within tolerance ({seconds:.0f} s)",
        f"quarantine: {len(quarantined)} of {len(enforced)} enforced rows "
        f"(budget {QUARANTINE_SHARE:.0%}); errors may only shrink",
    ]
    lines += [
        f"  quarantined {r.point.id} {r.metric}: now {_pct(r.error)}, recorded "
        f"{r.quarantine.error:+.1%}{' — GREW' if r.grew else ''}: {r.quarantine.reason}"
        for r in quarantined
        if r.quarantine is not None
    ]
    if failed:
        lines.append(f"{len(failed)} enforced rows fail:")
        lines += [f"  MISS {r.point.id} {r.metric}: {_pct(r.error)}" for r in failed]
    else:
        lines.append("every enforced row passes or stays within its quarantine")
    return "\n".join(lines)


def _pct(e: float | None) -> str:
    return "n/a" if e is None else f"{e:+.1%}"
