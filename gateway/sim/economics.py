"""What a simulated run costs: dollars per million output tokens and joules per output token.

A deployment is charged for every device it provisions, for the whole simulated run, whether
busy or idle — that is what a rented or owned fleet costs. Energy counts each device at its
TDP for the run: an upper bound (idle and memory-bound phases draw less), stated as such.

Example::

    fleet = [FleetItem("h100-sxm", devices=8, tdp_w=700, usd_per_hour=2.95)]
    usd_per_million_tokens(fleet, seconds=600, output_tokens=12_000_000)   # ≈ 0.328
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FleetItem:
    """``devices`` devices of one profile, with its power and price (None when unknown)."""

    device: str
    devices: int
    tdp_w: float | None
    usd_per_hour: float | None


def usd_per_million_tokens(
    fleet: Sequence[FleetItem], seconds: float, output_tokens: int
) -> float | None:
    """``Σ devices · $/h · hours / (tokens / 10⁶)``; None if a price is unknown or no tokens."""
    if output_tokens <= 0 or seconds <= 0 or any(f.usd_per_hour is None for f in fleet):
        return None
    dollars = sum(f.devices * (f.usd_per_hour or 0.0) for f in fleet) * seconds / 3600.0
    return dollars / (output_tokens / 1e6)


def joules_per_token(
    fleet: Sequence[FleetItem], seconds: float, output_tokens: int
) -> float | None:
    """``Σ devices · TDP · seconds / tokens``; None if a TDP is unknown or no tokens."""
    if output_tokens <= 0 or seconds <= 0 or any(f.tdp_w is None for f in fleet):
        return None
    return sum(f.devices * (f.tdp_w or 0.0) for f in fleet) * seconds / output_tokens


def missing_prices(fleet: Sequence[FleetItem]) -> list[str]:
    """Devices whose price or power is unknown (reported beside a null figure)."""
    return sorted({f.device for f in fleet if f.usd_per_hour is None or f.tdp_w is None})
