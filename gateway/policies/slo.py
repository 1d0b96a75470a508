"""SLO-aware routing: lowest predicted TTFT, and an immediate 429 when no worker can make it.

Each candidate predicts how long a prompt of this length would take to prefill there, queue
included (emulated instances from their device model and engine queue). The lowest prediction
wins. When even that exceeds the request's TTFT target (config ``slo.ttft_s``, or the
``X-PDGate-TTFT-Target`` header), the request is refused before any work is spent on it.
Candidates that cannot predict (real upstreams) rank after those that can, by load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gateway.errors import Overloaded
from gateway.policies import C, PolicyBase, PolicyDeps, RouteRequest


class SloAware(PolicyBase):
    def __init__(self, deps: PolicyDeps) -> None:
        self._store = deps.store

    def choose(self, candidates: Sequence[C], request: RouteRequest) -> C:
        best, best_key = candidates[0], (math.inf, math.inf)
        for c in candidates:
            predicted = c.estimate_prefill_s(request.prompt_tokens)
            key = (math.inf if predicted is None else predicted, self._store.load(c.id).requests)
            if key < best_key:
                best, best_key = c, key
        predicted = best_key[0]
        target = request.ttft_target_s
        if target is not None and predicted != math.inf and predicted > target:
            raise Overloaded(
                f"no worker can meet the {target:g} s TTFT target "
                f"(best predicted {predicted:.3f} s)",
                retry_after_s=max(1.0, predicted - target),
                reason="slo_unattainable",
            )
        return best
