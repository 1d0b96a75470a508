"""What a plan is asked for (:class:`PlanRequest`), and the error a plan raises."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.sim.plan.evaluate import PlanWorkload, Slos
from gateway.sim.plan.prices import PriceBook
from gateway.sim.plan.space import CHUNK_BUDGETS, MAX_NUM_SEQS, MODES, TP_DEGREES

OBJECTIVES = ("cost", "energy", "devices")


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
    engine: str | None = None  # an engine profile (config/engines); None: the default knobs
