"""``pdgate calibrate --devices``: one line per device — family, what its physics is based on,
the checks it passes — and the status derived from them.

A device is ``calibrated`` when at least one of its *check* points (a published figure no
constant was fitted on, ``config/calibration.yaml``) is within tolerance, whatever its grade;
otherwise ``spec-only``. Train points never count: a fit reproducing the figure it was fitted
on says nothing. Nothing in the device files says which a device is.

``--markdown`` prints the same table as the Markdown page ``docs/accelerators.md`` embeds
between its ``<!-- devices:begin -->`` and ``<!-- devices:end -->`` markers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from backends.emulator.catalog import AnyDevice, Catalog, HbmDevice
from backends.errors import CatalogError
from gateway.sim.calibrate import CalibrationSet, Point, Row, run_point

Status = Literal["calibrated", "spec-only"]

# What each family's physics is, in one phrase (backends/emulator/timing.py and
# backends/emulator/accelerators.py).
_HBM_ROOFLINE = "HBM roofline: max(FLOPs / (MFU·peak), bytes / (η·BW)) per kernel + overheads + "
MECHANISM: dict[str, str] = {
    "hbm": f"{_HBM_ROOFLINE}collectives over the scale-up link",
    "sram_pipeline": "SRAM-resident pipeline over chips sized by SRAM: per-token latency "
    "τ0 + layers·τ_layer, flat in batch until the slots fill; prompt tokens stream through",
    "wafer_scale": "wafers sized by on-wafer SRAM, layers pipelined across them: "
    "layers·τ_layer + (wafers−1)·τ_hop per token; prompt tokens stream through, their "
    "activations over each wafer-to-wafer link",
    "lpddr_sram": "LPDDR roofline, SRAM speed when the weights fit on chip",
    "in_memory": "in-memory compute: weights computed on in SRAM (cards sized by SRAM), "
    "LPDDR when they spill; card-chain latency per token",
    "dataflow": "three tiers: SRAM the fused decoder's working set, HBM the hot model's weights "
    "and KV, DDR the model library and any weights beyond HBM (streamed every step)",
    "hardwired": "the model is the chip: fixed per-token latency, KV in on-die SRAM",
}

# HBM devices whose chips sit on a torus (TPU ICI, Trainium2 and Inferentia2 NeuronLink) instead of
# a switch.
TORUS_MECHANISM = (
    _HBM_ROOFLINE
    + "collectives as per-axis rings over a {fabric} (all-to-all bound by its bisection)"
)

Runner = Callable[[Point], list[Row]]


@dataclass(frozen=True)
class DeviceLine:
    """One device's line in the table."""

    name: str
    vendor: str
    family: str
    basis: str
    fitted: list[str]
    checks: list[Point]
    passed: list[str]

    @property
    def status(self) -> Status:
        return "calibrated" if self.passed else "spec-only"


def check_points(cal: CalibrationSet, device: str) -> list[Point]:
    return [p for p in cal.points if p.device == device and p.role == "check"]


def derive_status(rows: Iterable[Row]) -> Status:
    """``calibrated`` when any check row passes, else ``spec-only``."""
    ok = any(r.point.role == "check" and r.passed for r in rows)
    return "calibrated" if ok else "spec-only"


def basis(device: AnyDevice) -> str:
    """What a device's physics rests on: its family's mechanism and how many of its constants
    are published figures, priors carried over from another device, or assumptions."""
    spec = prior = assumed = 0
    for key, text in device.sources.items():
        if key in ("usd_per_hour", "tdp_w", "evidence", "physics"):
            continue
        low = text.lower()
        if "prior" in low or "reused" in low or "carried over" in low:
            prior += 1
        elif "assumption" in low or "assumed" in low:
            assumed += 1
        else:
            spec += 1
    return (
        f"{mechanism(device)}; constants: {spec} published or derived, {prior} priors "
        f"from other devices, {assumed} assumed"
    )


def mechanism(device: AnyDevice) -> str:
    """The family's mechanism, with the fabric where a device's chips form a torus."""
    if isinstance(device, HbmDevice) and device.topology is not None:
        return TORUS_MECHANISM.format(fabric=device.topology.describe())
    return MECHANISM[device.family]


def device_lines(
    catalog: Catalog, cal: CalibrationSet, runner: Runner | None = None
) -> list[DeviceLine]:
    """Every catalog device with its check points run through ``runner`` (default: simulate)."""
    run: Runner = runner or (lambda p: run_point(p, catalog, cal.services))
    lines = []
    for name, device in sorted(catalog.devices.items()):
        checks = check_points(cal, name)
        passed = []
        for point in checks:
            try:
                rows = run(point)
            except (CatalogError, ValueError):  # it cannot be simulated: it does not pass
                continue
            if rows and all(r.passed for r in rows):
                passed.append(point.id)
        fitted = [
            fp.name.removeprefix(name + ".")
            for fp in cal.free_parameters
            if fp.name.startswith(name + ".")
        ]
        lines.append(
            DeviceLine(
                name,
                device.vendor,
                device.family,
                basis(device),
                fitted,
                checks,
                passed,
            )
        )
    return lines


def saved_rows(cal: CalibrationSet, path: Path) -> Runner:
    """A runner reading rows from a ``pdgate calibrate --json`` run instead of simulating;
    a point missing from it raises :class:`LookupError` (the saved run is stale)."""
    found: dict[str, list[tuple[str, float | None]]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            found.setdefault(d["point"], []).append((d["metric"], d["predicted"]))

    def run(point: Point) -> list[Row]:
        if point.id not in found:
            raise LookupError(f"{path}: no rows for point {point.id}: run it again")
        return [Row(point, m, point.expect[m], v) for m, v in found[point.id] if m in point.expect]

    return run


def render(lines: list[DeviceLine], markdown: bool) -> str:
    if markdown:
        out = [
            "| device | vendor | family | status | checks passed | fitted constants | physics |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in lines:
            checks = _checks(d)
            fitted = ", ".join(f"`{f}`" for f in d.fitted) or "none"
            out.append(
                f"| `{d.name}` | {d.vendor} | {d.family} | {d.status} | {checks} | {fitted} "
                f"| {d.basis} |"
            )
        return "\n".join(out) + "\n"
    out = [f"{'device':16} {'family':14} {'status':11} checks passed | fitted | physics"]
    for d in lines:
        fitted = ", ".join(d.fitted) or "none"
        out.append(f"{d.name:16} {d.family:14} {d.status:11} {_checks(d)} | {fitted} | {d.basis}")
    return "\n".join(out) + "\n"


def _checks(d: DeviceLine) -> str:
    if not d.checks:
        return "no published figure to check"
    return f"{len(d.passed)}/{len(d.checks)}" + (f" ({', '.join(d.passed)})" if d.passed else "")


def device_table(
    catalog: Catalog, cal: CalibrationSet, *, markdown: bool = False, runner: Runner | None = None
) -> str:
    return render(device_lines(catalog, cal, runner), markdown)


BEGIN, END = "<!-- devices:begin -->", "<!-- devices:end -->"


def splice(page: str, table: str) -> str:
    """``page`` with the text between its device-table markers replaced by ``table``."""
    head, sep, rest = page.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"the page has no {BEGIN} ... {END} markers")
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """``python -m gateway.sim.devices PAGE [--rows FILE]``: rewrite PAGE's device table."""
    import argparse

    from gateway.sim.calibrate import load_set

    parser = argparse.ArgumentParser(prog="python -m gateway.sim.devices")
    parser.add_argument("page", type=Path, help="Markdown page with the table markers")
    parser.add_argument("--rows", type=Path, help="a saved `pdgate calibrate --json` run")
    args = parser.parse_args(argv)
    cal = load_set()
    runner = saved_rows(cal, args.rows) if args.rows else None
    table = device_table(Catalog.load(), cal, markdown=True, runner=runner)
    args.page.write_text(splice(args.page.read_text(), table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
