"""``pdgate calibrate``: every reference point in ``config/calibration.yaml``, simulated.

Each point is a published measurement keyed by (device, model, dtype, tp, engine, date) with
the scenario it was measured under; the point is simulated exactly as ``pdgate simulate``
would (same code path), each metric compared with the reference, and a table printed::

    pdgate calibrate                  # every point
    pdgate calibrate --points T1,N1   # some (ids, or a prefix such as T)
    pdgate calibrate --json           # one JSON object per row

The exit status is 1 when an enforced point misses: grades A and A- must be within ±15% for
throughput and mean ITL/TPOT and ±25% for mean TTFT. B and C points are reported only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.emulator.catalog import Catalog, EngineKnobs, format_validation_error
from backends.emulator.timing import StepShape
from backends.errors import CatalogError
from gateway.sim.run import SimulationSpec, device_settings, simulate
from gateway.sim.workload import make_workload, parse_length

ENFORCED = ("A", "A-")
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
    known_miss: dict[str, str] = Field(
        default_factory=dict,
        description="metric -> why these physics cannot meet it; still enforced (exit status)",
    )


class CalibrationSet(_Strict):
    points: list[Point]


@dataclass(frozen=True)
class Row:
    point: Point
    metric: str
    reference: float
    predicted: float | None

    @property
    def error(self) -> float | None:
        if self.predicted is None or not math.isfinite(self.predicted):
            return None
        return self.predicted / self.reference - 1.0

    @property
    def tolerance(self) -> float:
        return TOLERANCE.get(self.metric.split("@")[0], 0.15)

    @property
    def enforced(self) -> bool:
        return self.point.grade in ENFORCED

    @property
    def passed(self) -> bool:
        e = self.error
        return e is not None and abs(e) <= self.tolerance

    @property
    def known_miss(self) -> str | None:
        """Why this row is expected to miss (documented in the calibration file), if it is."""
        return self.point.known_miss.get(self.metric)

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
            "enforced": self.enforced,
            "passed": self.passed,
            "known_miss": self.known_miss,
        }


def default_path() -> Path:
    return Catalog.default_dir() / "calibration.yaml"


def load_points(path: Path | None = None) -> list[Point]:
    path = path or default_path()
    try:
        data = yaml.safe_load(path.read_text())
        return CalibrationSet.model_validate(data).points
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
    chosen = [p for p in points if any(p.id == k or p.id.startswith(k) for k in keys)]
    if not chosen:
        raise CatalogError(f"no calibration point matches {wanted!r}")
    return chosen


def run_point(point: Point, catalog: Catalog) -> list[Row]:
    """Simulate one point; one row per expected metric."""
    sc = point.scenario
    if sc.kind == "step":
        measured = _step_metrics(point, catalog)
    else:
        measured = _simulated_metrics(point, catalog)
    return [Row(point, k, v, measured.get(k)) for k, v in point.expect.items()]


def _step_metrics(point: Point, catalog: Catalog) -> dict[str, float]:
    sc = point.scenario
    dep = catalog.deployment(
        point.device, point.model, dtype=point.dtype, count=point.count, tp=point.tp or 1
    )
    shape = StepShape.of([(sc.tokens, sc.context)] * sc.seqs)
    return {"step_ms": dep.step_time(shape) * 1000.0}


def _simulated_metrics(point: Point, catalog: Catalog) -> dict[str, float]:
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
            isl=isl, osl=osl, rate=sc.rate, duration=sc.duration_s, requests=sc.requests
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
    m = simulate(spec).metrics()
    itl = m["itl_s"]["mean"]
    return {
        "output_tokens_per_s": m["output_tokens_per_s"],
        "steady_output_tokens_per_s": m["steady_output_tokens_per_s"],
        "ttft_mean_s": _num(m["ttft_s"]["mean"]),
        "tpot_mean_s": _num(m["tpot_s"]["mean"]),
        "itl_mean_s": _num(itl),
        "per_user_tokens_per_s": 1.0 / itl if itl else math.nan,
    }


def _num(v: float | None) -> float:
    return math.nan if v is None else v
