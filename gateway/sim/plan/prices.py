"""Rental prices per device: ``config/prices.yaml`` (sourced, dated), then ``--price`` overrides.

A device priced nowhere stays unpriced (None): the cost objective skips it, the energy and
device-count objectives still cover it. Where a cloud rents a device in instances of several
sizes at different prices per device (AWS's Inferentia2: one chip in an inf2.xlarge, twelve in
an inf2.48xlarge), the entry lists them under ``instances``, and a deployment of ``n`` devices
per instance pays the per-device price of the smallest instance that holds ``n`` (the largest
when none does: the deployment spans several).

Example::

    book = PriceBook.load(overrides={"groq-lpu-v1": 0.5})
    book.usd_per_hour("h100-sxm")   # 3.90 (median on-demand list price, 2026-09-20)
    book.usd_per_hour("inferentia2", devices=12)   # 1.08177 (inf2.48xlarge, per chip)
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Price:
    """One device's hourly price and where it comes from; ``instances`` are the rental sizes
    that price it otherwise, ``(devices per instance, USD per device-hour)`` by size."""

    usd_per_hour: float
    source: str
    date: str
    trust: str
    instances: tuple[tuple[int, float], ...] = ()

    def for_devices(self, devices: int) -> float:
        """USD per device-hour for a deployment of ``devices`` devices per instance."""
        if not self.instances:
            return self.usd_per_hour
        for size, usd in self.instances:
            if devices <= size:
                return usd
        return self.instances[-1][1]


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
                tuple(
                    sorted(
                        (int(i["devices"]), float(i["usd_per_device_hour"]))
                        for i in entry.get("instances", ())
                    )
                ),
            )
            for name, entry in raw.items()
        }
        for name, usd in (overrides or {}).items():
            prices[name] = Price(usd, "--price", "given", "user")
        return cls(prices)

    def usd_per_hour(self, device: str, devices: int = 1) -> float | None:
        """USD per device-hour of ``device`` in a deployment of ``devices`` devices per
        instance; None where it has no price."""
        price = self.prices.get(device)
        return price.for_devices(devices) if price is not None else None

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
