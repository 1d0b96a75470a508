"""Rental prices per device: ``config/prices.yaml`` (sourced, dated), then ``--price`` overrides.

A device priced nowhere stays unpriced (None): the cost objective skips it, the energy and
device-count objectives still cover it.

Example::

    book = PriceBook.load(overrides={"groq-lpu-v1": 0.5})
    book.usd_per_hour("h100-sxm")   # 3.90 (median on-demand list price, 2026-09-20)
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Price:
    """One device's hourly price and where it comes from."""

    usd_per_hour: float
    source: str
    date: str
    trust: str


class PriceBook:
    """Device name → :class:`Price`."""

    def __init__(self, prices: dict[str, Price]) -> None:
        self.prices = prices

    @classmethod
    def load(cls, path: Path | None = None, overrides: dict[str, float] | None = None) -> PriceBook:
        path = path or Path(str(resources.files("pdgate_config"))) / "prices.yaml"
        raw = yaml.safe_load(path.read_text()) or {}
        prices = {
            name: Price(
                float(entry["usd_per_hour"]),
                str(entry["source"]),
                str(entry["date"]),
                str(entry["trust"]),
            )
            for name, entry in raw.items()
        }
        for name, usd in (overrides or {}).items():
            prices[name] = Price(usd, "--price", "given", "user")
        return cls(prices)

    def usd_per_hour(self, device: str) -> float | None:
        price = self.prices.get(device)
        return price.usd_per_hour if price is not None else None

    def priced(self) -> list[str]:
        return sorted(self.prices)


def parse_price(text: str) -> tuple[str, float]:
    """``DEVICE=USD_PER_HOUR`` → (device, usd); ValueError with the reason otherwise."""
    device, sep, value = text.partition("=")
    if not sep or not device:
        raise ValueError(f"--price {text!r}: expected DEVICE=USD_PER_HOUR")
    try:
        usd = float(value)
    except ValueError:
        raise ValueError(f"--price {text!r}: {value!r} is not a number") from None
    if not usd > 0:
        raise ValueError(f"--price {text!r}: the price must be positive")
    return device, usd
