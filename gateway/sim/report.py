"""``pdgate report``: plots and a markdown summary of a load test or of simulations.

    pdgate report results/run                  # locust: --csv results/run of loadtests/
    pdgate report sim-2.json sim-4.json ...    # pdgate simulate --json, one run per file
    pdgate report results/run --out docs/ --slo-ttft 1 --slo-tpot 0.05

Writes ``ttft.png`` and ``itl.png`` (distributions), ``load.png`` (throughput and goodput,
and TTFT percentiles, against offered load) and ``summary.md`` into ``--out`` (default: a
``_report`` directory beside the input).

Inputs:

* a locust run of ``loadtests/locustfile.py`` with ``--csv PREFIX``: ``PREFIX_requests.csv``
  (one row per request) and ``PREFIX_itl.csv`` (every inter-token gap, bucketed). Requests are
  grouped by the offered rate when they were sent (one group per step of a step test), or by
  user count in closed loop; a group's throughput counts the requests that *finished* while
  it was offered, so saturation shows as throughput falling behind the offered rate;
* ``pdgate simulate --json`` outputs: one run per file (or per line), each one load level at
  its ``offered_rps`` (or ``rate``) if it has one, else at its achieved request rate.

Goodput counts finished requests with TTFT ≤ ``--slo-ttft`` and TPOT ≤ ``--slo-tpot``
(defaults: the gateway's, 2 s and 0.1 s; a simulation brings its own).
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.settings import SLO_TPOT_S, SLO_TTFT_S

DEFAULT_SLO = (SLO_TTFT_S, SLO_TPOT_S)  # the gateway's, simulate's: one default
QUANTILES = (0.5, 0.9, 0.99)

# One row per request in ``<csv prefix>_requests.csv`` (written by ``loadtests/locustfile.py``).
REQUEST_COLUMNS = (
    "start_unix_s",  # when the request was sent
    "kind",  # chat | rag | agent | trace
    "offered_rps",  # the offered rate when it was sent (0: closed loop)
    "users",  # users running then
    "prompt_tokens",
    "completion_tokens",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "ok",  # 1 or 0
    "error",
    "late_s",  # how late it went out against its arrival time (open loop)
)


def itl_buckets() -> list[float]:
    """Upper bounds (s) of the ITL histogram: 10 per decade, 10 µs to 1000 s, then +inf."""
    return [10.0 ** (e / 10) for e in range(-50, 31)] + [math.inf]


class ReportError(ValueError):
    """Input that cannot be read as a load test or a simulation; the message says why."""


# -- the data every input becomes ------------------------------------------------------------


@dataclass(frozen=True)
class Quantiles:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Quantiles | None:
        if not values:
            return None
        s = sorted(values)
        return cls(sum(s) / len(s), *(quantile(s, q) for q in QUANTILES))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Quantiles | None:
        if not d or d.get("p50") is None:
            return None
        return cls(*(float(d.get(k) or math.nan) for k in ("mean", "p50", "p90", "p99")))


@dataclass
class Level:
    """One offered-load level: a step of a locust run, or one simulation."""

    offered: float
    requests: int
    failed: int
    ttft: Quantiles | None
    tpot: Quantiles | None
    itl: Quantiles | None
    throughput_rps: float
    tokens_per_s: float
    goodput_rps: float


@dataclass
class Report:
    title: str
    source: str
    x_label: str
    levels: list[Level]
    slo: tuple[float, float]
    ttft_samples: list[float] = field(default_factory=list)
    itl_buckets: list[tuple[float, int]] = field(default_factory=list)  # (upper bound s, count)
    offered_is_rate: bool = True


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bucket_quantile(buckets: Sequence[tuple[float, int]], q: float) -> float:
    """A quantile of bucketed values, interpolated log-linearly inside its bucket."""
    total = sum(c for _, c in buckets)
    if total == 0:
        return math.nan
    rank, seen, lower = q * total, 0, 0.0
    for upper, count in buckets:
        if count and seen + count >= rank:
            if math.isinf(upper):
                return lower
            if lower <= 0:
                return upper
            frac: float = (rank - seen) / count
            return float(lower * (upper / lower) ** frac)
        seen += count
        lower = upper
    return lower


# -- reading inputs --------------------------------------------------------------------------


def load(
    paths: Sequence[Path], *, slo_ttft: float | None = None, slo_tpot: float | None = None
) -> Report:
    """Read a locust run or simulation outputs (see the module docstring)."""
    if all(p.suffix in (".json", ".jsonl") for p in paths):
        return load_simulations(paths, slo_ttft, slo_tpot)
    if len(paths) != 1:
        raise ReportError("give one locust run (its --csv PREFIX), or simulate --json files")
    slo = (slo_ttft or DEFAULT_SLO[0], slo_tpot or DEFAULT_SLO[1])
    return load_locust(locust_prefix(paths[0]), slo)


def locust_prefix(path: Path) -> Path:
    name = path.name
    for suffix in ("_requests.csv", "_stats.csv", "_itl.csv"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path


def default_out(first: Path) -> Path:
    if first.suffix in (".json", ".jsonl"):
        return first.with_name(first.stem + "_report")
    prefix = locust_prefix(first)
    return prefix.with_name(prefix.name + "_report")


def load_locust(prefix: Path, slo: tuple[float, float]) -> Report:
    requests = prefix.with_name(prefix.name + "_requests.csv")
    if not requests.exists():
        hint = " (a run of loadtests/locustfile.py with --csv writes it)"
        raise ReportError(f"{requests} not found{hint}")
    rows = _read_rows(requests)
    if not rows:
        raise ReportError(f"{requests} has no requests")
    closed = all(r.offered <= 0 for r in rows)
    groups: dict[float, list[_Row]] = {}
    for r in rows:
        groups.setdefault(float(r.users) if closed else r.offered, []).append(r)
    levels = [_level(x, g, rows, slo) for x, g in sorted(groups.items())]
    itl = prefix.with_name(prefix.name + "_itl.csv")
    return Report(
        title=f"Load test {prefix.name}",
        source=str(requests),
        x_label="concurrent users" if closed else "offered load (requests/s)",
        levels=levels,
        slo=slo,
        ttft_samples=[r.ttft for r in rows if r.ok and r.ttft is not None],
        itl_buckets=_read_itl(itl) if itl.exists() else [],
        offered_is_rate=not closed,
    )


@dataclass(frozen=True)
class _Row:
    start: float
    offered: float
    users: int
    completion: int
    ttft: float | None
    tpot: float | None
    e2e: float
    ok: bool

    @property
    def end(self) -> float:
        return self.start + self.e2e

    def good(self, slo: tuple[float, float]) -> bool:
        return (
            self.ok
            and self.ttft is not None
            and self.ttft <= slo[0]
            and (self.tpot is None or self.tpot <= slo[1])
        )


def _read_rows(path: Path) -> list[_Row]:
    need = {"start_unix_s", "offered_rps", "users", "ttft_s", "tpot_s", "e2e_s", "ok"}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise ReportError(f"{path}: missing columns {sorted(missing)}")
        try:
            return [_row(r) for r in reader]
        except ValueError as exc:
            raise ReportError(f"{path}: line {reader.line_num}: {exc}") from exc


def _row(r: dict[str, str]) -> _Row:
    def opt(key: str) -> float | None:
        return float(r[key]) if r.get(key) else None

    return _Row(
        start=float(r["start_unix_s"]),
        offered=float(r["offered_rps"] or 0),
        users=int(float(r["users"] or 0)),
        completion=int(float(r.get("completion_tokens") or 0)),
        ttft=opt("ttft_s"),
        tpot=opt("tpot_s"),
        e2e=float(r["e2e_s"] or 0),
        ok=r["ok"] == "1",
    )


def _level(offered: float, group: list[_Row], rows: list[_Row], slo: tuple[float, float]) -> Level:
    """A load level: latencies of its own requests, throughput of what finished meanwhile."""
    ok = [r for r in group if r.ok]
    t0 = min(r.start for r in group)
    t1 = max(r.start for r in group)
    if t1 - t0 >= 1.0 and len(group) >= 2:
        span = (t1 - t0) * len(group) / (len(group) - 1)  # n arrivals span n − 1 gaps
        done = [r for r in rows if r.ok and t0 <= r.end < t0 + span]
    else:  # too short a level to window: its own requests over their own span
        span = max(r.end for r in group) - t0
        done = ok
    span = span or math.inf
    return Level(
        offered=offered,
        requests=len(group),
        failed=len(group) - len(ok),
        ttft=Quantiles.of([r.ttft for r in ok if r.ttft is not None]),
        tpot=Quantiles.of([r.tpot for r in ok if r.tpot is not None]),
        itl=None,
        throughput_rps=len(done) / span,
        tokens_per_s=sum(r.completion for r in done) / span,
        goodput_rps=sum(1 for r in done if r.good(slo)) / span,
    )


def _read_itl(path: Path) -> list[tuple[float, int]]:
    with path.open(newline="") as f:
        return [
            (math.inf if r["le_s"] == "+Inf" else float(r["le_s"]), int(r["count"]))
            for r in csv.DictReader(f)
        ]


def load_simulations(
    paths: Sequence[Path], slo_ttft: float | None, slo_tpot: float | None
) -> Report:
    runs = [run for p in paths for run in _json_objects(p)]
    slo_in = runs[0].get("slo") or {}
    slo = (
        slo_ttft or float(slo_in.get("ttft_s", DEFAULT_SLO[0])),
        slo_tpot or float(slo_in.get("tpot_s", DEFAULT_SLO[1])),
    )
    offered_key = next((k for k in ("offered_rps", "rate") if all(k in r for r in runs)), None)
    levels = sorted((_sim_level(r, offered_key) for r in runs), key=lambda lv: lv.offered)
    return Report(
        title="Simulation" if len(runs) == 1 else f"Simulations ({len(runs)} runs)",
        source=", ".join(str(p) for p in paths),
        x_label="offered load (requests/s)" if offered_key else "achieved load (requests/s)",
        levels=levels,
        slo=slo,
        offered_is_rate=offered_key is not None,
    )


def _json_objects(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc}") from exc
    try:
        data = json.loads(text)
        objects = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            objects = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: not JSON or JSON lines: {exc}") from exc
    for obj in objects:
        if not isinstance(obj, dict) or "ttft_s" not in obj or "requests_per_s" not in obj:
            raise ReportError(f"{path}: not pdgate simulate --json output")
    return objects


def _sim_level(m: dict[str, Any], offered_key: str | None) -> Level:
    rps = float(m["requests_per_s"])
    return Level(
        offered=float(m[offered_key]) if offered_key else rps,
        requests=int(m.get("requests", 0)),
        failed=int(m.get("failed", 0)),
        ttft=Quantiles.from_dict(m.get("ttft_s")),
        tpot=Quantiles.from_dict(m.get("tpot_s")),
        itl=Quantiles.from_dict(m.get("itl_s")),
        throughput_rps=rps,
        tokens_per_s=float(m.get("output_tokens_per_s", 0.0)),
        goodput_rps=float(m.get("goodput_requests_per_s", 0.0)),
    )


# -- writing ---------------------------------------------------------------------------------


def write(report: Report, out: Path) -> list[Path]:
    """The three plots and the summary; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    out.mkdir(parents=True, exist_ok=True)
    files = [
        plot_distribution(report, "ttft", out / "ttft.png"),
        plot_distribution(report, "itl", out / "itl.png"),
        plot_load(report, out / "load.png"),
    ]
    summary = out / "summary.md"
    summary.write_text(markdown(report, [f.name for f in files]))
    return [*files, summary]


def itl_quantiles(report: Report) -> Quantiles | None:
    """ITL over the whole run: from the bucketed gaps, or the levels' own summaries."""
    if report.itl_buckets and sum(c for _, c in report.itl_buckets):
        b = report.itl_buckets
        total = sum(c for _, c in b)
        lowers = [0.0, *(u for u, _ in b[:-1])]
        mids = [
            (lo * up) ** 0.5 if lo > 0 and math.isfinite(up) else up
            for lo, (up, _) in zip(lowers, b, strict=True)
        ]
        mean = sum(m * c for m, (_, c) in zip(mids, b, strict=True) if math.isfinite(m)) / total
        return Quantiles(mean, *(bucket_quantile(b, q) for q in QUANTILES))
    levels = [lv.itl for lv in report.levels if lv.itl is not None]
    return levels[0] if len(levels) == 1 else None


def markdown(report: Report, images: Iterable[str]) -> str:
    """A short summary: the setup, a table per load level, the plots."""
    ttft_target, tpot_target = report.slo
    lines = [
        f"# {report.title}",
        "",
        f"Source: `{report.source}`. Goodput: TTFT ≤ {ttft_target:g} s and "
        f"TPOT ≤ {tpot_target:g} s.",
        "",
    ]
    lines += _headline(report)
    lines += [
        "",
        f"| {report.x_label} | requests | failed | req/s | goodput req/s | output tok/s "
        "| TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in report.levels:
        lines.append(
            f"| {lv.offered:.3g} | {lv.requests} | {lv.failed} | {lv.throughput_rps:.2f} "
            f"| {lv.goodput_rps:.2f} | {lv.tokens_per_s:,.0f} "
            f"| {_ms(lv.ttft, 'p50')} | {_ms(lv.ttft, 'p99')} "
            f"| {_ms(lv.tpot, 'p50')} | {_ms(lv.tpot, 'p99')} |"
        )
    lines.append("")
    lines += [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def _headline(report: Report) -> list[str]:
    out = []
    total = sum(lv.requests for lv in report.levels)
    failed = sum(lv.failed for lv in report.levels)
    out.append(f"{total} requests, {failed} failed, over {len(report.levels)} load level(s).")
    ttft = Quantiles.of(report.ttft_samples)
    if ttft is not None:
        out.append(f"TTFT p50 {_fmt(ttft.p50)}, p90 {_fmt(ttft.p90)}, p99 {_fmt(ttft.p99)}.")
    itl = itl_quantiles(report)
    if itl is not None:
        out.append(f"ITL p50 {_fmt(itl.p50)}, p90 {_fmt(itl.p90)}, p99 {_fmt(itl.p99)}.")
    best = max(report.levels, key=lambda lv: lv.goodput_rps)
    out.append(
        f"Best goodput {best.goodput_rps:.2f} req/s at {best.offered:.3g} ({report.x_label})."
    )
    return [" ".join(out)]


def _ms(q: Quantiles | None, attr: str) -> str:
    return _fmt(getattr(q, attr)) if q is not None else "–"


def _fmt(seconds: float) -> str:
    if math.isnan(seconds):
        return "–"
    if seconds < 1.0:
        return f"{seconds * 1000:.3g} ms"
    return f"{seconds:.3g} s"


# -- plots (matplotlib is imported only here) --------------------------------------------------


def plot_distribution(report: Report, what: str, path: Path) -> Path:
    """TTFT or ITL: a histogram with its CDF when samples exist, else percentiles per level."""
    import matplotlib.pyplot as plt

    label = "TTFT" if what == "ttft" else "inter-token latency"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    values, weights = _distribution(report, what)
    if values:
        # ITL values are bucket midpoints: bin at the buckets' own edges.
        bins = _log_bins(min(values), max(values), 20 if what == "ttft" else 10)
        ax.hist(values, bins=bins, weights=weights, color="#4c72b0", alpha=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (s)")
        ax.set_ylabel("requests" if what == "ttft" else "tokens")
        _cdf(ax.twinx(), values, weights)
    else:
        _percentile_lines(ax, report, what)
        ax.set_ylabel(f"{label} (s)")
    if what == "ttft":  # the target, across the axis the latency is on
        target = ax.axvline if values else ax.axhline
        target(report.slo[0], color="#c44e52", ls="--", lw=1)
    ax.set_title(_wrap(f"{report.title}: {label}"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _distribution(report: Report, what: str) -> tuple[list[float], list[float]]:
    """(values, weights): TTFT samples, or ITL bucket midpoints weighted by their counts."""
    if what == "ttft":
        return report.ttft_samples, [1.0] * len(report.ttft_samples)
    values, weights, lower = [], [], 0.0
    for upper, count in report.itl_buckets:
        if count and math.isfinite(upper):
            values.append((lower * upper) ** 0.5 if lower > 0 else upper)
            weights.append(float(count))
        lower = upper
    return values, weights


def _log_bins(lo: float, hi: float, per_decade: int) -> list[float]:
    """Edges at 10^(k / per_decade) around [lo, hi] (the ITL buckets' edges for 10)."""
    first = math.floor(math.log10(max(lo, 1e-9)) * per_decade)
    last = math.ceil(math.log10(max(hi, lo)) * per_decade) + 1
    return [10 ** (k / per_decade) for k in range(first, last + 1)]


def _cdf(ax: Any, values: list[float], weights: list[float]) -> None:
    pairs = sorted(zip(values, weights, strict=True))
    total = sum(weights)
    xs, ys, acc = [], [], 0.0
    for v, w in pairs:
        acc += w
        xs.append(v)
        ys.append(acc / total)
    ax.plot(xs, ys, color="#dd8452", lw=1.5)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("cumulative share", color="#dd8452")


def _percentile_lines(ax: Any, report: Report, what: str) -> None:
    xs = [lv.offered for lv in report.levels]
    for q in ("p50", "p90", "p99"):
        ys = [_attr(lv.ttft if what == "ttft" else lv.itl, q) for lv in report.levels]
        ax.plot(xs, ys, marker="o", label=q)
    ax.set_yscale("log")
    ax.set_xlabel(report.x_label)
    ax.legend()


def _wrap(title: str) -> str:
    return textwrap.fill(title, 70)


def _attr(q: Quantiles | None, name: str) -> float:
    return float(getattr(q, name)) if q is not None else math.nan


def plot_load(report: Report, path: Path) -> Path:
    """Throughput and goodput, then TTFT percentiles, against the offered load."""
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), dpi=100, sharex=True)
    xs = [lv.offered for lv in report.levels]
    top.plot(xs, [lv.throughput_rps for lv in report.levels], marker="o", label="throughput")
    top.plot(xs, [lv.goodput_rps for lv in report.levels], marker="s", label="goodput")
    if report.offered_is_rate:
        top.plot(xs, xs, color="grey", ls=":", lw=1, label="offered")
    top.set_ylabel("requests/s")
    top.legend(loc="upper left")
    tokens = top.twinx()
    tokens.plot(xs, [lv.tokens_per_s for lv in report.levels], color="#55a868", ls="--")
    tokens.set_ylabel("output tokens/s (dashed)", color="#55a868")
    top.set_title(_wrap(f"{report.title}: throughput, goodput and TTFT"), fontsize=10)
    for q in ("p50", "p90", "p99"):
        bottom.plot(xs, [_attr(lv.ttft, q) for lv in report.levels], marker="o", label=f"TTFT {q}")
    bottom.axhline(report.slo[0], color="#c44e52", ls="--", lw=1, label="TTFT target")
    bottom.set_yscale("log")
    bottom.set_ylabel("TTFT (s)")
    bottom.set_xlabel(report.x_label)
    bottom.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
