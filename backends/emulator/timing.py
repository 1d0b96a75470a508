"""Device timing physics: pure functions from a step's composition to seconds.

Nothing here sleeps, reads a clock or does I/O. Device constants come from
``config/devices/*.yaml`` (with their sources); model shapes from ``config/models/*.yaml``.

A *step* is one forward pass of a continuous-batching engine. Its composition is summarised
by :class:`StepShape`: how many new tokens are computed (prefill chunk tokens plus one per
decoding sequence), how much attention work they do over their context, how many context
tokens' KV must be read, and how many sequences take part.

Each device family is modelled by one function:

* :func:`hbm_step_time` — GPUs and other HBM accelerators (roofline),
* :func:`pipeline_step_time` — SRAM-resident pipelines (Groq LPU, Graphcore IPU) and wafer-scale
  engines (Cerebras WSE), whose per-token latency is a sum of per-layer and per-hop latencies,
* :func:`dram_sram_step_time` — LPDDR roofline chips with a large SRAM (MTIA v2): SRAM speed when
  the weights fit there, LPDDR speed when they do not,
* :func:`in_memory_step_time` — in-memory compute over SRAM + LPDDR tiers (d-Matrix Corsair),
* :func:`dataflow_step_time` — three-tier SRAM + HBM + DDR dataflow (SambaNova SN40L), with
  :func:`model_switch_time` for loading another model from DDR,
* :func:`hardwired_step_time` — one model wired into the chip (Taalas HC1),
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
    expert_ffn: int = 0  # intermediate width of one routed expert (0: not known)
    moe_layers: int = 0  # layers with routed experts (MoE models; the rest are dense)
    gemm_input_bytes: float = 2.0  # bytes per GEMM input element (activations quantised to dtype)


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
    kv_bandwidth_efficiency: float | None = None  # η for attention's KV reads (default: η)
    seq_overhead_s: float = 0.0  # per sequence per step (sampling, bookkeeping)
    gemm_half_tokens: float = 0.0  # GEMM rows at which MFU is half its large-batch value


def gemm_efficiency(mfu: float, rows: float, half: float) -> float:
    """MFU of a GEMM with ``rows`` token rows: ``mfu · rows / (rows + half)``.

    Tensor cores need tall tiles: a GEMM over a few hundred tokens leaves most of them idle
    (tile and wave quantisation), one over thousands runs near the large-batch ``mfu``.
    ``half`` = 0 turns the curve off.
    """
    if half <= 0:
        return mfu
    return mfu * rows / (rows + half) if rows > 0 else mfu


def linear_time(
    m: ModelShape, s: StepShape, peak_flops: float, mfu: float, half: float, tp: int = 1
) -> float:
    """Compute time of the linear layers at ``peak_flops`` (all ``tp`` devices), with GEMM
    efficiency by size.

    A device's share of a GEMM is ``rows × N / tp`` outputs; its efficiency is taken at the
    rows of a full-width GEMM of the same size, ``rows / tp``. Dense GEMMs have ``new_tokens``
    rows; each routed expert of a mixture-of-experts layer only its share,
    ``new_tokens · top_k / experts``, so small batches run experts at low efficiency.
    """
    tokens = s.new_tokens
    expert_active = m.expert_weight_bytes * m.top_k / m.experts if m.experts else 0.0
    expert_share = expert_active / (m.dense_weight_bytes + expert_active) if expert_active else 0
    f = 2.0 * m.active_params * tokens
    f_expert = f * expert_share
    t = (f - f_expert) / (peak_flops * gemm_efficiency(mfu, tokens / tp, half))
    if f_expert:
        rows = tokens * m.top_k / m.experts / tp
        t += f_expert / (peak_flops * gemm_efficiency(mfu, rows, half))
    return t


def allreduce_time(m: ModelShape, s: StepShape, c: HbmConstants) -> float:
    """Tensor-parallel communication: two ring all-reduces per layer.

    Each moves ``2 · (tp − 1) / tp · new_tokens · hidden · act_bytes`` bytes per device.
    """
    if c.tp <= 1:
        return 0.0
    payload = 2.0 * (c.tp - 1) / c.tp * s.new_tokens * m.hidden * m.act_bytes
    return 2 * m.layers * (c.allreduce_latency_s + payload / c.interconnect)


def expert_layer_bytes(m: ModelShape, tokens: int, tp: int) -> tuple[float, float, float, float]:
    """HBM bytes one device moves in one MoE layer's four expert kernels, for ``N`` tokens.

    Routed experts are tensor-parallel: each of the ``tp`` devices holds ``F / tp`` of every
    expert's ``F`` intermediate columns, so it runs all ``A = N · k`` routed rows through narrow
    GEMMs. With hidden size ``H``, activations ``b`` bytes (``act_bytes``), GEMM inputs ``q``
    bytes (quantised to the serving dtype) and ``W`` expert weight bytes per device and layer
    (only the experts the step touches, :func:`weight_bytes_read`)::

        dispatch   N · H · b + A · H · q                  (gather rows by expert, quantise)
        gate/up    A · H · q + 2/3 · W + A · 2F/tp · b
        down       A · F/tp · q + 1/3 · W + A · H · b    (every device writes full-width rows)
        combine    A · H · b + N · H · b                  (weighted sum of the k rows per token)

    Returns ``(dispatch, gate_up, down, combine)``. The ``A · H`` terms do not shrink with
    ``tp``: at 8-way TP a 1,536-wide expert (Qwen3-235B) leaves 192 columns per device, and the
    down projection writes more bytes of partial sums than it does multiply-adds per byte.
    """
    n, h, b, q = float(tokens), float(m.hidden), m.act_bytes, m.gemm_input_bytes
    a = n * m.top_k
    f = m.expert_ffn / tp
    touched = 1.0 - (1.0 - m.top_k / m.experts) ** tokens
    w = m.expert_weight_bytes * touched / (max(m.moe_layers, 1) * tp)
    return (
        n * h * b + a * h * q,
        a * h * q + 2.0 / 3.0 * w + a * 2.0 * f * b,
        a * f * q + w / 3.0 + a * h * b,
        a * h * b + n * h * b,
    )


def expert_time(m: ModelShape, s: StepShape, c: HbmConstants) -> float:
    """Routed experts of a step, one roofline per kernel, per device::

        t = moe_layers · (dispatch / β + max(F_gu / π, gate_up / β)
                          + max(F_down / π, down / β) + combine / β)

    Bytes as in :func:`expert_layer_bytes`; ``β = η · BW`` of one device; ``F_gu = 2 · A · H ·
    2F/tp`` and ``F_down = 2 · A · F/tp · H``; ``π = peak`` at the GEMM efficiency of
    :func:`gemm_efficiency` over ``A / experts`` rows (each expert's share; the narrow
    ``F / tp`` width is charged as bytes, not as fewer rows). Large expert GEMMs (Mixtral,
    TP1) are compute-bound and this is the plain FLOP count; narrow ones (Qwen3 at TP8) are
    bound by the routed rows' traffic, which a FLOP roofline alone does not see.
    """
    tokens = s.new_tokens
    if tokens <= 0:
        return 0.0
    dispatch, gate_up, down, combine = expert_layer_bytes(m, tokens, c.tp)
    beta = c.bandwidth_efficiency * c.bandwidth
    a = float(tokens * m.top_k)
    f = m.expert_ffn / c.tp
    rows = a / m.experts
    pi = c.peak_flops * gemm_efficiency(c.mfu, rows, c.gemm_half_tokens)
    per_layer = (
        dispatch / beta
        + max(2.0 * a * m.hidden * 2.0 * f / pi, gate_up / beta)
        + max(2.0 * a * f * m.hidden / pi, down / beta)
        + combine / beta
    )
    return m.moe_layers * per_layer


def dense_linear_time(m: ModelShape, s: StepShape, c: HbmConstants) -> float:
    """The non-expert GEMMs of a MoE step (attention projections, dense layers, embeddings)::

        max(F_dense / (MFU(rows) · peak · tp), dense_weights / (η · BW · tp))

    ``F_dense = 2 · (P_active − P_experts) · new_tokens``, where the routed experts' share of
    the active parameters is taken from their active weight bytes.
    """
    expert_active = m.expert_weight_bytes * m.top_k / m.experts
    dense_share = m.dense_weight_bytes / (m.dense_weight_bytes + expert_active)
    f = 2.0 * m.active_params * s.new_tokens * dense_share
    eff = gemm_efficiency(c.mfu, s.new_tokens / c.tp, c.gemm_half_tokens)
    compute = f / (c.peak_flops * c.tp * eff)
    return max(compute, m.dense_weight_bytes / (c.bandwidth_efficiency * c.bandwidth * c.tp))


def hbm_step_time(m: ModelShape, s: StepShape, c: HbmConstants) -> float:
    """Roofline step time of an HBM device, one roofline per kind of kernel::

        t = max(F_linear / (MFU · peak · tp), weights / (η · BW · tp))        linear layers
          + max(F_attention / (MFU · peak · tp), KV / (η_kv · BW · tp))       attention
          + step_overhead + layers · layer_overhead + seqs · seq_overhead + t_allreduce

    ``F_linear = 2 · P_active · new_tokens`` at the GEMM efficiency of its height
    (:func:`linear_time`), ``F_attention = 4 · layers · attn_width · attn_pairs``; KV is the
    context read plus the new tokens written. The GEMMs over the
    weights and the attention over the KV cache are separate kernels that run one after the
    other, so each is bound by its own roof and their times add: large-batch decode pays for
    compute-bound GEMMs *and* for KV-bound attention. Small-batch decode is bound by weight
    reads, prefill by FLOPs (where the sum equals the single roofline).

    Mixture-of-experts models whose expert width is known split the linear term in two, the
    dense GEMMs (:func:`dense_linear_time`) and the routed experts' kernels
    (:func:`expert_time`), each with its own roofline.
    """
    peak = c.mfu * c.peak_flops * c.tp
    bandwidth = c.bandwidth * c.tp
    f_attention = 4.0 * m.layers * m.attn_width * s.attn_pairs
    kv = (s.kv_read_tokens + s.new_tokens) * m.kv_bytes_per_token
    eta_kv = c.kv_bandwidth_efficiency or c.bandwidth_efficiency
    if m.experts and m.expert_ffn and m.moe_layers:
        t_linear = dense_linear_time(m, s, c) + expert_time(m, s, c)
    else:
        weights = weight_bytes_read(m, s.new_tokens)
        compute = linear_time(m, s, c.peak_flops * c.tp, c.mfu, c.gemm_half_tokens, c.tp)
        t_linear = max(compute, weights / (c.bandwidth_efficiency * bandwidth))
    t_attention = max(f_attention / peak, kv / (eta_kv * bandwidth))
    overhead = c.step_overhead_s + m.layers * c.layer_overhead_s + s.seqs * c.seq_overhead_s
    return t_linear + t_attention + overhead + allreduce_time(m, s, c)


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
    layerwise: bool = False  # send each layer's KV as soon as its prefill is done


def kv_transfer_time(link: Link, kv_bytes: float, descriptors: int) -> float:
    """KV handoff time: ``setup + descriptors · τ_desc + bytes / (η · bandwidth)``."""
    return (
        link.setup_s
        + descriptors * link.per_descriptor_s
        + kv_bytes / (link.efficiency * link.bandwidth)
    )


def exposed_kv_transfer_time(
    link: Link, kv_bytes: float, descriptors: int, layers: int, prefill_compute_s: float
) -> float:
    """KV handoff time left after the prefill ends.

    Without overlap it is :func:`kv_transfer_time`. With layer-wise transfer each layer's share
    ``T / layers`` (``T`` = descriptors and bytes) leaves as soon as that layer is prefilled,
    so the first ``layers − 1`` shares overlap the remaining prefill compute ``C``::

        t = setup + max(T / layers, T − C · (layers − 1) / layers)

    i.e. only the last layer's share is exposed while the link keeps up with the compute.
    """
    if not link.layerwise or layers <= 1:
        return kv_transfer_time(link, kv_bytes, descriptors)
    body = descriptors * link.per_descriptor_s + kv_bytes / (link.efficiency * link.bandwidth)
    hidden = prefill_compute_s * (layers - 1) / layers
    return link.setup_s + max(body / layers, body - hidden)


def ring_allreduce_time(
    m: ModelShape, s: StepShape, devices: int, bandwidth: float, latency_s: float
) -> float:
    """Two ring all-reduces per layer over ``devices`` chips joined by ``bandwidth`` bytes/s::

        2 · layers · (latency + 2 · (n − 1) / n · new_tokens · hidden · act_bytes / bandwidth)

    The same traffic as :func:`allreduce_time`, for families whose constants are not
    :class:`HbmConstants`.
    """
    if devices <= 1:
        return 0.0
    payload = 2.0 * (devices - 1) / devices * s.new_tokens * m.hidden * m.act_bytes
    return 2 * m.layers * (latency_s + payload / bandwidth)


@dataclass(frozen=True, slots=True)
class MemoryTiers:
    """On-chip SRAM and off-chip DRAM (LPDDR) of a deployment, per device, plus the placement.

    The planner puts the weights in SRAM when all of them fit there (``weights_in_sram``), else
    in DRAM; KV fills the SRAM left over (``sram_kv_bytes``, all devices together) first and
    DRAM after it.
    """

    sram_bandwidth: float  # bytes/s of one device
    dram_bandwidth: float  # bytes/s of one device
    sram_efficiency: float  # achieved fraction of SRAM bandwidth
    dram_efficiency: float  # achieved fraction of DRAM bandwidth
    devices: int  # devices whose bandwidth one step uses
    weights_in_sram: bool
    sram_kv_bytes: float  # SRAM left for KV, all devices together


def tiered_memory_time(m: ModelShape, s: StepShape, t: MemoryTiers) -> float:
    """Memory time of one step over two tiers::

        W / (η_w · BW_w · n) + KV_sram / (η_s · BW_sram · n) + KV_dram / (η_d · BW_dram · n)

    ``W`` is the weights the step reads (:func:`weight_bytes_read`), served by SRAM when they
    live there and by DRAM otherwise. ``KV = (kv_read_tokens + new_tokens) · kv_bytes_per_token``;
    ``KV_sram = min(KV, sram_kv_bytes)`` and ``KV_dram = KV − KV_sram`` (the step's KV is taken
    to fill SRAM first). The parts add up rather than overlap: a layer needs its weights and its
    KV before it can finish.
    """
    sram = t.sram_efficiency * t.sram_bandwidth * t.devices
    dram = t.dram_efficiency * t.dram_bandwidth * t.devices
    weights = weight_bytes_read(m, s.new_tokens) / (sram if t.weights_in_sram else dram)
    kv = (s.kv_read_tokens + s.new_tokens) * m.kv_bytes_per_token
    kv_sram = min(kv, t.sram_kv_bytes)
    return weights + kv_sram / sram + (kv - kv_sram) / dram


@dataclass(frozen=True, slots=True)
class DramSramConstants:
    """A DRAM (LPDDR) roofline device with a large on-chip SRAM (MTIA v2), over ``tiers.devices``
    tensor-parallel chips."""

    peak_flops: float  # dense FLOP/s of one device at the serving dtype
    mfu: float
    tiers: MemoryTiers
    step_overhead_s: float
    layer_overhead_s: float
    interconnect: float  # bytes/s per direction between the devices
    allreduce_latency_s: float


def dram_sram_step_time(m: ModelShape, s: StepShape, c: DramSramConstants) -> float:
    """Roofline step time with the memory roof split over SRAM and DRAM::

        t = max(FLOPs / (MFU · peak · n), t_tiers) + step_overhead + layers · layer_overhead
            + t_allreduce

    ``t_tiers`` is :func:`tiered_memory_time`: a model whose weights fit in SRAM decodes at SRAM
    speed; one that does not is bound by DRAM bandwidth, as an HBM device is by HBM.
    """
    n = c.tiers.devices
    t_compute = forward_flops(m, s) / (c.mfu * c.peak_flops * n)
    overhead = c.step_overhead_s + m.layers * c.layer_overhead_s
    comm = ring_allreduce_time(m, s, n, c.interconnect, c.allreduce_latency_s)
    return max(t_compute, tiered_memory_time(m, s, c.tiers)) + overhead + comm


@dataclass(frozen=True, slots=True)
class InMemoryConstants:
    """An in-/near-memory compute device (d-Matrix Corsair): weights computed on in place in SRAM
    when they fit, streamed from LPDDR when they do not.

    ``latency_s = τ0 + layers · τ_layer`` is the fixed time a token takes through the chain of
    cards and chiplets; ``compute_flops`` the achieved FLOP/s of all devices together.
    """

    latency_s: float
    compute_flops: float
    tiers: MemoryTiers


def in_memory_step_time(m: ModelShape, s: StepShape, c: InMemoryConstants) -> float:
    """Step time of an in-memory compute deployment::

        t = latency + max(FLOPs / compute_flops, t_tiers)

    With the weights in SRAM the memory term is tiny (the matrix work happens where the weights
    sit, at SRAM bandwidth) and the per-token latency of the card chain dominates; spilled to
    LPDDR, weight reads are hundreds of times slower and bound the step.
    """
    return c.latency_s + max(
        forward_flops(m, s) / c.compute_flops, tiered_memory_time(m, s, c.tiers)
    )


@dataclass(frozen=True, slots=True)
class DataflowConstants:
    """A three-tier dataflow device (SambaNova SN40L) over ``sockets`` sockets: SRAM holds the fused
    decoder's working set, HBM the hot model and its KV, DDR the model library."""

    peak_flops: float  # dense FLOP/s of one socket
    hbm_bandwidth: float  # bytes/s of one socket
    mfu: float
    hbm_efficiency: float  # achieved fraction of HBM bandwidth in decode
    step_overhead_s: float
    layer_overhead_s: float
    sockets: int
    ddr_bandwidth: float  # bytes/s of one socket's DDR, for model switches
    ddr_weight_bytes: float = 0.0  # weights that did not fit HBM, streamed from DDR each step


def dataflow_step_time(m: ModelShape, s: StepShape, c: DataflowConstants) -> float:
    """Step time of a dataflow device streaming the active weights from HBM::

        t = max(FLOPs / (MFU · peak · n), bytes / (η · BW_hbm · n))
            + step_overhead + layers · layer_overhead

    ``bytes`` as in :func:`step_bytes`. The whole decoder runs as one on-chip pipeline, so η is
    high and the per-layer cost small; socket-to-socket traffic overlaps inside that pipeline,
    so there is no separate all-reduce term.

    Weights that spilled past HBM (``ddr_weight_bytes``, a deployment on too few sockets for
    its model) stream from DDR every step, after the HBM part: ``+ ddr_weights / (BW_ddr · n)``.
    """
    n = c.sockets
    t_compute = forward_flops(m, s) / (c.mfu * c.peak_flops * n)
    hbm = step_bytes(m, s) - c.ddr_weight_bytes
    t_memory = hbm / (c.hbm_efficiency * c.hbm_bandwidth * n)
    t_memory += c.ddr_weight_bytes / (c.ddr_bandwidth * n)
    return max(t_compute, t_memory) + c.step_overhead_s + m.layers * c.layer_overhead_s


def model_switch_time(weight_bytes: float, c: DataflowConstants) -> float:
    """Time to bring another model from the DDR library into HBM: ``weights / (n · BW_ddr)``."""
    return weight_bytes / (c.sockets * c.ddr_bandwidth)


@dataclass(frozen=True, slots=True)
class HardwiredConstants:
    """A chip with one model wired into it (Taalas HC1).

    ``token_latency_s`` is the time one token takes through the fixed pipeline; further prompt
    tokens of a sequence stream in behind the first one, ``prompt_token_s`` apart. ``slots`` is how
    many sequences the pipeline carries at once (bounded by its on-die KV SRAM as well).
    """

    token_latency_s: float
    prompt_token_s: float
    slots: int


def hardwired_step_time(m: ModelShape, s: StepShape, c: HardwiredConstants) -> float:
    """Step time of a hard-wired model::

        t = ceil(seqs / slots) · token_latency + (new_tokens − seqs) · prompt_token

    Flat in batch while the slots last; each prompt token beyond a sequence's first adds one
    pipeline beat. The model's shape does not enter: the chip's latency is what it is.
    """
    waves = max(1, math.ceil(s.seqs / c.slots))
    return waves * c.token_latency_s + max(0, s.new_tokens - s.seqs) * c.prompt_token_s
