"""Measured rows that no prediction from their recorded inputs can match, found from the rows.

Grading a timing model on measured runs assumes each run measured what its row records. Two
checks find the rows where that cannot hold, so a fidelity figure can say how much of its miss
is the model's and how much the data's:

* **Identical inputs, different results** (:func:`gateway.sim.silicon.ceiling`): rows whose
  inputs match but whose measurements lie further apart than the tolerance. One prediction
  serves them all, so only the largest subset inside one band can be hit.
* **Faster than one sequence alone** (:func:`faster_than_alone`): every running sequence waits
  for the whole decode step, so no batch decodes a sequence faster than the same layout decodes
  one sequence alone. A measured TPOT so far below the emulated TPOT of one client alone on the
  row's own (decode) layout that no prediction at or above that floor lies within the TPOT
  tolerance of it (``m · (1 + tol) < t₁``) decoded more than one token per step, or ran on a
  layout the row does not record. Speculative decoding (DeepSeek's multi-token prediction) is
  the usual cause; the rows do not say whether it was on.

The floor is the emulation's single-sequence step, so it is as good as that step, which the
aggregated rows at one to eight clients grade (``docs/accuracy.md``). Both checks together give
:attr:`Audit.tpot_attainable`: the best TPOT share any prediction no faster than one sequence
alone can reach.

Example::

    alone = [predict(single_client(row)) for row in rows]
    print(audit_table(rows, alone))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gateway.sim.silicon import (
    TPOT_TOLERANCE,
    Prediction,
    SiliconRow,
    ceiling,
    inputs_of,
    most_within,
    percent,
)


def single_client(row: SiliconRow) -> SiliconRow:
    """``row`` with one client: its fastest decode on the layouts it records (a recorded
    deployment keeps its workers; an inferred one shrinks to one worker of each role)."""
    return replace(row, concurrency=1)


def faster_than_alone(measured_ms: float, alone_ms: float, tol: float = TPOT_TOLERANCE) -> bool:
    """Whether a measured TPOT is out of reach of every prediction at or above the
    single-sequence TPOT ``alone_ms``: ``measured · (1 + tol) < alone``."""
    return measured_ms * (1 + tol) < alone_ms


@dataclass(frozen=True, slots=True)
class Audit:
    """What :func:`audit` finds on a set of rows (those with both measurements and a
    single-sequence prediction)."""

    rows: int
    inputs: int  # distinct inputs among them
    faster: tuple[tuple[SiliconRow, float], ...]  # rows faster than one alone, with t₁ (ms)
    tpot_ceiling: float  # identical inputs only (:func:`gateway.sim.silicon.ceiling`)
    ttft_ceiling: float
    tpot_attainable: float  # identical inputs and the single-sequence floor together


def audit(
    rows: Sequence[SiliconRow], alone: Sequence[Prediction], tol: float = TPOT_TOLERANCE
) -> Audit:
    """Both checks on ``rows``; ``alone[i]`` is the emulation of ``single_client(rows[i])``.
    Rows without both measurements or without a single-sequence TPOT are left out."""
    graded = [
        (r, a.tpot_ms)
        for r, a in zip(rows, alone, strict=True)
        if r.tpot_ms and r.ttft_ms and a.tpot_ms is not None
    ]
    if not graded:
        return Audit(0, 0, (), math.nan, math.nan, math.nan)
    faster = tuple((r, t1) for r, t1 in graded if faster_than_alone(r.tpot_ms or 0.0, t1, tol))
    groups: dict[tuple[object, ...], list[tuple[float, float]]] = {}
    for r, t1 in graded:
        groups.setdefault(inputs_of(r), []).append((r.tpot_ms or 0.0, t1))
    # Identical inputs give the same single-sequence prediction; min() only guards rounding.
    reach = sum(
        most_within([m for m, _ in g], tol, min(t1 for _, t1 in g)) for g in groups.values()
    )
    c = ceiling([r for r, _ in graded], tpot_tol=tol)
    return Audit(
        rows=len(graded),
        inputs=len(groups),
        faster=faster,
        tpot_ceiling=c.tpot_within,
        ttft_ceiling=c.ttft_within,
        tpot_attainable=reach / len(graded),
    )


def audit_table(rows: Sequence[SiliconRow], alone: Sequence[Prediction]) -> str:
    """The rows faster than one sequence alone, then :func:`audit` of all rows and of each
    mode as a table."""
    everything = audit(rows, alone)
    lines = [
        f"{r.id}: TPOT {r.tpot_ms:.2f} ms measured, {t1:.2f} ms for one sequence alone "
        f"({(r.tpot_ms or 0.0) / t1:.2f}x)"
        for r, t1 in everything.faster
    ]
    if lines:
        lines.append("")
    lines.append(
        f"{'group':<14} {'rows':>5} {'inputs':>6} {'faster than one alone':>22} "
        f"{'TPOT±15% ceiling':>17} {'TPOT±15% attainable':>20} {'TTFT±25% ceiling':>17}"
    )
    modes = sorted({r.mode for r in rows})
    by_mode = {m: [i for i, r in enumerate(rows) if r.mode == m] for m in modes}
    parts = [("all", everything)] + [
        (f"mode={m}", audit([rows[i] for i in idx], [alone[i] for i in idx]))
        for m, idx in by_mode.items()
    ]
    for name, a in parts:
        share = len(a.faster) / a.rows if a.rows else math.nan
        faster = f"{len(a.faster)} ({percent(share)})"
        lines.append(
            f"{name:<14} {a.rows:>5} {a.inputs:>6} {faster:>22} {percent(a.tpot_ceiling):>17} "
            f"{percent(a.tpot_attainable):>20} {percent(a.ttft_ceiling):>17}"
        )
    return "\n".join(lines)
