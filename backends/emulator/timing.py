"""Device timing physics: pure functions from a step's composition to seconds.

Nothing here sleeps, reads a clock or does I/O. Device constants come from
``config/devices/*.yaml`` (with their sources); model shapes from ``config/models/*.yaml``.

A *step* is one forward pass of a continuous-batching engine. Its composition is summarised
by :class:`StepShape`: how many new tokens are computed (prefill chunk tokens plus one per
decoding sequence), how much attention work they do over their context, how many context
tokens' KV must be read, and how many sequences take part.

Each device family is modelled by one function:

* :func:`hbm_step_time` — GPUs and other HBM accelerators (roofline), their collectives over a
  switched scale-up link or, for TPUs, Trainium2 and Inferentia2, a torus
  (:func:`torus_allreduce_time`, :func:`torus_all_to_all_time`),
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

import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

from backends.frozen import fast_init

DTYPE_BYTES: dict[str, float] = {
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "fp4": 0.5,
    # Weight-only formats with their scales: INT4 in groups of 32 with a BF16 scale each
    # (Kimi-K2.5's compressed-tensors checkpoint, group_size 32) = 4 + 16/32 bits; MXFP4 in
    # blocks of 32 with an 8-bit shared exponent (OCP MX spec; gpt-oss) = 4 + 8/32 bits.
    "int4": 0.5625,
    "mxfp4": 0.53125,
    # NVFP4 (NVIDIA's 4-bit checkpoints): an E4M3 scale per block of 16 = 4 + 8/16 bits.
    "nvfp4": 0.5625,
}


@fast_init
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
    decode_pairs: float = 0.0  # the part of attn_pairs from sequences decoding one token
    prompt_tokens: float = 0.0  # the part of new_tokens from prompt chunks (0: not counted)
    prompts: int = 0  # the prompt chunks in the step

    def split(self, ways: int) -> StepShape:
        """The busiest of ``ways`` attention data-parallel ranks' share of the step.

        Each rank decodes its own sequences, so decodes spread evenly; but a prompt is
        prefilled whole on the one rank that holds it, and the ranks step together (the MoE
        layers exchange every rank's tokens), so with ``k`` prompt chunks the step waits for a
        rank with ``⌈k / ways⌉`` of them: one rank's prefill when ``k < ways``, not a
        ``1/ways`` share of it. Without a prompt count, equal shares."""
        if ways <= 1:
            return self
        even = 1.0 / ways
        busiest = -(-self.prompts // ways)
        share = busiest / self.prompts if self.prompts > 0 else even
        decode_tokens = self.new_tokens - self.prompt_tokens
        prompt_pairs = self.attn_pairs - self.decode_pairs
        return StepShape(
            decode_tokens * even + self.prompt_tokens * share,  # type: ignore[arg-type]
            self.decode_pairs * even + prompt_pairs * share,
            self.kv_read_tokens * even,  # type: ignore[arg-type]
            (self.seqs - self.prompts) * even + busiest,  # type: ignore[arg-type]
            self.decode_pairs * even,
            self.prompt_tokens * share,
            busiest,
        )

    @staticmethod
    def of(chunks: list[tuple[int, int]]) -> StepShape:
        """Build a shape from ``(new_tokens, cached_context)`` per scheduled sequence."""
        new = sum(n for n, _ in chunks)
        pairs = sum(n * (c + (n + 1) / 2) for n, c in chunks)
        kv_read = sum(c for _, c in chunks)
        decode = sum(c + 1.0 for n, c in chunks if n == 1)
        prompt = [n for n, _ in chunks if n > 1]
        return StepShape(new, pairs, kv_read, len(chunks), decode, sum(prompt), len(prompt))


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
    # Attention variants (defaults: every layer attends over all its context, GQA/MHA FLOPs).
    attn_pair_flops: float = 0.0  # FLOPs per (query, key) pair, all layers (0: 4·layers·width)
    attn_pair_flops_decode: float = 0.0  # the same for decoding sequences (0: attn_pair_flops)
    window: int = 0  # sliding window of the windowed layers (0: none)
    window_kv_bytes_per_token: float = 0.0  # KV bytes per token of the windowed layers
    state_bytes_per_seq: float = 0.0  # recurrent state per sequence (linear-attention layers)
    linear_layers: int = 0  # linear-attention (Gated DeltaNet) layers among ``layers``
    # Sparse attention (DeepSeek sparse attention, GLM-5): a lightning indexer scores every
    # cached key for every query, then attention reads only the ``sparse_topk`` best keys.
    sparse_topk: int = 0  # keys each query attends to (0: dense attention)
    index_pair_flops: float = 0.0  # the indexer's FLOPs per (query, key) pair, all layers
    index_kv_bytes_per_token: float = 0.0  # the indexer's key cache (part of kv_bytes_per_token)


def forward_flops(m: ModelShape, s: StepShape) -> float:
    """FLOPs of one step: ``2 · P_active · new_tokens + 4 · layers · attn_width · attn_pairs``.

    The second term is QKᵀ and AV (two multiply-adds per (query, key) pair per head dim).
    """
    return 2.0 * m.active_params * s.new_tokens + 4.0 * m.layers * m.attn_width * s.attn_pairs


def touched_fraction(m: ModelShape, tokens: float) -> float:
    """Expected share of a MoE layer's routed experts that ``tokens`` tokens route to:
    ``1 − (1 − k/E)^N`` with ``E`` experts and top-``k`` routing (1 for dense models)."""
    if m.experts <= 0 or tokens <= 0:
        return 1.0
    miss: float = (1.0 - m.top_k / m.experts) ** tokens
    return 1.0 - miss


def expert_rows(m: ModelShape, tokens: float) -> float:
    """Rows of each routed expert's GEMM that runs: the ``N · k`` routed rows over the experts
    actually touched, ``N · k / (E · touched)``. An expert no token routes to runs no GEMM; its
    efficiency must not be averaged in (at 4 tokens over 128 experts, top-4, each of the ~15
    touched experts runs about one row, not an eighth of one)."""
    if m.experts <= 0:
        return float(tokens)
    return tokens * m.top_k / (m.experts * touched_fraction(m, tokens))


def weight_bytes_read(m: ModelShape, tokens: int) -> float:
    """Weights read by one step.

    Dense models read every weight. A mixture-of-experts step reads the dense part plus the
    experts its tokens actually route to: with ``E`` experts, top-``k`` routing and ``N`` tokens,
    the expected fraction of experts touched is ``1 − (1 − k/E)^N``.
    """
    return m.dense_weight_bytes + m.expert_weight_bytes * touched_fraction(m, tokens)


def step_bytes(m: ModelShape, s: StepShape) -> float:
    """HBM bytes moved by one step: weights read + context KV read + new KV written."""
    kv = (s.kv_read_tokens + s.new_tokens) * m.kv_bytes_per_token
    return weight_bytes_read(m, s.new_tokens) + kv


def sparse_keep(m: ModelShape, s: StepShape) -> tuple[float, float]:
    """The shares of a step's (query, key) pairs and of its cached-KV reads that attention keeps
    under sparse attention: each query attends to at most ``sparse_topk`` keys, and each
    sequence reads at most that many cached latents per query. Taken at the step's mean (pairs
    per new token, cached tokens per sequence), which is exact when the step's sequences share
    one context length, as a closed loop at fixed prompt and output lengths does; ``(1, 1)`` for
    dense attention."""
    k = m.sparse_topk
    if k <= 0:
        return 1.0, 1.0
    pairs = min(1.0, s.new_tokens * k / s.attn_pairs) if s.attn_pairs > 0 else 1.0
    reads = min(1.0, s.seqs * k / s.kv_read_tokens) if s.kv_read_tokens > 0 else 1.0
    return pairs, reads


def attention_flops(m: ModelShape, s: StepShape) -> float:
    """FLOPs of attention in one step: pairs × FLOPs per pair.

    GQA/MHA: ``4 · layers · q_heads · head_dim`` per pair (QKᵀ and AV). Models that set
    ``attn_pair_flops`` (MLA) price prefill pairs at it and decoding pairs at
    ``attn_pair_flops_decode``: DeepSeek-style engines run MLA prefill as multi-head attention
    over decompressed K/V (``2 · heads · (qk_nope + qk_rope + v)`` per pair and layer) and decode
    in the absorbed form over the latent (``2 · heads · (2 · kv_lora + qk_rope)``).
    Sparse attention keeps only the pairs :func:`sparse_keep` allows (its indexer is priced in
    :func:`indexer_time`).
    """
    keep = sparse_keep(m, s)[0]
    if not m.attn_pair_flops:
        return 4.0 * m.layers * m.attn_width * s.attn_pairs * keep
    decode = s.decode_pairs
    per_decode = m.attn_pair_flops_decode or m.attn_pair_flops
    return (m.attn_pair_flops * (s.attn_pairs - decode) + per_decode * decode) * keep


def attention_bytes(m: ModelShape, s: StepShape) -> float:
    """HBM bytes of attention in one step: context KV read + new KV written, plus the windowed
    layers' KV (at most ``window`` tokens per sequence, taken at the step's mean context) and
    the recurrent state of linear-attention layers (read and written once per sequence).
    Sparse attention reads at most ``sparse_topk`` cached latents per sequence; its indexer's
    key cache is read whole, in :func:`indexer_time`."""
    latent = m.kv_bytes_per_token - m.index_kv_bytes_per_token
    kv = (s.kv_read_tokens * sparse_keep(m, s)[1] + s.new_tokens) * latent
    if m.window and m.window_kv_bytes_per_token and s.seqs:
        per_seq = min(float(m.window), s.kv_read_tokens / s.seqs)
        kv += (s.seqs * per_seq + s.new_tokens) * m.window_kv_bytes_per_token
    if m.state_bytes_per_seq:
        kv += 2.0 * s.seqs * m.state_bytes_per_seq
    return kv


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
    # Parallel layout beyond plain tensor parallelism (defaults: ``tp`` devices do everything).
    dp: int = 1  # attention data-parallel ranks, each ``tp`` devices with its own sequences
    pp: int = 1  # pipeline stages
    moe_tp: int = 0  # ways each routed expert is split (0: tp)
    ep: int = 1  # expert-parallel groups the routed experts are spread over
    kv_shards: int = 0  # ways one token's KV is split over the tp devices (0: tp)
    nvlink_domain: int = 0  # devices one scale-up domain joins (0: any number)
    scale_out: float = 0.0  # bytes/s per device per direction beyond the domain
    scale_out_latency_s: float = 0.0  # per collective step across the scale-out network
    moe_layer_floor_s: float = 0.0  # shortest routed-expert layer (its chain of small kernels)
    moe_gemm_share: float = 0.0  # of that chain, the share its weight-reading GEMMs take (0: all)
    index_layer_floor_s: float = 0.0  # shortest sparse-attention indexer of one layer
    linear_layer_floor_s: float = 0.0  # a linear-attention layer's chain of small kernels
    attention_flops_s: float = 0.0  # achieved FLOP/s of one device in attention (0: mfu · peak)
    expert_mfu_cap: float = 0.0  # ceiling on the routed experts' GEMM efficiency (0: none)
    dense_mfu_cap: float = 0.0  # ceiling on the other GEMMs' efficiency (0: none)
    expert_bandwidth_share: float = 1.0  # of the achieved bandwidth, in the expert kernels
    torus: Torus | None = None  # the chips' torus fabric (None: a switched scale-up link)


def capped(efficiency: float, cap: float) -> float:
    """A GEMM efficiency under a ceiling (``cap`` 0: none)."""
    return min(efficiency, cap) if cap else efficiency


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
    m: ModelShape,
    s: StepShape,
    peak_flops: float,
    mfu: float,
    half: float,
    tp: int = 1,
    cap: float = 0.0,
) -> float:
    """Compute time of the linear layers at ``peak_flops`` (all ``tp`` devices), with GEMM
    efficiency by size, the dense GEMMs' at most ``cap`` (0: no ceiling).

    A device's share of a GEMM is ``rows × N / tp`` outputs; its efficiency is taken at the
    rows of a full-width GEMM of the same size, ``rows / tp``. Dense GEMMs have ``new_tokens``
    rows; each routed expert of a mixture-of-experts layer only its share,
    ``new_tokens · top_k / (experts · touched)`` (:func:`expert_rows`), so small batches run
    experts at low efficiency.
    """
    tokens = s.new_tokens
    expert_active = m.expert_weight_bytes * m.top_k / m.experts if m.experts else 0.0
    expert_share = expert_active / (m.dense_weight_bytes + expert_active) if expert_active else 0
    f = 2.0 * m.active_params * tokens
    f_expert = f * expert_share
    t = (f - f_expert) / (peak_flops * capped(gemm_efficiency(mfu, tokens / tp, half), cap))
    if f_expert:
        rows = expert_rows(m, tokens) / tp
        t += f_expert / (peak_flops * gemm_efficiency(mfu, rows, half))
    return t


@dataclass(frozen=True, slots=True)
class Torus:
    """A torus fabric (TPU ICI, Trainium NeuronLink): every chip has direct links to its
    neighbours along each axis, no switch between them.

    ``dims`` are the lengths of the axes the fabric closes into rings (its wraparound links):
    a TPU v5e/v6e pod is 16 × 16, an Ironwood cube 4 × 4 × 4, a Trn2 UltraServer 4 × 4 × 4, an
    inf2.48xlarge a ring of 12. ``link`` is one link's bandwidth per direction (the chip's
    per-direction figure over its links); ``axis_link``, when set, gives it per axis instead (a
    Trn2 UltraServer's links across instances need not run at its in-plane links' rate).
    ``hop_latency_s`` is what one hop of a collective's chain costs (link, router and the step's
    synchronisation). ``wraparound`` False makes it a mesh (no ring closes). ``instance_axes``
    > 0 says the leading axes are one machine and the later ones join machines (a Trn2
    UltraServer: four 4 × 4 instances along its third axis): a group that fits one machine is
    laid out inside it, as a deployment on that machine alone would be.

    >>> Torus((4, 4, 4), 160e9, 1e-6, instance_axes=2).axis_bandwidth(2)
    160000000000.0
    """

    dims: tuple[int, ...]
    link: float  # bytes/s per link per direction
    hop_latency_s: float
    wraparound: bool = True
    axis_link: tuple[float, ...] = ()  # bytes/s per link per direction, per axis (() = link)
    instance_axes: int = 0  # leading axes one machine closes (0: the fabric is one machine)

    def axis_bandwidth(self, axis: int) -> float:
        """One link's bandwidth per direction along ``axis``."""
        return self.axis_link[axis] if self.axis_link else self.link


@dataclass(frozen=True, slots=True)
class TorusGroup:
    """``n`` chips of a collective laid out on a sub-torus of a :class:`Torus`.

    ``shape`` has one length per fabric axis (1 where the group does not extend along it);
    ``axis_bw`` is the bandwidth per chip per direction a ring along each axis gets: ``2 · link``
    when the axis is a closed ring (it spans the whole fabric axis, which closes it, and has
    three chips or more), else ``link`` (a line: its end chips have one neighbour on that
    axis, so a ring embedded in it runs at one link). The reduce-scatter (equally all-gather)
    of ``V`` bytes costs ``hops · hop_latency + coefficient · V`` by each algorithm in
    ``algorithms``; the library runs whichever is faster at the size.
    """

    n: int
    shape: tuple[int, ...]
    closed: tuple[bool, ...]  # whether the group's extent along each axis is a closed ring
    axis_bw: tuple[float, ...]
    algorithms: tuple[tuple[int, float], ...]  # (hops, seconds per byte) per algorithm

    def reduce_scatter_time(self, volume: float, hop_latency_s: float) -> float:
        """Seconds of the bandwidth and hop terms of one reduce-scatter (or all-gather) of
        ``volume`` bytes (the full buffer per chip)."""
        best = math.inf if self.algorithms else 0.0
        for hops, coef in self.algorithms:  # a loop: this runs every engine step
            t = hops * hop_latency_s + coef * volume
            if t < best:
                best = t
        return best


def _closed(t: Torus, shape: tuple[int, ...]) -> tuple[bool, ...]:
    """Whether each axis of a box is a ring: it spans the whole fabric axis (whose wraparound
    link closes it) and has three chips or more (two chips are one link apart either way)."""
    return tuple(
        t.wraparound and d == full and d >= 3 for d, full in zip(shape, t.dims, strict=True)
    )


def _sequential(dims: list[tuple[int, float]]) -> tuple[int, float]:
    """Reduce-scatter one axis after another, each over the links along it: the buffer shrinks
    by each axis's length before the next. Every order is tried; the cheapest is kept."""
    hops = sum(d - 1 for d, _ in dims)
    best = math.inf
    for order in itertools.permutations(dims):
        coef, share = 0.0, 1.0
        for d, bw in order:
            coef += (d - 1) / d * share / bw
            share /= d
        best = min(best, coef)
    return hops, best


def _rotated(dims: list[tuple[int, float]]) -> tuple[int, float]:
    """Reduce-scatter with every axis busy at once: the buffer is cut into ``k`` parts (one per
    axis); part ``j`` runs the axes in the order rotated by ``j``, so at each of the ``k``
    phases each axis's links carry one part. A phase lasts as long as its slowest part, in
    time and in hops."""
    k = len(dims)
    hops_best, best = 0, math.inf
    for base in itertools.permutations(dims):
        coef, hops = 0.0, 0
        shares = [1.0 / k] * k
        for p in range(k):
            phase, phase_hops = 0.0, 0
            for j in range(k):
                d, bw = base[(j + p) % k]
                phase = max(phase, (d - 1) / d * shares[j] / bw)
                phase_hops = max(phase_hops, d - 1)
                shares[j] /= d
            coef += phase
            hops += phase_hops
        if coef < best:
            hops_best, best = hops, coef
    return hops_best, best


def _shapes(dims: tuple[int, ...], n: int) -> Iterator[tuple[int, ...]]:
    """Every way of laying ``n`` chips out as a box inside ``dims`` (one length per axis)."""
    if not dims:
        if n == 1:
            yield ()
        return
    for d in range(1, min(dims[0], n) + 1):
        if n % d == 0:
            for rest in _shapes(dims[1:], n // d):
                yield (d, *rest)


@functools.lru_cache(maxsize=256)
def torus_group(t: Torus, n: int) -> TorusGroup | None:
    """The sub-torus a collective over ``n`` chips runs on, or None when no box of ``n``
    chips fits in the fabric.

    The shape is the best one, not a framework's table: the smallest bandwidth coefficient of
    the better of the two reduce-scatter algorithms (compared to nine digits, so that equal
    shapes tie), then the fewest hops, then the lexicographically smallest shape (``(2, 4)``
    before ``(4, 2)``). For 4, 8 and 16 chips that is the most compact box, as Google cuts TPU
    slices (v5e/v6e: 2 × 2, 2 × 4, 4 × 4; Ironwood 8 chips 2 × 2 × 2) and as a Trn2 instance's
    16 chips form its 4 × 4 torus. Where a full axis closes its ring it can beat the compact
    box: 32 chips of a 16 × 16 pod run 2 × 16 (Google's v6e-32 slice is 4 × 8). With
    ``instance_axes`` set, a group that fits one machine only takes boxes inside it (a Trn2
    UltraServer's 8 chips run 2 × 4 in one instance, not 2 × 2 × 2 across two), and between
    equal boxes the one over fewer machines wins (its 32 chips: two whole instances, 4 × 4 × 2).
    """
    best: tuple[float, int, int, tuple[int, ...]] | None = None
    found: TorusGroup | None = None
    for shape in _placements(t, n):
        group = _group(t, n, shape)
        hops, coef = min(group.algorithms, key=lambda a: (a[1], a[0]), default=(0, 0.0))
        machines = math.prod(shape[t.instance_axes :]) if t.instance_axes else 1
        key = (round(coef * t.link, 9), hops, machines, shape)
        if best is None or key < best:
            best, found = key, group
    return found


def _placements(t: Torus, n: int) -> list[tuple[int, ...]]:
    """The boxes :func:`torus_group` chooses among: those inside one machine when any fits."""
    shapes = list(_shapes(t.dims, n))
    if t.instance_axes:
        inside = [s for s in shapes if all(d == 1 for d in s[t.instance_axes :])]
        return inside or shapes
    return shapes


def _group(t: Torus, n: int, shape: tuple[int, ...]) -> TorusGroup:
    closed = _closed(t, shape)
    links = [t.axis_bandwidth(i) for i in range(len(shape))]
    bws = tuple(2.0 * b if c else b for b, c in zip(links, closed, strict=True))
    active = [(d, bw) for d, bw in zip(shape, bws, strict=True) if d > 1]
    algorithms = [_sequential(active)] if active else []
    if len(active) > 1:
        algorithms.append(_rotated(active))
    return TorusGroup(n, shape, closed, bws, tuple(algorithms))


def _fitted_group(t: Torus, n: int) -> TorusGroup:
    group = torus_group(t, n)
    if group is None:
        raise ValueError(f"no box of {n} chips fits a {'x'.join(map(str, t.dims))} torus")
    return group


def torus_reduce_scatter_time(t: Torus, n: int, volume: float, latency_s: float) -> float:
    """One reduce-scatter (or all-gather) of a ``volume``-byte buffer over ``n`` chips of the
    torus ``t``, laid out by :func:`torus_group`::

        latency + hops · τ_hop + Σ_axes (d − 1)/d · V_axis / BW_axis

    per-axis rings, each over the links along its axis only, ``V_axis`` the share of the buffer
    still to scatter when the ring runs. Two algorithms are priced and the faster kept: one axis
    after another (fewest hops: latency-bound decode), and the buffer split over the axes so
    that all of them run at once (the bandwidth of every axis: prefill). ``latency`` is the
    collective's fixed cost (launch and synchronisation).
    """
    if n <= 1:
        return 0.0
    return latency_s + _fitted_group(t, n).reduce_scatter_time(volume, t.hop_latency_s)


def torus_allreduce_time(t: Torus, n: int, volume: float, latency_s: float) -> float:
    """One all-reduce of ``volume`` bytes over ``n`` chips: a reduce-scatter and the mirroring
    all-gather (:func:`torus_reduce_scatter_time`), two hop chains, one fixed latency::

        latency + 2 · (hops · τ_hop + Σ_axes (d − 1)/d · V_axis / BW_axis)

    On a closed ring of ``n`` chips at ``2 · link`` per chip this is the switched ring's
    ``2 · (n − 1)/n · V / BW`` with ``BW`` the chip's two links; a group that uses fewer of
    the chip's links than it has (a 2 × 2 box of a 16 × 16 pod uses two of four) is that much
    slower than a switch giving each chip all of its bandwidth.
    """
    if n <= 1:
        return 0.0
    return latency_s + 2.0 * (torus_reduce_scatter_time(t, n, volume, 0.0))


def torus_all_to_all_time(t: Torus, n: int, payload: float, latency_s: float) -> float:
    """One all-to-all over ``n`` chips of the torus, each sending ``payload`` bytes spread evenly
    over the other ``n − 1``::

        latency + diameter · τ_hop + max(payload / Σ_axes BW_axis,
                                         a · b · payload / ((n − 1) · (n / d_max) · BW_max))

    The first term is a chip's injection over its links; the second the bisection: cutting an
    axis of length ``d`` into halves of ``a`` and ``b`` chips, ``a · b / (n − 1)`` payloads
    cross each way over the ``n / d`` rings of that axis (each two links across the cut when
    the axis closes, one when it is a line). Every axis's cut is a bound; the tightest binds,
    usually the longest axis's (``d_max``). On a torus the bisection, not the chip, is the
    limit: a whole Trn2 4 × 4 takes ``64/15 · P / 8B``, 2.1 times what its chips' four links
    could inject. ``diameter`` is the farthest chip's hop count.
    """
    if n <= 1 or payload <= 0:
        return 0.0
    g = _fitted_group(t, n)
    axes = [(d, bw, c) for d, bw, c in zip(g.shape, g.axis_bw, g.closed, strict=True) if d > 1]
    injection = payload / sum(bw for _, bw, _ in axes)
    bisection = max(
        (n * (d // 2) // d) * (n - n * (d // 2) // d) * payload / ((n - 1) * (n / d) * bw)
        for d, bw, _ in axes
    )
    diameter = sum(d // 2 if c else d - 1 for d, _, c in axes)
    return latency_s + diameter * t.hop_latency_s + max(injection, bisection)


def collective_link(c: HbmConstants, devices: int) -> tuple[float, float]:
    """``(bandwidth, latency)`` of a ring collective over ``devices``: the scale-up fabric
    inside one domain (NVLink), the scale-out network (per device) once it spans domains, where
    a ring's slowest hop sets its pace."""
    if c.nvlink_domain and devices > c.nvlink_domain and c.scale_out > 0:
        return c.scale_out, c.scale_out_latency_s or c.allreduce_latency_s
    return c.interconnect, c.allreduce_latency_s


def allreduce_time(m: ModelShape, s: StepShape, c: HbmConstants) -> float:
    """Tensor-parallel communication: two ring all-reduces per layer.

    Each moves ``2 · (tp − 1) / tp · new_tokens · hidden · act_bytes`` bytes per device, over
    :func:`collective_link`; on a torus fabric, per-axis rings over the links along each axis
    (:func:`torus_allreduce_time`). With attention data parallelism and pipeline stages the
    traffic is :func:`layout_comm_time`'s instead.
    """
    if c.dp > 1 or c.pp > 1:
        return layout_comm_time(m, s, c)
    if c.tp <= 1:
        return 0.0
    if c.torus is not None:
        volume = s.new_tokens * m.hidden * m.act_bytes
        return 2 * m.layers * torus_allreduce_time(c.torus, c.tp, volume, c.allreduce_latency_s)
    bw, lat = collective_link(c, c.tp)
    payload = 2.0 * (c.tp - 1) / c.tp * s.new_tokens * m.hidden * m.act_bytes
    return 2 * m.layers * (lat + payload / bw)


def all_to_all_time(c: HbmConstants, payload: float, devices: int) -> float:
    """One all-to-all in which each device sends ``payload`` bytes spread evenly over the other
    ``devices − 1``: the share to devices in its own scale-up domain crosses NVLink, the rest
    the scale-out network, both at once::

        latency + max(payload · (d − 1)/(n − 1) / BW_up, payload · (n − d)/(n − 1) / BW_out)

    with ``d`` = devices per domain (``n`` when the collective fits in one domain). On a torus
    fabric it is bisection-bound instead (:func:`torus_all_to_all_time`).
    """
    if devices <= 1 or payload <= 0:
        return 0.0
    if c.torus is not None:
        return torus_all_to_all_time(c.torus, devices, payload, c.allreduce_latency_s)
    domain = min(devices, c.nvlink_domain or devices)
    inside = payload * (domain - 1) / (devices - 1)
    outside = payload - inside
    t = inside / c.interconnect
    lat = c.allreduce_latency_s
    if outside > 0:
        t = max(t, outside / (c.scale_out or c.interconnect))
        lat = c.scale_out_latency_s or lat
    return lat + t


def layout_comm_time(m: ModelShape, s: StepShape, c: HbmConstants) -> float:
    """Communication of a step under data-parallel attention and pipeline stages.

    * Attention of each of the ``dp`` ranks: one all-reduce per layer over its ``tp`` devices
      of its ``N / dp`` tokens (``2 · (tp − 1)/tp · N/dp · H · b`` bytes per device).
    * MoE layers: tokens go to the devices holding their experts and come back, an all-to-all
      dispatch (GEMM-input dtype, ``q`` bytes) and combine (``b`` bytes) over the
      ``G = moe_tp · ep`` devices: each device sends its ``N / dp`` tokens to ``min(k, G)``
      devices, ``(G − 1)/G`` of them elsewhere: ``N/dp · min(k, G) · (G − 1)/G · H · (q + b)``.
      (Dense layers of a MoE model are taken to run data-parallel, like attention.)
    * Pipeline stages: ``pp − 1`` point-to-point sends of the ``N`` activations (on a torus,
      over one link to the neighbouring stage's chip, one hop).
    """
    n_r = s.new_tokens / max(1, c.dp)
    h, b = float(m.hidden), m.act_bytes
    t = 0.0
    if c.tp > 1:
        per_layer = 1 if c.dp > 1 else 2
        if c.torus is not None:
            ar = torus_allreduce_time(c.torus, c.tp, n_r * h * b, c.allreduce_latency_s)
            t += per_layer * m.layers * ar
        else:
            bw, lat = collective_link(c, c.tp)
            payload = 2.0 * (c.tp - 1) / c.tp * n_r * h * b
            t += per_layer * m.layers * (lat + payload / bw)
    g = (c.moe_tp or c.tp) * max(1, c.ep)
    if c.dp > 1 and m.moe_layers and g > 1:
        copies = min(m.top_k, g) * (g - 1) / g
        dispatch = n_r * copies * h * m.gemm_input_bytes
        combine = n_r * copies * h * b
        t += m.moe_layers * (all_to_all_time(c, dispatch, g) + all_to_all_time(c, combine, g))
    if c.pp > 1 and c.torus is not None:
        send = c.allreduce_latency_s + c.torus.hop_latency_s + s.new_tokens * h * b / c.torus.link
        t += (c.pp - 1) * send
    elif c.pp > 1:
        t += (c.pp - 1) * (c.allreduce_latency_s + s.new_tokens * h * b / c.interconnect)
    return t


def expert_imbalance(rows: float, ep: int) -> float:
    """Load on the busiest of ``ep`` expert-parallel devices over the mean, for ``rows`` routed
    rows per device on average.

    Routing spreads rows roughly uniformly at random, so a device's count is near-Gaussian with
    variance ``rows · (1 − 1/ep)``; the expected maximum of ``ep`` such counts is about
    ``mean + σ · √(2 ln ep)`` (extreme-value approximation of the Gaussian maximum)::

        1 + √(2 ln ep · (1 − 1/ep) / rows),  at most ep

    A step waits for its slowest device: a few hundred decode rows per device cost 10-20 %,
    tens of thousands of prefill rows about 1 %.
    """
    if ep <= 1 or rows <= 0:
        return 1.0
    return min(float(ep), 1.0 + math.sqrt(2.0 * math.log(ep) * (1.0 - 1.0 / ep) / rows))


def expert_layer_bytes(
    m: ModelShape, tokens: float, tp: int, *, ep: int = 1, local_tokens: float | None = None
) -> tuple[float, float, float, float]:
    """HBM bytes one device moves in one MoE layer's four expert kernels, for ``N`` tokens.

    Routed experts are split two ways: over ``ep`` expert-parallel groups (each device holds
    ``E / ep`` experts) and, within a group, tensor-parallel (``tp`` here is the MoE TP degree:
    each device holds ``F / tp`` of every expert's ``F`` intermediate columns). A device receives
    ``A = N · k / ep`` routed rows (times :func:`expert_imbalance` for the busiest device) and
    runs them through narrow GEMMs. With hidden size ``H``, activations ``b`` bytes
    (``act_bytes``), GEMM inputs ``q`` bytes (quantised to the serving dtype), ``n`` tokens the
    device holds before dispatch (``local_tokens``: all ``N`` when attention is tensor-parallel,
    ``N / dp`` with data-parallel attention) and ``W`` expert weight bytes per device and layer
    (only the experts the step touches, :func:`weight_bytes_read`)::

        dispatch   n · H · b + A · H · q                  (gather rows by expert, quantise)
        gate/up    A · H · q + 2/3 · W + A · 2F/tp · b
        down       A · F/tp · q + 1/3 · W + A · H · b    (every device writes full-width rows)
        combine    A · H · b + n · H · b                  (weighted sum of the k rows per token)

    Returns ``(dispatch, gate_up, down, combine)``. The ``A · H`` terms do not shrink with
    ``tp``: at 8-way TP a 1,536-wide expert (Qwen3-235B) leaves 192 columns per device, and the
    down projection writes more bytes of partial sums than it does multiply-adds per byte.
    """
    n_all, h, b, q = float(tokens), float(m.hidden), m.act_bytes, m.gemm_input_bytes
    n = n_all if local_tokens is None else float(local_tokens)
    a = n_all * m.top_k / ep
    a *= expert_imbalance(a, ep)
    f = m.expert_ffn / tp
    w = m.expert_weight_bytes * touched_fraction(m, tokens) / (max(m.moe_layers, 1) * tp * ep)
    return (
        n * h * b + a * h * q,
        a * h * q + 2.0 / 3.0 * w + a * 2.0 * f * b,
        a * f * q + w / 3.0 + a * h * b,
        a * h * b + n * h * b,
    )


def expert_parts(m: ModelShape, s: StepShape, c: HbmConstants) -> tuple[float, float]:
    """Routed experts of a step, one roofline per kernel, per device, as two parts: the
    kernels that move the routed rows (dispatch and combine) and the grouped GEMMs::

        t = moe_layers · (dispatch / β + max(F_gu / π, gate_up / β)
                          + max(F_down / π, down / β) + combine / β)

    Bytes as in :func:`expert_layer_bytes`; ``β = η · BW`` of one device; ``F_gu = 2 · A · H ·
    2F/tp`` and ``F_down = 2 · A · F/tp · H``; ``π = peak`` at the GEMM efficiency of
    :func:`gemm_efficiency` over ``A / (E / ep · touched)`` rows (each touched expert's share,
    :func:`expert_rows`; the narrow
    ``F / tp`` width is charged as bytes, not as fewer rows). Large expert GEMMs (Mixtral,
    TP1) are compute-bound and this is the plain FLOP count; narrow ones (Qwen3 at TP8) are
    bound by the routed rows' traffic, which a FLOP roofline alone does not see. Block-scaled
    FP8 experts carry two more terms: a ceiling on the GEMM efficiency (``expert_mfu_cap``, a
    device without per-block scales in its tensor cores) and the share of ``β`` the engine's
    fused-MoE kernels reach on them (``expert_bandwidth_share``).
    """
    tokens = s.new_tokens
    if tokens <= 0:
        return 0.0, 0.0
    moe_tp = c.moe_tp or c.tp
    ep = max(1, c.ep)
    local = tokens / c.dp if c.dp > 1 else None
    dispatch, gate_up, down, combine = expert_layer_bytes(
        m, tokens, moe_tp, ep=ep, local_tokens=local
    )
    beta = c.bandwidth_efficiency * c.bandwidth * c.expert_bandwidth_share
    a = float(tokens * m.top_k) / ep
    a *= expert_imbalance(a, ep)
    f = m.expert_ffn / moe_tp
    rows = a / (m.experts / ep * touched_fraction(m, tokens))
    eff = gemm_efficiency(c.mfu, rows, c.gemm_half_tokens)
    pi = c.peak_flops * capped(eff, c.expert_mfu_cap)
    gemms = max(2.0 * a * m.hidden * 2.0 * f / pi, gate_up / beta) + max(
        2.0 * a * f * m.hidden / pi, down / beta
    )
    return m.moe_layers * (dispatch + combine) / beta, m.moe_layers * gemms


def expert_time(m: ModelShape, s: StepShape, c: HbmConstants) -> float:
    """Routed experts of a step, one roofline per kernel, per device, with no launch floor:
    the sum of :func:`expert_parts`."""
    moves, gemms = expert_parts(m, s, c)
    return moves + gemms


def expert_layers_time(m: ModelShape, s: StepShape, c: HbmConstants) -> float:
    """The routed-expert layers of a step, their kernels one after the other on the stream::

        t = max(moves, L · floor · (1 − g)) + max(gemms, L · floor · g)

    ``moves`` and ``gemms`` are the rooflines of :func:`expert_parts` (the kernels that move
    the routed rows, and the grouped GEMMs that read the expert weights), ``L`` the MoE
    layers, ``floor`` the shortest a layer's chain of kernels takes (``moe_layer_floor_s``)
    and ``g`` the share of it the GEMMs take (``moe_gemm_share``: 2 of a chain of 10). The
    router, top-k, sort, permute, quantise, activation, unpermute and combine kernels run
    before and after the GEMMs, so at small batches their launch-bound time adds to the
    weight reads instead of hiding under them; at large ones they are bound by the rows they
    move. ``g = 0`` keeps the whole chain as one floor under all the kernels."""
    moves, gemms = expert_parts(m, s, c)
    floor = m.moe_layers * c.moe_layer_floor_s
    g = c.moe_gemm_share
    if g <= 0:
        return max(moves + gemms, floor)
    return max(moves, floor * (1.0 - g)) + max(gemms, floor * g)


def dense_linear_time(m: ModelShape, s: StepShape, c: HbmConstants) -> float:
    """The non-expert GEMMs of a MoE step (attention projections, dense layers, embeddings)::

        max(F_dense / (MFU(rows) · peak · tp), dense_weights / (η · BW · tp))

    ``F_dense = 2 · (P_active − P_experts) · new_tokens``, where the routed experts' share of
    the active parameters is taken from their active weight bytes. ``MFU(rows)`` is at most
    ``dense_mfu_cap`` (block-scaled FP8 weights on a device without per-block scales in its
    tensor cores).
    """
    expert_active = m.expert_weight_bytes * m.top_k / m.experts
    dense_share = m.dense_weight_bytes / (m.dense_weight_bytes + expert_active)
    f = 2.0 * m.active_params * s.new_tokens * dense_share
    eff = capped(gemm_efficiency(c.mfu, s.new_tokens / c.tp, c.gemm_half_tokens), c.dense_mfu_cap)
    compute = f / (c.peak_flops * c.tp * eff)
    return max(compute, m.dense_weight_bytes / (c.bandwidth_efficiency * c.bandwidth * c.tp))


def indexer_time(m: ModelShape, s: StepShape, c: HbmConstants) -> float:
    """The sparse-attention indexer of one step (0 for dense attention).

    The indexer scores every cached key for every new token (``index_pair_flops`` per pair,
    on the tensor cores at the serving dtype) and streams its whole key cache
    (``index_kv_bytes_per_token``), then picks each query's ``sparse_topk`` keys. Its weights
    are small and the engines replicate them (vLLM's and SGLang's indexers use replicated
    linears), so every device of an attention rank computes the rank's whole indexer: the
    rank's share of the step at one device's rates. However little it computes, a layer's
    indexer is a chain of small kernels (query and key projections, rotary, FP8 quantisation,
    the score kernel, top-k) that takes at least ``index_layer_floor_s`` a layer.
    """
    if not m.index_pair_flops:
        return 0.0
    r = s.split(c.dp)
    flops = m.index_pair_flops * r.attn_pairs / (c.mfu * c.peak_flops)
    eta = c.kv_bandwidth_efficiency or c.bandwidth_efficiency
    reads = (r.kv_read_tokens + r.new_tokens) * m.index_kv_bytes_per_token / (eta * c.bandwidth)
    return max(flops, reads, m.layers * c.index_layer_floor_s)


def hbm_step_time(m: ModelShape, s: StepShape, c: HbmConstants) -> float:
    """Roofline step time of an HBM device, one roofline per kind of kernel::

        t = max(F_linear / (MFU · peak · tp), weights / (η · BW · tp))        linear layers
          + max(F_attention / (MFU · peak · tp), KV / (η_kv · BW · kv_shards)) attention
          + step_overhead + layers · layer_overhead + seqs · seq_overhead + t_comm

    ``F_linear = 2 · P_active · new_tokens`` at the GEMM efficiency of its height
    (:func:`linear_time`), ``F_attention`` from :func:`attention_flops`; KV is the context read
    plus the new tokens written (:func:`attention_bytes`). The GEMMs over the
    weights and the attention over the KV cache are separate kernels that run one after the
    other, so each is bound by its own roof and their times add: large-batch decode pays for
    compute-bound GEMMs *and* for KV-bound attention. Small-batch decode is bound by weight
    reads, prefill by FLOPs (where the sum equals the single roofline).

    Mixture-of-experts models whose expert width is known split the linear term in two, the
    dense GEMMs (:func:`dense_linear_time`) and the routed experts' kernels
    (:func:`expert_layers_time`), each with its own roofline; a routed-expert layer is a
    chain of about ten small kernels (router, top-k, sort, permute, quantise, two grouped
    GEMMs, activation, unpermute, combine) that cannot run faster than they launch, and its
    small kernels run in series with the GEMMs' weight reads.

    Layouts: with ``dp`` data-parallel attention ranks every term but the routed experts is
    one rank's share of the step (ranks run in parallel, each with ``tp`` devices); the experts
    see all the step's tokens, spread over ``moe_tp · ep`` devices. ``kv_shards`` is how many
    ways one token's KV is split over a rank's ``tp`` devices: ``min(tp, kv_heads)`` for GQA
    (heads are replicated once TP exceeds them), 1 for MLA (the latent is not split by head).
    Pipeline stages run one after the other for a step, so they add their hand-offs, not speed.
    Sparse attention adds its indexer (:func:`indexer_time`) to the attention term.
    """
    r = s.split(c.dp)
    peak = c.mfu * c.peak_flops * c.tp
    bandwidth = c.bandwidth * c.tp
    f_attention = attention_flops(m, r)
    kv = attention_bytes(m, r)
    eta_kv = c.kv_bandwidth_efficiency or c.bandwidth_efficiency
    kv_ways = c.kv_shards or c.tp
    if m.experts and m.expert_ffn and m.moe_layers:
        t_experts = expert_layers_time(m, s, c)
        t_linear = dense_linear_time(m, r, c) + t_experts
    else:
        weights = weight_bytes_read(m, r.new_tokens)
        compute = linear_time(
            m, r, c.peak_flops * c.tp, c.mfu, c.gemm_half_tokens, c.tp, c.dense_mfu_cap
        )
        t_linear = max(compute, weights / (c.bandwidth_efficiency * bandwidth))
    attention_peak = c.attention_flops_s * c.tp if c.attention_flops_s else peak
    t_attention = max(f_attention / attention_peak, kv / (eta_kv * c.bandwidth * kv_ways))
    overhead = c.step_overhead_s + m.layers * c.layer_overhead_s + r.seqs * c.seq_overhead_s
    t_attention += indexer_time(m, s, c)
    # A linear-attention layer's small kernels (short convolution, gating, the recurrent
    # update, the gated norm) run one after another on every step, whatever the batch; the
    # state they read and write is in the attention bytes above.
    t_attention += m.linear_layers * c.linear_layer_floor_s
    return t_linear + t_attention + overhead + allreduce_time(m, s, c)


@dataclass(frozen=True, slots=True)
class PipelineConstants:
    """Constants of an SRAM-resident pipeline (LPU chips or wafers) serving one model copy.

    ``latency_s`` is the time one token takes through the whole pipeline:
    ``τ0 + layers · τ_layer`` for an LPU, ``layers · τ_layer + hops · τ_hop`` for wafer-scale.
    ``slots`` is how many sequences the pipeline holds at once before it has to run a second
    wave. ``compute_flops`` is the achieved FLOP/s of all chips together. ``hop_bandwidth``
    is the bandwidth of one device-to-device crossing that carries every token's activations
    (bytes/s; 0 when there is no such crossing, or its cost is folded into the latency).
    """

    latency_s: float
    slots: int
    compute_flops: float
    hop_bandwidth: float = 0.0


def pipeline_step_time(m: ModelShape, s: StepShape, c: PipelineConstants) -> float:
    """Step time of an SRAM-resident pipeline::

        t = ceil(seqs / slots) · latency + max(FLOPs / compute_flops, hop_transfer)
        hop_transfer = new_tokens · hidden · act_bytes / hop_bandwidth

    Flat in batch until the pipeline's slots are full, then one more pass per wave; prefill
    streams its tokens through the pipeline, so long prompts add compute time on top of one
    pipeline latency. Where the pipeline crosses between devices over a link of its own (wafer
    to wafer), every token's activations cross each link while the devices compute; the links
    run side by side, so the stream's body is the slower of all devices' compute and one link.
    """
    waves = max(1, math.ceil(s.seqs / c.slots))
    body = forward_flops(m, s) / c.compute_flops
    if c.hop_bandwidth > 0:
        body = max(body, pipeline_hop_transfer_time(m, s.new_tokens, c.hop_bandwidth))
    return waves * c.latency_s + body


def pipeline_hop_transfer_time(m: ModelShape, tokens: int, bandwidth: float) -> float:
    """Time one device-to-device link of a layer pipeline takes to carry ``tokens`` tokens'
    activations: ``tokens · hidden · act_bytes / bandwidth``."""
    return tokens * m.hidden * m.act_bytes / bandwidth


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
