"""Prefix-aware routing: send a prompt where its prefix's KV already is, within balance limits.

The prompt's chained block hashes (computed over the whole conversation, not only its first
message) are looked up in the ``StateStore`` prefix index. The worker with the longest match
wins unless it is overloaded relative to the least loaded candidate — more than
``balance_abs_threshold`` outstanding requests above it *and* more than
``balance_rel_threshold`` times its load — so one hot prefix cannot pile onto one worker.
Otherwise, or with no match, the least loaded candidate is chosen. The choice is recorded in the
index so the next request with this prefix finds it.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.policies import C, PolicyBase, PolicyDeps, RouteRequest, option


class PrefixAware(PolicyBase):
    def __init__(self, deps: PolicyDeps) -> None:
        self._store = deps.store
        self.balance_abs = option(deps.options, "balance_abs_threshold", 8)
        self.balance_rel = option(deps.options, "balance_rel_threshold", 1.5)

    def choose(self, candidates: Sequence[C], request: RouteRequest) -> C:
        store = self._store
        loads = [store.load(c.id).requests for c in candidates]
        least = min(range(len(candidates)), key=loads.__getitem__)
        chosen = least
        if request.block_hashes:
            matched = store.match_prefix(request.block_hashes)
            best = max(
                range(len(candidates)),
                key=lambda i: (matched.get(candidates[i].id, 0), -loads[i]),
            )
            if matched.get(candidates[best].id, 0) > 0 and not self._imbalanced(
                loads[best], loads[least]
            ):
                chosen = best
            store.record_prefix(request.block_hashes, candidates[chosen].id)
        return candidates[chosen]

    def _imbalanced(self, load: int, least: int) -> bool:
        return load - least > self.balance_abs and load > self.balance_rel * least
