"""How much one instance sustains under the SLOs, from the engines' own physics, and how
prefill and decode instances are matched (DistServe's rate matching).

Every figure here comes from :meth:`Deployment.step_time`, the function the emulated engines
advance their clocks by, applied to the step a workload's average request makes:

* prefill: a batch of whole prompts inside the chunk budget (``max_num_batched_tokens``),
  or one long prompt in chunks; its service rate ``μ_p`` is prompts per second;
* decode: ``B`` sequences at the mean context ``isl + osl / 2``; ``B`` is the largest batch
  whose step meets the TPOT target, the engine's ``max_num_seqs`` and the KV capacity;
* colocated (an aggregated instance, or a conditional decode instance that prefills a share of
  the prompts itself): prefill steps take a fraction ``f = r · share / μ_p`` of the engine's
  time, stretching every decode step by ``1 / (1 − f)``; the batch then follows from Little's
  law, ``B = r · osl · TPOT``.

TTFT is a prompt's own prefill (at the SLO's percentile of prompt lengths) plus its queueing
wait, taken from M/D/1: mean wait ``ρ / (2 μ (1 − ρ))``, its tail at percentile ``p``
approximated as exponential (``· ln(1 / (1 − p))``). This is a screen: it ranks candidates
and sizes their pools; the simulation decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from backends.emulator.catalog import Deployment
from backends.emulator.timing import Link, StepShape, kv_transfer_time


@dataclass(frozen=True)
class Demand:
    """A workload reduced to what sizing needs: mean lengths, the prompt length at the TTFT
    percentile, and the share of prompts short enough to prefill locally (conditional mode)."""

    isl: float
    osl: float
    isl_tail: float
    local_share: float = 0.0


@dataclass(frozen=True)
class Targets:
    """Latency targets at their percentiles (seconds)."""

    ttft_s: float
    tpot_s: float
    ttft_pct: float = 0.9
    tpot_pct: float = 0.9


@dataclass(frozen=True)
class Capacity:
    """What one instance sustains: requests per second under the targets (0 when it cannot
    meet them at any load), the latencies it then predicts, and which target binds."""

    rate: float
    ttft_s: float
    tpot_s: float
    binding: str


def prefill_time(dep: Deployment, tokens: float) -> float:
    """Seconds to prefill one prompt of ``tokens``, alone, in chunks of the step budget."""
    budget = dep.engine.max_num_batched_tokens
    left, done, total = max(1, round(tokens)), 0, 0.0
    while left > 0:
        n = min(left, budget)
        total += dep.step_time(StepShape(n, n * (done + (n + 1) / 2), done, 1, 0.0, n, 1))
        left -= n
        done += n
    return total


def prefill_rate(dep: Deployment, isl: float) -> float:
    """Prompts per second one instance prefills at full load (whole prompts batched up to the
    step budget and ``max_num_seqs``)."""
    n = max(1, round(isl))
    k = max(1, min(dep.engine.max_num_batched_tokens // n, dep.engine.max_num_seqs))
    if k == 1:
        return 1.0 / prefill_time(dep, n)
    return k / dep.step_time(StepShape(k * n, k * n * (n + 1) / 2, 0, k, 0.0, k * n, k))


def decode_step(dep: Deployment, batch: float, context: float) -> float:
    b = max(1, round(batch))
    c = round(context)
    return dep.step_time(StepShape(b, b * (c + 1.0), b * c, b))


def max_batch(dep: Deployment, demand: Demand) -> int:
    """Sequences that fit at once: the engine's cap and the KV capacity at full length."""
    per_seq = demand.isl + demand.osl
    return max(0, min(dep.engine.max_num_seqs, int(dep.kv_capacity_tokens // per_seq)))


def tail_wait(rate: float, service: float, pct: float) -> float:
    """Queueing wait at percentile ``pct`` of an M/D/1 queue (exponential tail); inf when
    the queue is saturated."""
    rho = rate / service
    if rho >= 1.0:
        return math.inf
    return rho / (2.0 * service * (1.0 - rho)) * math.log(1.0 / (1.0 - pct))


def colocated(
    dep: Deployment, demand: Demand, targets: Targets, share: float, extra_tpot_s: float = 0.0
) -> Capacity:
    """Highest rate one instance sustains when it decodes every request and prefills
    ``share`` of them (1: aggregated; 0: a pure decode instance), by bisection on the rate."""
    context = demand.isl + demand.osl / 2
    limit = max_batch(dep, demand)
    if limit < 1:
        return Capacity(0.0, math.inf, math.inf, "memory")
    mu = prefill_rate(dep, demand.isl) if share > 0 else math.inf
    t_first = prefill_time(dep, demand.isl_tail) if share > 0 else 0.0

    def at(rate: float) -> tuple[float, float, str | None]:
        f = rate * share / mu if share > 0 else 0.0
        if f >= 1.0:
            return math.inf, math.inf, "ttft"
        tpot, batch = decode_step(dep, 1, context), 1.0
        for _ in range(30):  # fixed point of B = r · osl · TPOT(B)
            batch = max(1.0, rate * demand.osl * tpot)
            if batch > limit:
                return math.inf, math.inf, "memory" if limit < dep.engine.max_num_seqs else "tpot"
            tpot = decode_step(dep, batch, context) / (1.0 - f) + extra_tpot_s
        ttft = t_first + tail_wait(rate * share, mu, targets.ttft_pct) if share > 0 else 0.0
        if ttft > targets.ttft_s:
            return ttft, tpot, "ttft"
        if tpot > targets.tpot_s:
            return ttft, tpot, "tpot"
        return ttft, tpot, None

    ttft, tpot, bad = at(1e-9)
    if bad is not None:
        return Capacity(0.0, ttft, tpot, bad)
    lo = 1e-9
    hi = limit / (demand.osl * decode_step(dep, 1, context)) + 1.0
    binding = "tpot"
    for _ in range(40):
        mid = (lo + hi) / 2
        _, _, bad = at(mid)
        if bad is None:
            lo = mid
        else:
            hi, binding = mid, bad
    ttft, tpot, _ = at(lo)
    return Capacity(lo, ttft, tpot, binding)


def prefill_only(dep: Deployment, demand: Demand, targets: Targets, share: float = 1.0) -> Capacity:
    """Highest rate of requests one prefill instance takes while the TTFT target holds
    (``share`` of the requests reach it; conditional mode keeps the rest local)."""
    mu = prefill_rate(dep, demand.isl)
    t_first = prefill_time(dep, demand.isl_tail)
    if t_first > targets.ttft_s:
        return Capacity(0.0, t_first, 0.0, "ttft")
    # tail_wait(λ) ≤ budget  ⇔  ρ / (1 − ρ) ≤ a, with a = 2 μ · budget / ln(1 / (1 − p))
    a = 2.0 * mu * (targets.ttft_s - t_first) / math.log(1.0 / (1.0 - targets.ttft_pct))
    rho = min(a / (1.0 + a), 0.95)
    return Capacity(rho * mu / max(share, 1e-9), targets.ttft_s, 0.0, "ttft")


def kv_handoff_s(prefill: Deployment, link: Link, isl: float) -> float:
    """KV transfer of a mean prompt over ``link`` (the formula the engines charge)."""
    blocks = math.ceil(isl / prefill.engine.block_size)
    return kv_transfer_time(link, isl * prefill.kv_bytes_per_token, blocks)


@dataclass(frozen=True)
class Match:
    """Prefill and decode instances matched so neither starves the other."""

    prefill: int
    decode: int
    rate: float  # requests per second the unit sustains

    def per_device(self, prefill_devices: int = 1, decode_devices: int = 1) -> float:
        return self.rate / (self.prefill * prefill_devices + self.decode * decode_devices)


def match_rates(prefill_rate: float, decode_rate: float) -> Match:
    """DistServe's rate matching: enough prefill instances per decode instance to keep it fed
    (``⌈μ_d / μ_p⌉``), or decode instances per prefill instance when decode is the slower.

    Example (DistServe, §4): prefill 5.6 req/s, decode 10 req/s → two prefill per decode, a
    unit of three devices sustaining 10 req/s, 3.3 req/s per device.
    """
    if prefill_rate <= 0 or decode_rate <= 0:
        raise ValueError("both instance rates must be positive")
    if decode_rate >= prefill_rate:
        n = math.ceil(decode_rate / prefill_rate - 1e-9)
        return Match(n, 1, min(n * prefill_rate, decode_rate))
    n = math.ceil(prefill_rate / decode_rate - 1e-9)
    return Match(1, n, min(prefill_rate, n * decode_rate))


def size_pools(rate: float, prefill_rate: float, decode_rate: float) -> tuple[int, int]:
    """Instances of each pool to sustain ``rate`` requests per second."""
    return (
        max(1, math.ceil(rate / prefill_rate - 1e-9)),
        max(1, math.ceil(rate / decode_rate - 1e-9)),
    )
