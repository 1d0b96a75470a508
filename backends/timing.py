"""Device timing physics: pure functions from a step's composition to seconds.

Nothing here sleeps, reads a clock or does I/O. Device constants come from
``config/devices/*.yaml`` (with their sources); model shapes from ``config/models/*.yaml``.

A *step* is one forward pass of a continuous-batching engine. Its composition is summarised
by :class:`StepShape`: how many new tokens are computed (prefill chunk tokens plus one per
decoding sequence), how much attention work they do over their context, how many context
tokens' KV must be read, and how many sequences take part.

Three device families are modelled, each by one function:

* :func:`hbm_step_time` — GPUs and other HBM accelerators (roofline),
* :func:`pipeline_step_time` — SRAM-resident pipelines (Groq LPU) and wafer-scale engines
  (Cerebras WSE), whose per-token latency is a sum of per-layer and per-hop latencies,
* :func:`kv_transfer_time` — the prefill→decode KV handoff over a link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DTYPE_BYTES: dict[str, float] = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "fp4": 0.5}


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one engine step computes.

    ``attn_pairs`` is the number of (query, key) pairs attention touches:
    for a sequence computing ``n`` new tokens over ``c`` tokens already cached it is
    ``n · (c + (n + 1) / 2)`` (causal attention within the chunk).
    """

    new_tokens: int
    attn_pairs: float
    kv_read_tokens: int
    seqs: int

    @staticmethod
    def of(chunks: list[tuple[int, int]]) -> StepShape:
        """Build a shape from ``(new_tokens, cached_context)`` per scheduled sequence."""
        new = sum(n for n, _ in chunks)
        pairs = sum(n * (c + (n + 1) / 2) for n, c in chunks)
        kv_read = sum(c for _, c in chunks)
        return StepShape(new, pairs, kv_read, len(chunks))


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The numbers of a model the physics needs, already scaled to the serving dtype."""

    layers: int
    hidden: int
    attn_width: int  # q_heads · head_dim
    active_params: float  # parameters touched per token
    dense_weight_bytes: float  # weights every token reads (attention, shared experts, embeddings)
    expert_weight_bytes: float  # all routed experts together (0 for dense models)
    experts: int
    top_k: int
    kv_bytes_per_token: float
    act_bytes: float  # bytes per activation element (for tensor-parallel all-reduce)


def forward_flops(m: ModelShape, s: StepShape) -> float:
    """FLOPs of one step: ``2 · P_active · new_tokens + 4 · layers · attn_width · attn_pairs``.

    The second term is QKᵀ and AV (two multiply-adds per (query, key) pair per head dim).
    """
    return 2.0 * m.active_params * s.new_tokens + 4.0 * m.layers * m.attn_width * s.attn_pairs


def weight_bytes_read(m: ModelShape, tokens: int) -> float:
    """Weights read by one step.

    Dense models read every weight. A mixture-of-experts step reads the dense part plus the
    experts its tokens actually route to: with ``E`` experts, top-``k`` routing and ``N`` tokens,
    the expected fraction of experts touched is ``1 − (1 − k/E)^N``.
    """
    if m.experts <= 0 or tokens <= 0:
        return m.dense_weight_bytes + m.expert_weight_bytes
    touched = 1.0 - (1.0 - m.top_k / m.experts) ** tokens
    return m.dense_weight_bytes + m.expert_weight_bytes * touched


def step_bytes(m: ModelShape, s: StepShape) -> float:
    """HBM bytes moved by one step: weights read + context KV read + new KV written."""
    kv = (s.kv_read_tokens + s.new_tokens) * m.kv_bytes_per_token
    return weight_bytes_read(m, s.new_tokens) + kv


@dataclass(frozen=True, slots=True)
class HbmConstants:
    """Per-instance constants of an HBM roofline device (aggregated over ``tp`` devices)."""

    peak_flops: float  # dense FLOP/s of one device at the serving dtype
    bandwidth: float  # bytes/s of one device
    mfu: float  # achieved fraction of peak FLOP/s
    bandwidth_efficiency: float  # achieved fraction of HBM bandwidth (η)
    step_overhead_s: float
    layer_overhead_s: float
    tp: int
    interconnect: float  # bytes/s per direction between the tp devices
    allreduce_latency_s: float


def allreduce_time(m: ModelShape, s: StepShape, c: HbmConstants) -> float:
    """Tensor-parallel communication: two ring all-reduces per layer.

    Each moves ``2 · (tp − 1) / tp · new_tokens · hidden · act_bytes`` bytes per device.
    """
    if c.tp <= 1:
        return 0.0
    payload = 2.0 * (c.tp - 1) / c.tp * s.new_tokens * m.hidden * m.act_bytes
    return 2 * m.layers * (c.allreduce_latency_s + payload / c.interconnect)


def hbm_step_time(m: ModelShape, s: StepShape, c: HbmConstants) -> float:
    """Roofline step time of an HBM device::

        t = max(FLOPs / (MFU · peak · tp), bytes / (η · BW · tp))
            + step_overhead + layers · layer_overhead + t_allreduce

    Small-batch decode is bound by weight reads; large-batch decode by KV reads; prefill by
    FLOPs.
    """
    t_compute = forward_flops(m, s) / (c.mfu * c.peak_flops * c.tp)
    t_memory = step_bytes(m, s) / (c.bandwidth_efficiency * c.bandwidth * c.tp)
    overhead = c.step_overhead_s + m.layers * c.layer_overhead_s
    return max(t_compute, t_memory) + overhead + allreduce_time(m, s, c)


@dataclass(frozen=True, slots=True)
class PipelineConstants:
    """Constants of an SRAM-resident pipeline (LPU chips or wafers) serving one model copy.

    ``latency_s`` is the time one token takes through the whole pipeline:
    ``τ0 + layers · τ_layer`` for an LPU, ``layers · τ_layer + hops · τ_hop`` for wafer-scale.
    ``slots`` is how many sequences the pipeline holds at once before it has to run a second
    wave. ``compute_flops`` is the achieved FLOP/s of all chips together.
    """

    latency_s: float
    slots: int
    compute_flops: float


def pipeline_step_time(m: ModelShape, s: StepShape, c: PipelineConstants) -> float:
    """Step time of an SRAM-resident pipeline::

        t = ceil(seqs / slots) · latency + FLOPs / compute_flops

    Flat in batch until the pipeline's slots are full, then one more pass per wave; prefill
    streams its tokens through the pipeline, so long prompts add compute time on top of one
    pipeline latency.
    """
    waves = max(1, math.ceil(s.seqs / c.slots))
    return waves * c.latency_s + forward_flops(m, s) / c.compute_flops


@dataclass(frozen=True, slots=True)
class Link:
    """A KV-transfer link between a prefill and a decode instance."""

    name: str
    bandwidth: float  # bytes/s, nominal
    efficiency: float  # achieved fraction of nominal bandwidth (η)
    setup_s: float  # per-transfer fixed cost (handshake, registration)
    per_descriptor_s: float  # cost of posting one transfer descriptor (one KV block)


def kv_transfer_time(link: Link, kv_bytes: float, descriptors: int) -> float:
    """KV handoff time: ``setup + descriptors · τ_desc + bytes / (η · bandwidth)``."""
    return (
        link.setup_s
        + descriptors * link.per_descriptor_s
        + kv_bytes / (link.efficiency * link.bandwidth)
    )
