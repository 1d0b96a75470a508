"""What a plan prints and writes: the table, JSON, CSV, the Pareto plot and the config."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import yaml

from gateway.sim.plan.evaluate import Outcome, candidate_settings
from gateway.sim.plan.screen import Screened, demand_of
from gateway.sim.plan.search import Evaluated, Plan

MODE_COLOURS = {"aggregated": "tab:blue", "disaggregated": "tab:orange", "conditional": "tab:green"}


def _osl(plan: Plan) -> float:
    return demand_of(plan.request.workload, plan.request.slos).osl


def row(plan: Plan, e: Evaluated) -> dict[str, Any]:
    """One plan as a flat record (the CSV's columns, the JSON's entries)."""
    req, o = plan.request, e.outcome
    tokens_h = req.rate * _osl(plan) * 3600.0
    usd = e.usd_per_hour
    return {
        "chosen": e is plan.best,
        "meets": e.meets,
        "mode": e.candidate.mode,
        "engine": req.engine or "default",
        "pools": "; ".join(
            f"{p.role}: {p.replicas} x {p.instance.label}" for p in e.candidate.pools
        ),
        "heterogeneous": e.candidate.heterogeneous,
        "kv_link": e.candidate.link or "",
        "devices": e.candidate.devices,
        "target_rate": req.rate,
        "sustained_rate": e.max_rate,
        "sustained_rate_is_lower_bound": e.capped,
        # What the analytic screen predicted, for the counts it proposed (the simulation may
        # then have added or removed instances).
        "screened_rate": e.screened.est_rate,
        "screened_devices": e.screened.candidate.devices,
        **{k: v for k, v in o.values.items()},
        "attainment": o.attainment,
        "goodput": o.goodput,
        "usd_per_hour": usd,
        "usd_per_million_output_tokens": usd * 1e6 / tokens_h if usd is not None else None,
        "joules_per_output_token": e.watts * 3600.0 / tokens_h if e.watts is not None else None,
        "headroom": e.max_rate / req.rate,
        "binding": o.binding,
        "tokens_per_s_per_user": o.tokens_per_s_per_user,
        "simulations": e.sims,
        **{f"goodput {k}": v.goodput for k, v in e.robustness.items()},
    }


def _outcome(o: Outcome) -> dict[str, Any]:
    return {
        "rate": o.rate,
        "meets": o.meets,
        "binding": o.binding,
        **o.values,
        "attainment": o.attainment,
        "goodput": o.goodput,
        "failed": o.failed,
    }


def as_json(plan: Plan) -> dict[str, Any]:
    req = plan.request
    return {
        "model": req.model,
        "rate": req.rate,
        "slos": [
            {"metric": t.metric, "pct": t.pct, "limit_s": t.limit_s} for t in req.slos.targets
        ],
        "attainment_floor": req.slos.attainment,
        "objective": req.objective,
        "engine": req.engine or "default",
        "verdict": plan.verdict,
        "infeasible": plan.infeasible,
        "candidates_screened": len(plan.screened),
        "candidates_simulated": len(plan.evaluated),
        "simulations": sum(e.sims for e in plan.evaluated) + plan.check_runs,
        "wall_s": plan.wall_s,
        "plans": [_clean(row(plan, e)) for e in plan.evaluated],
        "replay": _clean(_outcome(plan.replay)) if plan.replay else None,
        "robustness": {k: _clean(_outcome(o)) for k, o in plan.robustness.items()},
        "skipped_devices": plan.skipped,
    }


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def as_csv(plan: Plan) -> str:
    rows = [row(plan, e) for e in plan.evaluated]
    out = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, fmt)


ROBUSTNESS = ("rate -25%", "rate +25%", "one instance lost")


def _rate(e: Evaluated) -> str:
    """The sustained rate; '≥' when the plan met the SLOs at every rate probed."""
    return ("≥" if e.capped else "") + format(e.max_rate, ".3g")


def _share(e: Evaluated, name: str) -> str:
    """Goodput in a robustness run as a share of the requests offered ('-' when not run)."""
    o = e.robustness.get(name)
    return "-" if o is None else f"{o.attainment:.0%}"


def table(plan: Plan, limit: int = 10) -> str:
    req = plan.request
    names = [t.name for t in req.slos.targets]
    head = (
        f"{'':2}{'mode':14}{'devices':>8}{'sustained':>10}"
        + "".join(f"{n:>11}" for n in names)
        + f"{'attain':>7}{'$/h':>9}{'$/Mtok':>8}{'J/tok':>7}{'headroom':>9}"
        + f"{'-25%':>6}{'+25%':>6}{'lost':>6}  binding"
    )
    lines = [
        f"pdgate plan: {req.model} at {req.rate:g} req/s, "
        + ", ".join(f"{t.name} ≤ {t.limit_s:g} s" for t in req.slos.targets)
        + f", attainment ≥ {req.slos.attainment:.0%}; objective {req.objective}; "
        + f"engine {req.engine or 'default'}",
        f"{len(plan.screened)} candidates screened, {len(plan.evaluated)} simulated "
        f"({sum(e.sims for e in plan.evaluated)} runs, {plan.check_runs} checks) in "
        f"{plan.wall_s:.1f} s",
        "",
        head,
    ]
    for e in plan.evaluated[:limit]:
        r = row(plan, e)
        mark = "*" if r["chosen"] else (" " if r["meets"] else "x")
        lines.append(
            f"{mark:2}{r['mode']:14}{r['devices']:>8}{_rate(e):>10}"
            + "".join(f"{_num(r[n], '.3g'):>11}" for n in names)
            + f"{r['attainment']:>7.0%}{_num(r['usd_per_hour'], '.2f'):>9}"
            + f"{_num(r['usd_per_million_output_tokens'], '.2f'):>8}"
            + f"{_num(r['joules_per_output_token'], '.2f'):>7}{r['headroom']:>9.2f}"
            + "".join(f"{_share(e, k):>6}" for k in ROBUSTNESS)
            + f"  {r['binding']}"
        )
        lines.append(f"{'':4}{r['pools']}" + (f" (KV over {r['kv_link']})" if r["kv_link"] else ""))
    unpriced = sorted(
        {
            p.instance.device
            for s in plan.screened
            if s.usd_per_hour is None
            for p in s.candidate.pools
        }
        - set(plan.request.prices.priced() if plan.request.prices else [])
    )
    lines.append("")
    if req.robustness and plan.best is not None:
        lines.append(
            "-25% / +25% / lost: share of requests meeting every target at 0.75× and 1.25× the "
            "rate, and with one instance of the largest pool lost"
        )
    if unpriced and req.objective == "cost":
        listed = ", ".join(unpriced)
        lines.append(f"unpriced (left out of the cost ranking; give --price DEVICE=USD): {listed}")
    lines.append(f"verdict: {plan.verdict}")
    if plan.infeasible:
        lines.append(f"infeasible: {plan.infeasible}")
    if plan.replay is not None and plan.best is not None:
        lines.extend(_replay_lines(plan))
    return "\n".join(lines)


def _replay_lines(plan: Plan) -> list[str]:
    assert plan.best is not None
    assert plan.replay is not None
    names = [t.name for t in plan.request.slos.targets]
    planned, replay = plan.best.outcome, plan.replay
    out = [
        "",
        f"{'check':20}{'rate':>7}"
        + "".join(f"{n:>11}" for n in names)
        + f"{'attain':>8}{'goodput':>9}  meets",
    ]
    rows = [("planned", planned), ("replayed (seed+1)", replay), *plan.robustness.items()]
    for name, o in rows:
        out.append(
            f"{name:20}{o.rate:>7.3g}"
            + "".join(f"{_num(o.values.get(n), '.3g'):>11}" for n in names)
            + f"{o.attainment:>8.0%}{o.goodput:>9.3g}  {'yes' if o.meets else 'no: ' + o.binding}"
        )
    if planned.goodput > 0:
        out.append(f"replayed goodput / planned: {replay.goodput / planned.goodput:.3f}")
    return out


def write_config(plan: Plan, path: Path) -> None:
    """The chosen plan as a gateway config for ``pdgate serve --config`` and
    ``pdgate simulate --config``."""
    if plan.best is None:
        raise ValueError("no plan meets the SLOs: nothing to write")
    settings = candidate_settings(plan.best.candidate, plan.request.model, plan.request.slos)
    body = settings.model_dump(mode="json", exclude_defaults=True)
    body["models"][0] = {"name": plan.request.model, "mode": plan.best.candidate.mode} | {
        k: v for k, v in body["models"][0].items() if k != "name"
    }
    header = (
        f"# pdgate plan: {plan.request.model} at {plan.request.rate:g} req/s "
        f"({plan.best.candidate.label}); {plan.verdict}\n"
    )
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (higher is better on both)."""
    best: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not best or y > best[-1][1]:
            best.append((x, y))
    return sorted(best)


def plot(plan: Plan, path: Path) -> None:
    """Output tokens/s per $/hour against tokens/s per user: every screened candidate that
    sustains the rate (small), the simulated ones (large), each mode's frontier, heterogeneous
    plans as crosses, the chosen plan starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    osl = _osl(plan)
    req = plan.request
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for mode, colour in MODE_COLOURS.items():
        pts: list[tuple[float, float]] = []
        for s in plan.screened:
            if s.candidate.mode == mode and s.est_rate >= req.rate and s.usd_per_hour:
                p = _point(s, s.est_rate, 1.0 / s.tpot_s if s.tpot_s > 0 else 0.0, osl)
                if p is not None:
                    pts.append(p)
        sims = [
            (
                e,
                _point(
                    e.screened, e.max_rate, e.outcome.tokens_per_s_per_user, osl, e.usd_per_hour
                ),
            )
            for e in plan.evaluated
            if e.candidate.mode == mode and e.meets and e.usd_per_hour
        ]
        if not pts and not sims:
            continue
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, s=6, color=colour, alpha=0.25)
        front = _frontier(pts + [p for _, p in sims if p is not None])
        if front:
            ax.plot(*zip(*front, strict=True), color=colour, label=f"{mode} frontier")
        for e, p in sims:
            if p is None:
                continue
            marker = "*" if e is plan.best else ("X" if e.candidate.heterogeneous else "o")
            ax.scatter(
                [p[0]],
                [p[1]],
                s=160 if e is plan.best else 60,
                color=colour,
                marker=marker,
                edgecolor="black",
                zorder=3,
            )
    ax.scatter([], [], marker="o", color="grey", edgecolor="black", label="simulated")
    ax.scatter(
        [], [], marker="X", color="grey", edgecolor="black", label="simulated, mixed devices"
    )
    ax.scatter([], [], marker="*", s=160, color="grey", edgecolor="black", label="chosen")
    ax.set_xlabel("output tokens/s per user (1 / TPOT)")
    ax.set_ylabel("output tokens/s per $/hour (at the highest rate under the SLOs)")
    ax.set_title(
        f"{req.model}: {req.rate:g} req/s, "
        + ", ".join(f"{t.name} ≤ {t.limit_s:g} s" for t in req.slos.targets),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _point(
    s: Screened, rate: float, per_user: float, osl: float, usd: float | None = None
) -> tuple[float, float] | None:
    usd = usd if usd is not None else s.usd_per_hour
    if not usd or not math.isfinite(per_user) or per_user <= 0:
        return None
    return per_user, rate * osl / usd
