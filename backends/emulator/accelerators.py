"""Physics of the non-GPU families beyond one step's roofline: pure functions, no I/O.

* :func:`speculative_tokens_per_step`, :func:`speculative_speedup`, :func:`draft_cost_fraction`
  — speculative decoding as an engine setting (the engine draws the acceptances; these are its
  expectations, for planning and for checking the engine),
* :func:`dataflow_placement` — what lives where on a three-tier dataflow deployment (SambaNova
  SN40L: SRAM, HBM, DDR) at a given model size and socket count,
* :func:`wafers_for`, :func:`wafer_token_latency` — a model pipelined over as many wafers as its
  weights need (Cerebras WSE-3),
* :func:`service_ttft` — an API service's time to first token on top of the device's.

Example::

    speculative_speedup(4, 0.7, 0.131)      # 1.82: tokens per unit of target-step time
    dataflow_placement(810e9, 8, 64e9, 0.52e9, 1536e9, 0.9, 0.1).ddr_weight_bytes
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def speculative_tokens_per_step(k: int, acceptance: float) -> float:
    """Expected tokens a verification step yields with ``k`` drafts, each accepted with
    probability ``a`` until the first rejection, plus the target's own token::

        E = 1 + a + a² + … + a^k = (1 − a^(k+1)) / (1 − a)
    """
    if k < 0 or not 0 <= acceptance <= 1:
        raise ValueError(f"need k >= 0 and 0 <= acceptance <= 1, got {k}, {acceptance}")
    if acceptance == 1:
        return float(k + 1)
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


def speculative_speedup(k: int, acceptance: float, draft_fraction: float) -> float:
    """Tokens per unit of plain-step time when a step verifies ``k`` drafts (costing one plain
    step, as a memory-bound verification does) and drafting costs ``k · draft_fraction``::

        speedup = E / (1 + k · draft_fraction)
    """
    return speculative_tokens_per_step(k, acceptance) / (1 + k * draft_fraction)


def draft_cost_fraction(draft_step_s: float, target_step_s: float) -> float:
    """One draft pass as a fraction of a plain target step (the engine's
    ``draft_cost_fraction``): ``draft_step / target_step``."""
    if draft_step_s <= 0 or target_step_s <= 0:
        raise ValueError("step times must be positive")
    return draft_step_s / target_step_s


@dataclass(frozen=True, slots=True)
class TierPlacement:
    """Bytes per tier of a dataflow deployment, all sockets together."""

    sram_working_set_bytes: float  # the fused decoder's buffers: all of SRAM
    hbm_weight_bytes: float
    hbm_kv_bytes: float  # HBM left for the KV cache
    ddr_weight_bytes: float  # weights that did not fit HBM, streamed from DDR every step
    ddr_free_bytes: float  # the rest of DDR: the model library


def dataflow_placement(
    weight_bytes: float,
    sockets: int,
    hbm_bytes: float,
    sram_bytes: float,
    ddr_bytes: float,
    utilisation: float,
    kv_reserve: float,
) -> TierPlacement:
    """Where a model lives on ``sockets`` three-tier sockets (per-socket capacities given).

    SRAM holds the fused decoder's working set, not weights. The weights go to HBM when they
    fit in ``hbm · sockets · utilisation`` with room for at least one KV block; otherwise HBM
    keeps ``kv_reserve`` of itself for KV, takes ``(1 − kv_reserve)`` of itself in weights, and
    the rest of the weights stay in DDR and stream from it every step. DDR's remainder is the
    model library.
    """
    hbm = hbm_bytes * sockets * utilisation
    if weight_bytes <= hbm * (1 - kv_reserve) or (weight_bytes < hbm and kv_reserve == 0):
        in_hbm, in_ddr = weight_bytes, 0.0
    else:
        in_hbm = hbm * (1 - kv_reserve)
        in_ddr = weight_bytes - in_hbm
    ddr = ddr_bytes * sockets
    if in_ddr > ddr:
        raise ValueError(
            f"{weight_bytes / 1e9:.0f} GB of weights do not fit {sockets} sockets' HBM and DDR"
        )
    return TierPlacement(sram_bytes * sockets, in_hbm, hbm - in_hbm, in_ddr, ddr - in_ddr)


def wafers_for(weight_bytes: float, sram_bytes: float, utilisation: float, reserve: float) -> int:
    """The fewest wafers whose SRAM holds the weights with ``reserve`` of it left for KV."""
    return max(1, math.ceil(weight_bytes / (sram_bytes * utilisation * (1 - reserve))))


def wafer_token_latency(layers: int, tau_layer_s: float, wafers: int, tau_hop_s: float) -> float:
    """One token through a layer-wise pipeline of wafers: ``layers · τ_layer + (w − 1) · τ_hop``."""
    return layers * tau_layer_s + (wafers - 1) * tau_hop_s


def service_ttft(
    device_ttft_s: float,
    device_itl_s: float,
    network_rtt_s: float,
    frontend_s: float,
    rebatch_tokens: float,
) -> float:
    """An API's time to first token: the device's, one network round trip, the service's front
    end, and on average half a batch round of a service that re-forms its batch every
    ``rebatch_tokens`` decode steps::

        ttft = device_ttft + rtt + frontend + rebatch_tokens / 2 · device_itl
    """
    return device_ttft_s + network_rtt_s + frontend_s + rebatch_tokens / 2 * device_itl_s
