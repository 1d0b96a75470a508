"""How many prefill and decode workers a disaggregated row ran, where the row does not say.

Most disaggregated rows of the measured sample give each role's parallel layout but neither
worker counts nor batch sizes. Simulating them as one prefill and one decode worker puts
thousands of clients behind a single worker of each kind, which no benchmark of a tuned
deployment did. The rows that do record their deployment show how such runs are set up:
every one of them runs ``decode_batch × attention_dp × decode_workers = C``, the decode pool
holds all ``C`` clients at once. So the missing deployment is inferred from how such sweeps
are run and from physics:

1. **Decode pool.** One decode worker holds at most ``B_max`` sequences: the fewer of its
   engine's batch cap and its KV capacity at full length (``isl + osl`` per sequence:
   TensorRT-LLM's default admission reserves a request's whole completion, and a sequence
   that does not fit waits outside the batch).

   a. *The sweep's own pool* (:func:`sweep_pool`). A benchmark sweep keeps one deployment and
      steps each decode rank's batch through powers of two, so ``C = y · dp · 2^k``: the odd
      part of ``C / dp`` is the number of decode workers (26 of the 33 recorded deployments
      read so; the TensorRT-LLM H200 1k/1k series runs nine workers at ``C`` = 36 … 576). It
      is taken where those workers fit ``MAX_DECODE_GPUS`` and their batch fits ``B_max``.
   b. *Otherwise the fewest workers that hold every client* (:func:`decode_pool`):
      ``y = ⌈C / B_max⌉`` workers each take ``b = ⌈C / y⌉`` clients.
2. **Prefill pool** (:func:`prefill_workers`, DistServe's rate matching). With every client
   decoding at the TPOT of batch ``b``, the closed loop runs at ``λ = C / (t_prefill + (osl −
   1) · TPOT(b))`` requests per second, its fastest pace (no queueing). One prefill worker
   serves ``μ_p`` prompts per second (:func:`gateway.sim.plan.sizing.prefill_rate`); the pool
   gets ``x = ⌈λ / (ρ · μ_p)⌉`` workers, ``ρ`` the highest utilisation a deployment is sized to
   (:data:`PREFILL_UTILISATION`).

Example::

    sizing = infer_pools(concurrency=576, isl=1024, osl=1024, prefill=p_dep, decode=d_dep)
    sizing.prefill_workers, sizing.decode_workers, sizing.decode_batch
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from backends.emulator.catalog import Deployment
from gateway.sim.plan.sizing import decode_step, prefill_rate, prefill_time

# The highest prefill-pool utilisation a deployment is sized to. Chosen on the train half of
# the disaggregated rows (docs/accuracy.md, "Disaggregated rows").
PREFILL_UTILISATION = 1.0

# The largest decode pool a sweep's concurrency is read as (sixteen 8-GPU nodes); an odd part
# of ``C / dp`` that would need more GPUs is a client count, not a worker count.
MAX_DECODE_GPUS = 128


@dataclass(frozen=True, slots=True)
class PoolSizing:
    """An inferred xPyD deployment: worker counts, the decode batch per worker (over its
    attention data-parallel ranks), and the figures they came from."""

    prefill_workers: int
    decode_workers: int
    decode_batch: int
    decode_cap: int  # B_max: sequences one decode worker can hold
    tpot_s: float  # decode step at the decode batch, mean context
    rate: float  # requests per second of the closed loop without queueing
    prefill_rate: float  # prompts per second of one prefill worker
    swept: bool  # the decode pool was read off the sweep (:func:`sweep_pool`)


def decode_cap(dep: Deployment, isl: int, osl: int) -> int:
    """Sequences one decode worker holds: its batch cap and its KV capacity at ``isl + osl``
    tokens per sequence."""
    return min(dep.engine.max_num_seqs, int(dep.kv_capacity_tokens // (isl + osl)))


def decode_pool(concurrency: int, cap: int) -> tuple[int, int]:
    """``(workers, batch per worker)``: the fewest decode workers of ``cap`` sequences each
    that hold ``concurrency`` clients, the clients spread evenly."""
    if cap < 1:
        raise ValueError("a decode worker must hold at least one sequence")
    c = max(1, concurrency)
    workers = math.ceil(c / cap)
    return workers, math.ceil(c / workers)


def sweep_pool(concurrency: int, dp: int, gpus: int, cap: int) -> tuple[int, int] | None:
    """``(workers, batch per worker)`` of a sweep that steps each decode rank's batch through
    powers of two: ``concurrency = workers · dp · 2^k`` with ``workers`` odd. ``None`` where
    ``concurrency`` is not a multiple of ``dp``, the workers (``gpus`` each) would exceed
    :data:`MAX_DECODE_GPUS`, or a worker's batch would exceed ``cap``."""
    if dp < 1 or gpus < 1 or concurrency < 1 or concurrency % dp:
        return None
    odd = concurrency // dp
    while odd % 2 == 0:
        odd //= 2
    batch = concurrency // odd
    if odd * gpus > MAX_DECODE_GPUS or batch > cap:
        return None
    return odd, batch


def prefill_workers(rate: float, worker_rate: float, utilisation: float) -> int:
    """DistServe's rate matching: prefill workers of ``worker_rate`` prompts per second each,
    run at most at ``utilisation``, to take ``rate`` prompts per second."""
    if worker_rate <= 0 or not 0 < utilisation <= 1:
        raise ValueError("a prefill worker's rate and the utilisation must be positive")
    return max(1, math.ceil(rate / (utilisation * worker_rate) - 1e-9))


def infer_pools(
    *,
    concurrency: int,
    isl: int,
    osl: int,
    prefill: Deployment,
    decode: Deployment,
    utilisation: float = PREFILL_UTILISATION,
) -> PoolSizing:
    """The xPyD deployment a closed loop of ``concurrency`` clients at fixed ``isl``/``osl``
    is taken to have run on (module docstring): ``prefill`` and ``decode`` are one worker of
    each role with the row's layouts."""
    cap = decode_cap(decode, isl, osl)
    layout = decode.layout
    swept = sweep_pool(concurrency, layout.dp, layout.devices, cap)
    y, batch = swept or decode_pool(concurrency, cap)
    tpot = decode_step(decode, batch, isl + osl / 2)
    rate = concurrency / (prefill_time(prefill, isl) + (osl - 1) * tpot)
    mu = prefill_rate(prefill, isl)
    x = prefill_workers(rate, mu, utilisation)
    return PoolSizing(x, y, batch, cap, tpot, rate, mu, swept is not None)
