"""The device, model and link catalog: data from ``config/``, validated, and bound to physics.

Device and model profiles are YAML files (``config/devices/*.yaml``, ``config/models/*.yaml``);
KV-transfer links are presets in ``config/links.yaml``. Every number carries its source in the
file's ``sources`` map. A device's ``family`` selects its class, and the class its physics
(:mod:`backends.emulator.timing`) and its memory plan; nothing else in the code branches on a
device's name or family:

* ``hbm`` → :class:`HbmDevice`: roofline over HBM (GPUs, TPUs, Trainium, Gaudi, ...),
* ``sram_pipeline`` / ``wafer_scale`` → :class:`PipelineDevice`: SRAM-resident pipeline across
  chips (Groq, Graphcore) or wafers (Cerebras),
* ``lpddr_sram`` → :class:`LpddrSramDevice`: LPDDR roofline, SRAM speed when the weights fit
  there (MTIA v2),
* ``in_memory`` → :class:`InMemoryDevice`: in-memory compute over SRAM + LPDDR (d-Matrix Corsair),
* ``dataflow`` → :class:`DataflowDevice`: SRAM + HBM + DDR dataflow (SambaNova SN40L),
* ``hardwired`` → :class:`HardwiredDevice`: one model wired into the chip (Taalas HC1).

Example::

    catalog = Catalog.load()
    dep = catalog.deployment("h100-sxm", "llama-3.1-8b", dtype="bf16", tp=1)
    dep.step_time(StepShape.of([(1, 1000)]))   # one decode step, seconds
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeAlias, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from backends.emulator.accelerators import TierPlacement, dataflow_placement
from backends.emulator.timing import (
    DTYPE_BYTES,
    DataflowConstants,
    DramSramConstants,
    HardwiredConstants,
    HbmConstants,
    InMemoryConstants,
    Link,
    MemoryTiers,
    ModelShape,
    PipelineConstants,
    StepShape,
    Torus,
    dataflow_step_time,
    dram_sram_step_time,
    hardwired_step_time,
    hbm_step_time,
    in_memory_step_time,
    model_switch_time,
    pipeline_step_time,
    torus_group,
)
from backends.errors import CatalogError

GB = 1e9
TB = 1e12
TFLOPS = 1e12


# KV-cache dtype where it differs from the weights': NVFP4 serving quantises weights (and GEMM
# inputs) to 4 bits but keeps the KV cache in FP8 (TensorRT-LLM's NVFP4 checkpoints declare
# kv_cache_quant_algo FP8; MLPerf v4.1/v5.0 B200 FP4 submissions run an FP8 KV cache).
KV_DTYPE: dict[str, str] = {"fp4": "fp8"}


# Small kernels one layer's routed experts launch (router, top-k, sort, permute, quantise, two
# grouped GEMMs, activation, unpermute, combine): a device's ``moe_layer_floor_s`` prices the
# chain, of which the two grouped GEMMs (the kernels that read the expert weights) take their
# share (timing.expert_layers_time). An engine's fused chain is priced by its kernel count.
MOE_LAYER_KERNELS = 10
MOE_GEMM_KERNELS = 2


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelProfile(_Data):
    """Shape of a decoder-only transformer (``config/models/NAME.yaml``)."""

    name: str
    display_name: str = ""
    layers: int = Field(gt=0)
    hidden: int = Field(gt=0)
    q_heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    ffn: int | None = None
    expert_ffn: int | None = None
    experts: int = Field(0, ge=0, description="routed experts per MoE layer")
    shared_experts: int = Field(0, ge=0)
    top_k: int = Field(0, ge=0)
    dense_layers: int = Field(0, ge=0, description="leading layers with a dense FFN (MoE models)")
    params_b: float = Field(gt=0, description="total parameters, billions")
    active_params_b: float | None = Field(None, gt=0, description="parameters used per token")
    attention: Literal["gqa", "mla"] = "gqa"
    kv_lora_rank: int | None = None
    qk_rope_dim: int | None = None
    qk_nope_dim: int | None = Field(None, description="MLA: non-rope query/key dims per head")
    v_head_dim: int | None = Field(None, description="MLA: value dims per head")
    attention_layers: int | None = Field(
        None, gt=0, description="layers with softmax attention and a KV cache (default: all)"
    )
    sliding_window: int | None = Field(None, gt=0, description="window of the windowed layers")
    sliding_layers: int = Field(0, ge=0, description="attention layers that use the window")
    linear_layers: int = Field(0, ge=0, description="linear-attention (recurrent) layers")
    linear_state_elems: int = Field(
        0, ge=0, description="recurrent state elements per sequence of one linear layer"
    )
    index_heads: int = Field(0, ge=0, description="sparse attention: the indexer's heads")
    index_head_dim: int = Field(0, ge=0, description="sparse attention: the indexer's head dim")
    index_topk: int = Field(0, ge=0, description="sparse attention: keys each query attends to")
    unquantised_params_b: float = Field(
        0.0, ge=0, description="parameters quantised checkpoints keep in 16 bits (embeddings)"
    )
    nvfp4_unquantised_params_b: float | None = Field(
        None,
        ge=0,
        description="parameters NVIDIA's NVFP4 checkpoint keeps in 16 bits (its "
        "hf_quant_config.json exclude_modules: the LM head and, by model, attention "
        "projections, routers, shared experts); None: as `unquantised_params_b`",
    )
    fp8_block_scaled: bool = Field(
        False,
        description="the model's FP8 checkpoint scales its weights per block (128x128: "
        "`quantization_config.weight_block_size`), not per tensor or channel",
    )
    vocab: int = Field(gt=0)
    max_context: int = Field(gt=0)
    sources: dict[str, str] = Field(min_length=1)

    @property
    def active_params(self) -> float:
        return (self.active_params_b or self.params_b) * 1e9

    def kv_bytes_per_token(self, dtype: str) -> float:
        """KV bytes one token adds to the cache.

        GQA: ``2 · layers · kv_heads · head_dim · bytes`` (K and V).
        MLA: ``layers · (kv_lora_rank + qk_rope_dim) · bytes`` (one compressed latent).
        The cache is kept at the serving dtype, except that 4-bit deployments keep it in 8
        bits (:data:`KV_DTYPE`).
        Sliding-window layers keep at most ``sliding_window`` tokens, so they do not count
        here (see :meth:`window_kv_bytes_per_token`); nor do linear-attention layers.
        """
        b = DTYPE_BYTES[KV_DTYPE.get(dtype, dtype)]
        if self.attention == "mla":
            latent = self.kv_layers * ((self.kv_lora_rank or 0) + (self.qk_rope_dim or 0)) * b
            return latent + self.index_kv_bytes_per_token
        full = self.kv_layers - self.sliding_layers
        return 2 * full * self.kv_heads * self.head_dim * b

    @property
    def kv_layers(self) -> int:
        return self.attention_layers or self.layers

    @property
    def sparse(self) -> bool:
        """Whether attention is sparse: an indexer picks each query's ``index_topk`` keys."""
        return bool(self.index_heads and self.index_topk)

    @property
    def index_kv_bytes_per_token(self) -> float:
        """The sparse-attention indexer's key cache per token: one FP8 key of
        ``index_head_dim`` and its FP32 scale per layer (DeepSeek-V3.2's and GLM-5's indexer
        cache, whatever the KV dtype); 0 without an indexer."""
        return self.kv_layers * (self.index_head_dim + 4.0) if self.sparse else 0.0

    def window_kv_bytes_per_token(self, dtype: str) -> float:
        """KV bytes per token of the sliding-window layers (kept for the window only)."""
        b = DTYPE_BYTES[KV_DTYPE.get(dtype, dtype)]
        return 2 * self.sliding_layers * self.kv_heads * self.head_dim * b

    def state_bytes_per_seq(self, dtype: str) -> float:
        """Recurrent state of the linear-attention layers per sequence (16-bit: vLLM's
        ``mamba_ssm_cache_dtype`` ``auto`` is the model's dtype)."""
        return self.linear_layers * self.linear_state_elems * 2.0

    def weight_bytes(self, dense: str, experts: str | None = None) -> tuple[float, float]:
        """``(dense, routed experts)`` weight bytes with dense weights in ``dense`` and routed
        experts in ``experts`` (default ``dense``); ``unquantised_params_b`` stay 16-bit
        (``nvfp4_unquantised_params_b`` in an NVFP4 checkpoint).

        With ``E`` routed experts and top-``k``: ``active = dense + experts_total · k / E`` and
        ``total = dense + experts_total``, so ``experts_total = (total − active) / (1 − k/E)``.
        """
        total = self.params_b * 1e9
        experts_total = 0.0
        if self.experts > 0 and self.top_k > 0:
            experts_total = (total - self.active_params) / (1.0 - self.top_k / self.experts)
        b_dense = DTYPE_BYTES[dense]
        b_exp = DTYPE_BYTES[experts or dense]
        kept = self.unquantised_params_b
        if dense == "nvfp4" and self.nvfp4_unquantised_params_b is not None:
            kept = self.nvfp4_unquantised_params_b
        keep = min(kept * 1e9, total - experts_total)
        dense_bytes = (total - experts_total - keep) * b_dense + keep * max(b_dense, 2.0)
        return dense_bytes, experts_total * b_exp

    def shape(
        self,
        dtype: str,
        *,
        dense: str | None = None,
        experts: str | None = None,
        kv_dtype: str | None = None,
    ) -> ModelShape:
        """Physics view at a serving (compute) dtype; weights in ``dense`` / ``experts``
        formats where they differ from it (weight-only quantisation), KV in ``kv_dtype``."""
        b = DTYPE_BYTES[dtype]
        dense_bytes, expert_bytes = self.weight_bytes(dense or dtype, experts or dense or dtype)
        kv = kv_dtype or dtype
        mla_prefill = mla_decode = 0.0
        if self.attention == "mla" and self.kv_lora_rank:
            rope, nope = self.qk_rope_dim or 0, self.qk_nope_dim or self.head_dim
            v = self.v_head_dim or self.head_dim
            mla_prefill = 2.0 * self.kv_layers * self.q_heads * (nope + rope + v)
            mla_decode = 2.0 * self.kv_layers * self.q_heads * (2 * self.kv_lora_rank + rope)
        elif self.kv_layers != self.layers:
            mla_prefill = 4.0 * self.kv_layers * self.q_heads * self.head_dim
        return ModelShape(
            layers=self.layers,
            hidden=self.hidden,
            attn_width=self.q_heads * self.head_dim,
            active_params=self.active_params,
            dense_weight_bytes=dense_bytes,
            expert_weight_bytes=expert_bytes,
            experts=self.experts,
            top_k=self.top_k,
            kv_bytes_per_token=self.kv_bytes_per_token(kv),
            act_bytes=2.0,
            expert_ffn=(self.expert_ffn or 0) if self.experts else 0,
            moe_layers=self.layers - self.dense_layers if self.experts else 0,
            gemm_input_bytes=b,
            attn_pair_flops=mla_prefill,
            attn_pair_flops_decode=mla_decode,
            window=self.sliding_window or 0 if self.sliding_layers else 0,
            window_kv_bytes_per_token=self.window_kv_bytes_per_token(kv),
            state_bytes_per_seq=self.state_bytes_per_seq(kv),
            linear_layers=self.linear_layers or 0,
            sparse_topk=self.index_topk if self.sparse else 0,
            # The indexer's logits: one multiply-add per head dim and head for each pair.
            index_pair_flops=2.0 * self.kv_layers * self.index_heads * self.index_head_dim
            if self.sparse
            else 0.0,
            index_kv_bytes_per_token=self.index_kv_bytes_per_token,
        )


class _DeviceBase(_Data):
    name: str
    display_name: str = ""
    vendor: str = ""
    peak_tflops: dict[str, float] = Field(description="dense TFLOP/s per device by dtype")
    memory_gb: float = Field(gt=0, description="weight-holding memory per device (HBM or SRAM)")
    tdp_w: float | None = Field(None, gt=0)
    usd_per_hour: float | None = Field(None, gt=0)
    sources: dict[str, str] = Field(min_length=1)

    # Whether the family spreads one instance over as many devices as the model's memory needs
    # (pipeline stages, wafers, in-memory cards: ``count`` from :meth:`default_count`, no
    # tensor parallelism) rather than over ``tp`` tensor-parallel devices.
    sized_by_memory: ClassVar[bool] = False

    def peak_flops(self, dtype: str) -> float:
        if dtype not in self.peak_tflops:
            known = ", ".join(sorted(self.peak_tflops))
            raise CatalogError(f"device '{self.name}' has no {dtype} throughput; known: {known}")
        return self.peak_tflops[dtype] * TFLOPS

    # Memory plan (see plan_deployment). The defaults are the HBM plan: weights and KV share
    # ``memory_gb`` per device, and an instance has ``tp`` devices unless told otherwise.

    def check_serves(self, model: ModelProfile, dtype: str) -> None:
        """Raise :class:`CatalogError` unless this device can run ``model`` at ``dtype``."""
        self.peak_flops(dtype)

    def resident_weight_bytes(self, model: ModelProfile, dtype: str) -> float:
        """Bytes of weights the deployment's memory has to hold."""
        return model.params_b * 1e9 * DTYPE_BYTES[dtype]

    def default_count(self, weights: float, util: float, tp: int) -> int:
        return tp

    def capacity_bytes(self, count: int, util: float) -> float:
        """Memory for weights and KV on ``count`` devices."""
        return count * (self.memory_gb * GB * util)

    def capacity_text(self, count: int, util: float) -> str:
        return f"{count} × {self.memory_gb:g} GB × {util:g} utilisation"

    def kv_free_bytes(self, weights: float, count: int, util: float) -> float:
        """Memory left for KV on ``count`` devices holding ``weights`` (may be negative)."""
        return self.capacity_bytes(count, util) - weights

    def model_switch_s(self, dep: Deployment) -> float | None:
        """Seconds to bring another model into the deployment; None where it is not modelled."""
        return None

    def check_layout(self, layout: ParallelLayout) -> None:
        """Raise :class:`CatalogError` if the device's fabric cannot carry ``layout``."""


class HbmEfficiency(_Data):
    mfu: float = Field(gt=0, le=1)
    bandwidth: float = Field(gt=0, le=1)
    step_overhead_s: float = Field(ge=0)
    layer_overhead_s: float = Field(ge=0)
    allreduce_latency_s: float = Field(ge=0)
    mfu_by_dtype: dict[str, float] = Field(
        default_factory=dict,
        description="MFU at a dtype where it differs from `mfu` (8- and 4-bit GEMMs reach a "
        "smaller share of their higher peak)",
    )
    kv_bandwidth: float | None = Field(
        None, gt=0, le=1, description="η of attention's KV reads (default: `bandwidth`)"
    )
    seq_overhead_s: float = Field(0.0, ge=0, description="per sequence per engine step")
    gemm_half_tokens: float = Field(
        0.0, ge=0, description="GEMM rows (tokens) at which MFU is half `mfu`; 0: flat MFU"
    )
    gemm_half_tokens_by_dtype: dict[str, float] = Field(
        default_factory=dict,
        description="`gemm_half_tokens` at a dtype where it differs (Blackwell's block-scaled "
        "FP4 GEMMs need taller tiles than its FP8 and BF16 ones)",
    )
    moe_layer_floor_s: float = Field(
        0.0,
        ge=0,
        description="shortest time of one routed-expert layer's kernels per step, however few "
        "rows they get (the launch-bound chain of router, permute, GEMM and combine kernels)",
    )
    index_layer_floor_s: float = Field(
        0.0,
        ge=0,
        description="shortest time of one layer's sparse-attention indexer per step (its "
        "chain of small kernels: projections, rotary, quantisation, key write, scores, top-k)",
    )
    linear_layer_floor_s: float = Field(
        0.0,
        ge=0,
        description="time of one linear-attention layer's chain of small kernels per step "
        "(short convolution, gating, recurrent update, gated norm), however few sequences",
    )
    block_fp8_expert_mfu: float = Field(
        0.0,
        ge=0,
        le=1,
        description="ceiling on the share of FP8 peak that grouped expert GEMMs over "
        "block-scaled FP8 weights reach, however many rows they get (0: none)",
    )
    block_fp8_dense_mfu: float = Field(
        0.0,
        ge=0,
        le=1,
        description="ceiling on the share of FP8 peak that a dense (expert-free) model's "
        "GEMMs over block-scaled FP8 weights reach (0: none)",
    )


class TorusTopology(_Data):
    """Chips joined directly to their neighbours in a torus (TPU ICI, Trainium2 and
    Inferentia2 NeuronLink) rather than through a switch.

    ``dims`` are the axes of the largest torus the fabric closes with wraparound links (a TPU
    v6e pod 16 × 16, an Ironwood cube 4 × 4 × 4, a Trn2 UltraServer 4 × 4 × 4, an inf2.48xlarge
    a ring of 12); a collective's chips are laid out on a box inside it
    (:func:`~backends.emulator.timing.torus_group`). The device's ``interconnect_gb_s`` (per
    direction) is split evenly over its ``links`` unless ``axis_link_gb_s`` gives one link's
    rate per axis; a torus uses two links per axis, so ``links`` is at least ``2 · len(dims)``.
    ``instance_axes`` marks the leading axes as one machine (a trn2.48xlarge: 4 × 4) and the
    rest as joining machines (the UltraServer's four instances): groups that fit one machine
    stay in it.

    >>> TorusTopology(kind="torus", dims=[12], links=2, hop_latency_s=1e-6).describe()
    '12-chip ring, 2 links per chip'
    """

    kind: Literal["torus"]
    dims: list[int] = Field(min_length=1, max_length=3)
    links: int = Field(gt=0, description="chip-to-chip links per chip")
    wraparound: bool = Field(True, description="whether each full axis closes into a ring")
    hop_latency_s: float = Field(ge=0, description="per hop of a collective's chain")
    axis_link_gb_s: list[float] | None = Field(
        None, description="one link's GB/s per direction along each axis; unset: an even split"
    )
    instance_axes: int = Field(
        0, ge=0, description="leading axes one machine closes; 0: the fabric is one machine"
    )

    @model_validator(mode="after")
    def _enough_links(self) -> TorusTopology:
        if any(d < 1 for d in self.dims):
            raise ValueError(f"torus dims must be positive: {self.dims}")
        if self.links < 2 * len(self.dims):
            raise ValueError(
                f"a {len(self.dims)}-axis torus needs {2 * len(self.dims)} links per chip, "
                f"not {self.links}"
            )
        if self.axis_link_gb_s is not None and (
            len(self.axis_link_gb_s) != len(self.dims) or min(self.axis_link_gb_s) <= 0
        ):
            raise ValueError(
                f"axis_link_gb_s needs one positive rate per axis of {self.dims}, "
                f"not {self.axis_link_gb_s}"
            )
        if self.instance_axes >= len(self.dims):
            raise ValueError(
                f"instance_axes must leave an axis joining machines: {self.instance_axes} "
                f"of {len(self.dims)}"
            )
        return self

    @property
    def chips(self) -> int:
        return math.prod(self.dims)

    def describe(self) -> str:
        """``4×4 torus, 4 links per chip`` (the catalog table's wording)."""
        if len(self.dims) == 1:
            shape = f"{self.dims[0]}-chip {'ring' if self.wraparound else 'line'}"
        else:
            shape = f"{'×'.join(map(str, self.dims))} {'torus' if self.wraparound else 'mesh'}"
        if self.instance_axes:
            inner = "×".join(map(str, self.dims[: self.instance_axes]))
            shape += f" ({inner} per instance)"
        return f"{shape}, {self.links} links per chip"

    def fabric(self, interconnect_gb_s: float) -> Torus:
        axis = tuple(b * GB for b in self.axis_link_gb_s or ())
        return Torus(
            dims=tuple(self.dims),
            link=axis[0] if axis else interconnect_gb_s * GB / self.links,
            hop_latency_s=self.hop_latency_s,
            wraparound=self.wraparound,
            axis_link=axis,
            instance_axes=self.instance_axes,
        )


class HbmDevice(_DeviceBase):
    """GPU or other accelerator serving weights from HBM (roofline physics)."""

    family: Literal["hbm"]
    memory_bandwidth_tb_s: float = Field(gt=0)
    interconnect_gb_s: float = Field(gt=0, description="scale-up bandwidth per direction")
    scale_up_domain: int = Field(
        0, ge=0, description="devices one scale-up (NVLink) domain joins; 0: unbounded"
    )
    scale_out_gb_s: float = Field(
        0.0, ge=0, description="scale-out network bandwidth per device per direction"
    )
    scale_out_latency_s: float = Field(0.0, ge=0, description="per collective across domains")
    topology: TorusTopology | None = Field(
        None, description="a torus fabric; unset: a switched scale-up link (NVLink-like)"
    )
    efficiency: HbmEfficiency

    def check_layout(self, layout: ParallelLayout) -> None:
        """Raise :class:`CatalogError` when a collective group of ``layout`` (the ``tp`` devices
        of an attention rank, the ``moe_tp · ep`` devices of the experts) fits no box of the
        device's torus."""
        if self.topology is None:
            return
        fabric = self.topology.fabric(self.interconnect_gb_s)
        groups = {layout.tp, (layout.moe_tp or layout.tp) * layout.ep}
        for n in sorted(groups):
            if n > 1 and torus_group(fabric, n) is None:
                raise CatalogError(
                    f"{self.name}: a collective over {n} chips fits no box of its "
                    f"{self.topology.describe()}"
                )

    def constants(self, dep: Deployment) -> HbmConstants:
        e = self.efficiency
        lay = dep.layout
        return HbmConstants(
            dp=lay.dp,
            pp=lay.pp,
            moe_tp=lay.moe_tp or dep.tp,
            ep=lay.ep,
            kv_shards=dep.kv_shards,
            nvlink_domain=self.scale_up_domain,
            scale_out=self.scale_out_gb_s * GB,
            scale_out_latency_s=self.scale_out_latency_s,
            peak_flops=self.peak_flops(dep.dtype),
            bandwidth=self.memory_bandwidth_tb_s * TB,
            mfu=min(1.0, e.mfu_by_dtype.get(dep.dtype, e.mfu) * dep.engine.compute_efficiency),
            bandwidth_efficiency=min(1.0, e.bandwidth * dep.engine.bandwidth_efficiency),
            step_overhead_s=e.step_overhead_s,
            layer_overhead_s=e.layer_overhead_s,
            tp=dep.tp,
            interconnect=self.interconnect_gb_s * GB,
            allreduce_latency_s=e.allreduce_latency_s,
            kv_bandwidth_efficiency=e.kv_bandwidth,
            seq_overhead_s=e.seq_overhead_s,
            gemm_half_tokens=e.gemm_half_tokens_by_dtype.get(dep.dtype, e.gemm_half_tokens),
            moe_layer_floor_s=e.moe_layer_floor_s * _moe_kernels(dep) / MOE_LAYER_KERNELS,
            moe_gemm_share=MOE_GEMM_KERNELS / _moe_kernels(dep),
            index_layer_floor_s=e.index_layer_floor_s,
            linear_layer_floor_s=e.linear_layer_floor_s,
            attention_flops_s=self.attention_flops_s(dep),
            torus=self.topology.fabric(self.interconnect_gb_s) if self.topology else None,
            **self._block_fp8_terms(dep),
        )

    def _block_fp8_terms(self, dep: Deployment) -> dict[str, float]:
        """This device's ceilings on GEMMs over block-scaled FP8 weights: a dense model's,
        and for block-scaled FP8 experts their ceiling and the share of the bandwidth the
        engine's fused-MoE kernels reach on them. A MoE model's other GEMMs keep the
        large-GEMM efficiency (the device file's ``block_fp8_dense_mfu`` source says why)."""
        terms: dict[str, float] = {}
        if not dep.model.experts and _block_fp8(dep, _dense_format(dep)):
            terms["dense_mfu_cap"] = self.efficiency.block_fp8_dense_mfu
        if _block_fp8(dep, _expert_format(dep)):
            terms["expert_mfu_cap"] = self.efficiency.block_fp8_expert_mfu
            terms["expert_bandwidth_share"] = dep.engine.moe_fp8_block_bandwidth
        return terms

    def attention_flops_s(self, dep: Deployment) -> float:
        """Achieved FLOP/s of one device in attention. Attention kernels (FlashAttention,
        FlashInfer, FlashMLA, TensorRT-LLM's FMHA) compute in the KV cache's dtype: an FP8
        checkpoint served with a 16-bit KV cache runs its GEMMs at the FP8 peak and its
        attention at the 16-bit one. Other KV formats (and devices without that dtype) keep
        the serving dtype's throughput."""
        kv = dep.engine.kv_dtype or dep.dtype
        if kv == dep.dtype or kv not in self.peak_tflops:
            return 0.0
        e = self.efficiency
        mfu = min(1.0, e.mfu_by_dtype.get(kv, e.mfu) * dep.engine.compute_efficiency)
        return mfu * self.peak_flops(kv)


def _expert_format(dep: Deployment) -> str:
    """The routed experts' weight format: the deployment's own, else its serving dtype."""
    return dep.weights.experts if dep.weights is not None else dep.dtype


def _dense_format(dep: Deployment) -> str:
    """The other linear layers' weight format: the deployment's own, else its serving dtype."""
    return dep.weights.dense if dep.weights is not None else dep.dtype


def _moe_kernels(dep: Deployment) -> int:
    """Kernels one routed-expert layer of ``dep`` launches per step: the engine's fused MXFP4
    chain where it has one and the experts are MXFP4, else the usual chain."""
    fused = dep.engine.mxfp4_moe_kernels
    return fused if fused and _expert_format(dep) == "mxfp4" else MOE_LAYER_KERNELS


def _block_fp8(dep: Deployment, weights: str) -> bool:
    """Whether GEMMs over ``weights`` of the deployment are block-scaled FP8: served at FP8,
    FP8 weights, from a checkpoint that scales them per block."""
    return dep.model.fp8_block_scaled and dep.dtype == "fp8" and weights == "fp8"


class PipelineDevice(_DeviceBase):
    """SRAM-resident pipeline (``sram_pipeline``, Groq) or wafer-scale engine (``wafer_scale``).

    Per-token latency: ``tau0_s + layers · tau_layer_s + hops · tau_hop_s`` where ``hops`` is
    the number of device-to-device crossings of the pipeline (``count − 1`` for wafers, ``0`` for
    LPUs whose chip-to-chip latency is folded into ``tau_layer_s``). Each of the ``hops`` links
    carries every token's activations at ``hop_bandwidth_gb_s`` (wafers; see
    :func:`~backends.emulator.timing.pipeline_step_time`).
    """

    family: Literal["sram_pipeline", "wafer_scale"]
    sized_by_memory: ClassVar[bool] = True
    sram_bandwidth_tb_s: float = Field(gt=0)
    tau0_s: float = Field(ge=0)
    tau_layer_s: float = Field(gt=0)
    tau_hop_s: float = Field(0.0, ge=0)
    hop_bandwidth_gb_s: float | None = Field(
        None,
        gt=0,
        description="wafer-to-wafer link carrying every token's activations (wafer_scale)",
    )
    slots_per_device: float = Field(gt=0, description="sequences in flight per device")
    mfu: float = Field(gt=0, le=1)
    kv_reserve_fraction: float = Field(
        gt=0, lt=1, description="share of memory kept for KV when the device count is derived"
    )

    def default_count(self, weights: float, util: float, tp: int) -> int:
        """The fewest devices whose memory holds the weights with the KV reserve left over."""
        return _devices_for(weights, self.memory_gb * GB * util, self.kv_reserve_fraction)

    def constants(self, dep: Deployment) -> PipelineConstants:
        hops = dep.count - 1 if self.family == "wafer_scale" else 0
        link = self.hop_bandwidth_gb_s * GB if hops and self.hop_bandwidth_gb_s else 0.0
        return PipelineConstants(
            latency_s=self.tau0_s + dep.model.layers * self.tau_layer_s + hops * self.tau_hop_s,
            slots=max(1, int(dep.count * self.slots_per_device)),
            compute_flops=self.mfu * self.peak_flops(dep.dtype) * dep.count,
            hop_bandwidth=link,
        )


def _devices_for(weights: float, per_device: float, reserve: float) -> int:
    """``max(1, ceil(weights / (per_device · (1 − reserve))))``."""
    return max(1, math.ceil(weights / (per_device * (1.0 - reserve))))


class _TieredDevice(_DeviceBase):
    """A device with an on-chip SRAM tier and an off-chip LPDDR tier (``memory_gb``).

    Weights go to SRAM when all of them fit there (``weights ≤ count · sram · utilisation``),
    else to LPDDR; KV takes the rest of both tiers, SRAM first.
    """

    sram_gb: float = Field(gt=0, description="on-chip SRAM per device")
    sram_bandwidth_tb_s: float = Field(gt=0)
    dram_bandwidth_tb_s: float = Field(gt=0, description="LPDDR bandwidth per device")

    def capacity_bytes(self, count: int, util: float) -> float:
        return count * ((self.sram_gb + self.memory_gb) * GB * util)

    def capacity_text(self, count: int, util: float) -> str:
        return (
            f"{count} × ({self.sram_gb:g} GB SRAM + {self.memory_gb:g} GB LPDDR) × {util:g} "
            "utilisation"
        )

    def tiers(self, dep: Deployment, devices: int, sram_eff: float, dram_eff: float) -> MemoryTiers:
        """Where ``dep`` keeps its weights and KV; ``devices`` share each step's traffic."""
        sram_total = dep.count * (self.sram_gb * GB * dep.engine.gpu_memory_utilization)
        weights = self.resident_weight_bytes(dep.model, dep.dtype)
        in_sram = weights <= sram_total
        return MemoryTiers(
            sram_bandwidth=self.sram_bandwidth_tb_s * TB,
            dram_bandwidth=self.dram_bandwidth_tb_s * TB,
            sram_efficiency=sram_eff,
            dram_efficiency=dram_eff,
            devices=devices,
            weights_in_sram=in_sram,
            sram_kv_bytes=sram_total - weights if in_sram else sram_total,
        )


class TieredEfficiency(_Data):
    mfu: float = Field(gt=0, le=1)
    sram_bandwidth: float = Field(gt=0, le=1)
    dram_bandwidth: float = Field(gt=0, le=1)
    step_overhead_s: float = Field(ge=0)
    layer_overhead_s: float = Field(ge=0)
    allreduce_latency_s: float = Field(ge=0)


class LpddrSramDevice(_TieredDevice):
    """LPDDR roofline chip with a large SRAM (``lpddr_sram``, MTIA v2): an HBM-style roofline whose
    memory roof is SRAM bandwidth when the weights fit in SRAM and LPDDR bandwidth otherwise.
    ``tp`` chips share each step (all-reduce over ``interconnect_gb_s``); ``count`` defaults to
    ``tp``."""

    family: Literal["lpddr_sram"]
    interconnect_gb_s: float = Field(gt=0, description="chip-to-chip bandwidth per direction")
    efficiency: TieredEfficiency

    def constants(self, dep: Deployment) -> DramSramConstants:
        e = self.efficiency
        return DramSramConstants(
            peak_flops=self.peak_flops(dep.dtype),
            mfu=e.mfu,
            tiers=self.tiers(dep, dep.tp, e.sram_bandwidth, e.dram_bandwidth),
            step_overhead_s=e.step_overhead_s,
            layer_overhead_s=e.layer_overhead_s,
            interconnect=self.interconnect_gb_s * GB,
            allreduce_latency_s=e.allreduce_latency_s,
        )


class InMemoryDevice(_TieredDevice):
    """In-/near-memory compute card (``in_memory``, d-Matrix Corsair).

    ``count`` defaults to the fewest cards whose SRAM holds the weights with
    ``kv_reserve_fraction`` left for KV (the vendor's "performance mode"); fewer cards put the
    weights in LPDDR ("capacity mode"). Per-token latency ``tau0_s + layers · tau_layer_s``; all
    ``count`` cards share each step's compute and memory traffic.
    """

    family: Literal["in_memory"]
    sized_by_memory: ClassVar[bool] = True
    mfu: float = Field(gt=0, le=1)
    sram_efficiency: float = Field(gt=0, le=1)
    dram_efficiency: float = Field(gt=0, le=1)
    tau0_s: float = Field(ge=0)
    tau_layer_s: float = Field(ge=0)
    kv_reserve_fraction: float = Field(
        gt=0, lt=1, description="share of SRAM kept for KV when the card count is derived"
    )

    def default_count(self, weights: float, util: float, tp: int) -> int:
        return _devices_for(weights, self.sram_gb * GB * util, self.kv_reserve_fraction)

    def constants(self, dep: Deployment) -> InMemoryConstants:
        return InMemoryConstants(
            latency_s=self.tau0_s + dep.model.layers * self.tau_layer_s,
            compute_flops=self.mfu * self.peak_flops(dep.dtype) * dep.count,
            tiers=self.tiers(dep, dep.count, self.sram_efficiency, self.dram_efficiency),
        )


class DataflowEfficiency(_Data):
    mfu: float = Field(gt=0, le=1)
    bandwidth: float = Field(gt=0, le=1)
    step_overhead_s: float = Field(ge=0)
    layer_overhead_s: float = Field(ge=0)


class DataflowDevice(_DeviceBase):
    """Three-tier dataflow socket (``dataflow``, SambaNova SN40L).

    ``sram_gb`` holds the fused decoder's working set, ``memory_gb`` of HBM the hot model and its
    KV, ``ddr_gb`` the model library. ``tp`` sockets stream each step's weights from HBM; another
    model loads from DDR in ``weights / (tp · ddr_bandwidth)``.
    """

    family: Literal["dataflow"]
    memory_bandwidth_tb_s: float = Field(gt=0, description="HBM bandwidth per socket")
    sram_gb: float = Field(gt=0)
    ddr_gb: float = Field(gt=0)
    ddr_bandwidth_tb_s: float = Field(gt=0, description="DDR bandwidth per socket")
    kv_reserve_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of HBM kept for KV when the weights spill to DDR"
    )
    efficiency: DataflowEfficiency

    def placement(self, weights: float, count: int, util: float) -> TierPlacement:
        """What lives where (:func:`backends.emulator.accelerators.dataflow_placement`)."""
        return dataflow_placement(
            weights,
            count,
            self.memory_gb * GB,
            self.sram_gb * GB,
            self.ddr_gb * GB,
            util,
            self.kv_reserve_fraction,
        )

    def kv_free_bytes(self, weights: float, count: int, util: float) -> float:
        try:
            return self.placement(weights, count, util).hbm_kv_bytes
        except ValueError:
            return -1.0

    def capacity_bytes(self, count: int, util: float) -> float:
        """HBM for weights and KV, and DDR for weights that overflow it."""
        return count * (self.memory_gb * GB * util + self.ddr_gb * GB)

    def capacity_text(self, count: int, util: float) -> str:
        return (
            f"{count} × ({self.memory_gb:g} GB HBM × {util:g} utilisation + {self.ddr_gb:g} GB DDR)"
        )

    def constants(self, dep: Deployment) -> DataflowConstants:
        e = self.efficiency
        weights = self.resident_weight_bytes(dep.model, dep.dtype)
        tiers = self.placement(weights, dep.count, dep.engine.gpu_memory_utilization)
        return DataflowConstants(
            peak_flops=self.peak_flops(dep.dtype),
            hbm_bandwidth=self.memory_bandwidth_tb_s * TB,
            mfu=e.mfu,
            hbm_efficiency=e.bandwidth,
            step_overhead_s=e.step_overhead_s,
            layer_overhead_s=e.layer_overhead_s,
            sockets=dep.tp,
            ddr_bandwidth=self.ddr_bandwidth_tb_s * TB,
            ddr_weight_bytes=tiers.ddr_weight_bytes,
        )

    def model_switch_s(self, dep: Deployment) -> float | None:
        weights = self.resident_weight_bytes(dep.model, dep.dtype)
        return model_switch_time(weights, self.constants(dep))


class HardwiredDevice(_DeviceBase):
    """A chip with one model wired into it (``hardwired``, Taalas HC1).

    The weights are the chip, so they take no memory; ``memory_gb`` is the on-die SRAM for KV,
    which bounds context and concurrency. Deploying any other model is a configuration error.
    """

    family: Literal["hardwired"]
    model: str = Field(description="the one model the chip runs")
    peak_tflops: dict[str, float] = Field(
        default_factory=dict, description="not published; the chip's speed is its latency"
    )
    kv_dtypes: list[str] = Field(min_length=1, description="KV-cache dtypes the chip accepts")
    token_latency_s: float = Field(gt=0)
    prompt_token_s: float = Field(ge=0)
    slots_per_device: int = Field(gt=0, description="sequences in flight per chip")

    def check_serves(self, model: ModelProfile, dtype: str) -> None:
        if model.name != self.model:
            raise CatalogError(
                f"device '{self.name}' is hard-wired to {self.model} and cannot serve "
                f"{model.name}; deploy {self.model} on it, or {model.name} on another device"
            )
        if dtype not in self.kv_dtypes:
            raise CatalogError(
                f"device '{self.name}' keeps its KV cache in {', '.join(self.kv_dtypes)}, "
                f"not {dtype}"
            )

    def resident_weight_bytes(self, model: ModelProfile, dtype: str) -> float:
        return 0.0

    def constants(self, dep: Deployment) -> HardwiredConstants:
        return HardwiredConstants(
            token_latency_s=self.token_latency_s,
            prompt_token_s=self.prompt_token_s,
            slots=dep.count * self.slots_per_device,
        )


AnyDevice: TypeAlias = (
    HbmDevice | PipelineDevice | LpddrSramDevice | InMemoryDevice | DataflowDevice | HardwiredDevice
)
PhysicsConstants: TypeAlias = (
    HbmConstants
    | PipelineConstants
    | DramSramConstants
    | InMemoryConstants
    | DataflowConstants
    | HardwiredConstants
)
DeviceProfile = Annotated[AnyDevice, Field(discriminator="family")]


class LinkProfile(_Data):
    bandwidth_gb_s: float = Field(gt=0)
    efficiency: float = Field(gt=0, le=1)
    setup_s: float = Field(ge=0)
    per_descriptor_s: float = Field(0.0, ge=0)
    source: str
    path: str = Field("", description="what the KV crosses, hop by hop (cross-vendor presets)")
    pairs: list[tuple[str, str]] = Field(
        default_factory=list,
        description="(prefill device, decode device) pairs whose handoff takes this path",
    )

    def link(self, name: str) -> Link:
        return Link(
            name, self.bandwidth_gb_s * GB, self.efficiency, self.setup_s, self.per_descriptor_s
        )


class EngineKnobs(_Data):
    """Engine settings of one emulated instance (vLLM's names)."""

    max_num_seqs: int = Field(256, gt=0)
    max_num_batched_tokens: int = Field(8192, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    block_size: int = Field(16, gt=0)
    enable_prefix_caching: bool = False
    # Speculative decoding: each decode step verifies ``speculative_tokens`` draft tokens, each
    # accepted with probability ``acceptance_rate`` until the first rejection; the drafter's k
    # passes cost ``draft_cost_fraction`` of a plain decode step each. Defaults when enabled:
    # 0.7 acceptance (typical per-token acceptance of EAGLE-style and small draft models on chat
    # text, 0.6-0.8; assumption, trust C) and 0.1 per draft pass (a 1B drafter beside a 70B
    # target is latency-bound, not 1/70 of it; assumption, trust C).
    speculative_tokens: int = Field(0, ge=0, le=16, description="draft tokens per step; 0: off")
    acceptance_rate: float = Field(0.7, ge=0, le=1)
    draft_cost_fraction: float = Field(0.1, ge=0, le=1)
    # KV admission, in TensorRT-LLM's names: ``max_utilization`` admits a request when its
    # prompt fits and preempts the newest when decodes outgrow the cache (vLLM's behaviour);
    # ``guaranteed_no_evict`` admits it only when prompt + max_tokens fit, reserved up front,
    # so nothing is ever preempted (TensorRT-LLM's default).
    scheduler_policy: Literal["max_utilization", "guaranteed_no_evict"] = "max_utilization"
    kv_dtype: Literal["bf16", "fp16", "fp8"] | None = Field(
        None, description="KV-cache dtype (default: the serving dtype; 8 bits for 4-bit serving)"
    )
    # How the engine builds a step (see backends.emulator.engine): vLLM ``mixed``, SGLang
    # ``prefill_first``, TensorRT-LLM without chunked prefill ``whole_prompt``.
    step_policy: Literal["mixed", "prefill_first", "whole_prompt"] = "mixed"
    # Share of which memory the KV cache gets: ``total`` device memory × utilisation minus the
    # weights (vLLM, SGLang), or ``free`` memory left after the weights × utilisation
    # (TensorRT-LLM's kv_cache_free_gpu_memory_fraction).
    kv_memory_of: Literal["total", "free"] = "total"
    # Factors an engine profile may fit (two at most): its kernels' share of the device's MFU
    # prior, host time per step that overlap scheduling and CUDA graphs do not hide, and host
    # time per running sequence (below).
    compute_efficiency: float = Field(1.0, gt=0, le=2)
    # A factor on the device's achieved-bandwidth prior (η) for the weight reads of a step (the
    # KV cache keeps the device's own η for attention). Hopper's η is fitted on vLLM and NIM
    # decode; an engine whose small-batch GEMMs read weights faster fits above 1.
    bandwidth_efficiency: float = Field(1.0, gt=0, le=1.5)
    step_overhead_s: float = Field(0.0, ge=0)
    # Host work of a step: the engine's scheduler, sampling bookkeeping, detokenising and
    # streaming, per running sequence (per attention data-parallel rank, each with its own
    # scheduler). With overlap scheduling the host prepares step n+1 while the devices run
    # step n, so a step takes the longer of the two; without it, their sum.
    host_seq_s: float = Field(0.0, ge=0, description="host work per running sequence per step")
    moe_fp8_block_bandwidth: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of the device's achieved bandwidth the engine's fused-MoE kernels "
        "reach on block-scaled FP8 experts",
    )
    overlap_scheduling: bool = Field(
        False, description="the host builds the next step while the devices run this one"
    )
    # A step with prompt tokens in it runs outside the engine's CUDA graphs (they capture
    # decode-only batches): the host launches every kernel of every layer itself. Host time
    # per layer for that; each device's own process launches its share, so tensor parallelism
    # does not shorten it. Overlap scheduling hides it behind the devices' work of the step
    # while that is longer.
    eager_layer_s: float = Field(
        0.0, ge=0, description="host time to launch one layer's kernels outside CUDA graphs"
    )
    # The engine's multi-head latent attention (DeepSeek, Kimi) costs this much more per MLA
    # layer per step than the modelled kernels (its projections, absorbed-weight batched GEMMs,
    # rotary and attention): a per-step constant, whatever the batch, that one engine pays and
    # another on the same model, devices and layout does not.
    mla_layer_s: float = Field(
        0.0, ge=0, description="time the engine's MLA path adds per MLA layer per step"
    )
    mxfp4_moe_kernels: int = Field(
        0,
        ge=0,
        le=MOE_LAYER_KERNELS,
        description="kernels one routed-expert layer launches on MXFP4 experts, when the "
        "engine's MXFP4 path fuses the chain (0: the usual chain of MOE_LAYER_KERNELS)",
    )
    # What the serving path adds between the engine producing a token and the client reading
    # it (output processing and detokenising in the front-end process, the hops between the
    # engine's processes, the HTTP stream): every token of a request reaches the client this
    # much later, so TTFT grows by it and TPOT does not. Not GPU work, so no device changes it.
    serving_latency_s: float = Field(
        0.0, ge=0, description="serving-path latency from a token's step to the client"
    )


class ParallelLayout(_Data):
    """How one instance spreads a model over its devices.

    ``tp`` attention tensor parallelism; ``dp`` attention data-parallel ranks (``tp`` devices
    each, each with its own sequences); ``moe_tp`` × ``ep``: each routed expert split ``moe_tp``
    ways, the experts spread over ``ep`` groups (``moe_tp`` 0 means ``tp``); ``pp`` pipeline
    stages. Devices: ``max(tp · dp, moe_tp · ep) · pp``.
    """

    tp: int = Field(1, gt=0)
    pp: int = Field(1, gt=0)
    dp: int = Field(1, gt=0)
    moe_tp: int = Field(0, ge=0)
    ep: int = Field(1, gt=0)

    @property
    def devices(self) -> int:
        return max(self.tp * self.dp, (self.moe_tp or self.tp) * self.ep) * self.pp


class WeightFormats(_Data):
    """Weight storage where it differs from the serving dtype (weight-only quantisation):
    ``dense`` (attention, dense MLPs, shared experts) and ``experts`` (routed experts)."""

    dense: str
    experts: str


class EngineProfile(_Data):
    """A serving engine's defaults, one version family (``config/engines/NAME.yaml``).

    ``knobs`` are the engine's own scheduler and memory defaults as a server (with sources);
    ``memory_fraction`` overrides ``gpu_memory_utilization`` per device where the engine
    derives it from the GPU (SGLang's ``mem_fraction_static``). At most two of ``knobs`` are
    fitted (``fitted`` names them), on Hopper rows only.
    """

    name: str
    display_name: str = ""
    engine: Literal["vllm", "sglang", "trtllm", "mlperf"]
    versions: list[str] = Field(
        default_factory=list, description="version prefixes this family covers"
    )
    default: bool = Field(False, description="the family for rows that give no version")
    released: datetime.date | None = Field(
        None, description="first upload of the family's earliest version to PyPI (rc included)"
    )
    knobs: EngineKnobs
    memory_fraction: dict[str, float] = Field(default_factory=dict)
    batched_tokens: dict[str, int] = Field(
        default_factory=dict,
        description="max_num_batched_tokens by device where the engine derives it from the "
        "GPU (SGLang's chunked_prefill_size by memory tier)",
    )
    mla_layer: dict[str, float] = Field(
        default_factory=dict,
        description="mla_layer_s by device, on the devices it was measured on",
    )
    budget_per_rank: bool = Field(
        True,
        description="each attention data-parallel rank schedules its own token budget and "
        "batch cap (TensorRT-LLM, vLLM); False: the ranks split one of each (SGLang)",
    )
    cuda_graph_max_batch: int = Field(0, ge=0, description="largest captured decode batch")
    frontend_request_s: float = Field(
        0.0, ge=0, description="front-end work per request before the engine (HTTP, parsing)"
    )
    frontend_token_s: float = Field(0.0, ge=0, description="front-end work per prompt token")
    speculative: str = "off"
    layouts: dict[str, ParallelLayout] = Field(
        default_factory=dict, description="published layouts by device (MLPerf submissions)"
    )
    fitted: list[
        Literal[
            "compute_efficiency",
            "bandwidth_efficiency",
            "step_overhead_s",
            "host_seq_s",
            "moe_fp8_block_bandwidth",
            "serving_latency_s",
            "eager_layer_s",
        ]
    ] = Field(default_factory=list, max_length=2)
    sources: dict[str, str] = Field(min_length=1)

    def covers(self, version: str) -> bool:
        return any(version.startswith(v) for v in self.versions)

    def knobs_for(self, device: str) -> EngineKnobs:
        """The engine's knobs on ``device`` (its per-device memory fraction, token budget and
        MLA layer cost where it has them)."""
        update: dict[str, object] = {}
        if device in self.memory_fraction:
            update["gpu_memory_utilization"] = self.memory_fraction[device]
        if device in self.batched_tokens:
            update["max_num_batched_tokens"] = self.batched_tokens[device]
        if device in self.mla_layer:
            update["mla_layer_s"] = self.mla_layer[device]
        return self.knobs.model_copy(update=update)

    def worker_knobs(self, knobs: EngineKnobs, ranks: int) -> EngineKnobs:
        """``knobs`` for a worker of ``ranks`` attention data-parallel ranks. Where each rank
        runs its own scheduler (``budget_per_rank``: TensorRT-LLM's attention-DP ranks and vLLM's
        data-parallel engine cores each take the configured token budget and batch cap), the
        worker has ``ranks`` of each; else the ranks split one of each (SGLang)."""
        if ranks <= 1 or not self.budget_per_rank:
            return knobs
        return knobs.model_copy(
            update={
                "max_num_batched_tokens": knobs.max_num_batched_tokens * ranks,
                "max_num_seqs": knobs.max_num_seqs * ranks,
            }
        )


@dataclass(frozen=True)
class Deployment:
    """One emulated instance: device × count × tp × dtype × engine knobs, with its physics."""

    device: AnyDevice
    model: ModelProfile
    dtype: str
    count: int
    tp: int
    engine: EngineKnobs
    kv_capacity_tokens: int
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    weights: WeightFormats | None = None

    @cached_property
    def model_shape(self) -> ModelShape:
        w = self.weights
        return self.model.shape(
            self.dtype,
            dense=w.dense if w else None,
            experts=w.experts if w else None,
            kv_dtype=self.engine.kv_dtype,
        )

    @property
    def kv_shards(self) -> int:
        """Ways one token's KV is split over an attention rank's ``tp`` devices."""
        return kv_shards(self.model, self.tp)

    @cached_property
    def _constants(self) -> PhysicsConstants:
        return self.device.constants(self)

    def step_time(self, shape: StepShape) -> float:
        """Seconds one engine step of this composition takes on this deployment."""
        c, m = self._constants, self.model_shape
        if isinstance(c, HbmConstants):
            engine = self.engine
            t = hbm_step_time(m, shape, c) + engine.step_overhead_s
            if engine.mla_layer_s and self.model.attention == "mla":
                t += engine.mla_layer_s * self.model.layers
            host = engine.host_seq_s * shape.seqs / c.dp
            if engine.eager_layer_s and shape.new_tokens > shape.seqs:
                host += engine.eager_layer_s * m.layers
            if not host:
                return t
            return max(t, host) if engine.overlap_scheduling else t + host
        if isinstance(c, PipelineConstants):
            return pipeline_step_time(m, shape, c)
        if isinstance(c, DramSramConstants):
            return dram_sram_step_time(m, shape, c)
        if isinstance(c, InMemoryConstants):
            return in_memory_step_time(m, shape, c)
        if isinstance(c, DataflowConstants):
            return dataflow_step_time(m, shape, c)
        return hardwired_step_time(m, shape, c)

    @property
    def model_switch_s(self) -> float | None:
        """Seconds to load this model from the device's model library (dataflow devices' DDR
        tier); None for devices whose model loading is not modelled."""
        return self.device.model_switch_s(self)

    @property
    def kv_bytes_per_token(self) -> float:
        return self.model_shape.kv_bytes_per_token


def kv_shards(model: ModelProfile, tp: int) -> int:
    """Ways one token's KV is split over ``tp`` tensor-parallel devices: by KV head for GQA,
    so ``min(tp, kv_heads)`` (beyond that, heads are replicated); not at all for MLA, whose
    compressed latent every device keeps whole."""
    if model.attention == "mla":
        return 1
    return max(1, min(tp, model.kv_heads))


def plan_deployment(
    device: AnyDevice,
    model: ModelProfile,
    dtype: str,
    count: int | None,
    tp: int,
    engine: EngineKnobs,
    layout: ParallelLayout | None = None,
    weights: WeightFormats | None = None,
) -> Deployment:
    """Size a deployment and its KV capacity; raise :class:`CatalogError` if it cannot fit.

    ``count`` defaults to ``tp`` (HBM, LPDDR, dataflow and hard-wired devices), or to the fewest
    devices whose memory holds the weights with ``kv_reserve_fraction`` left for KV (pipelines
    and wafers: all memory; in-memory compute: SRAM).
    KV capacity = ``(capacity − resident weights) / kv_bytes_per_token`` where capacity is
    ``count · memory · utilisation`` (SRAM + LPDDR for tiered devices) and hard-wired weights
    take no memory.
    """
    device.check_serves(model, dtype)
    util = engine.gpu_memory_utilization
    if layout is not None:
        tp = layout.tp
        count = count if count is not None else layout.devices
    device.check_layout(layout or ParallelLayout(tp=tp))
    formats = weights
    if formats is not None and isinstance(device, HbmDevice):
        weights_b = sum(model.weight_bytes(formats.dense, formats.experts))
    else:
        weights_b = device.resident_weight_bytes(model, dtype)
    if count is None:
        count = device.default_count(weights_b, util, tp)
    if count < tp or count % tp:
        raise CatalogError(f"count {count} must be a positive multiple of tp {tp}")
    total = device.capacity_bytes(count, util)
    free = device.kv_free_bytes(weights_b, count, util)
    if engine.kv_memory_of == "free":  # a share of what the weights leave (TensorRT-LLM)
        total = device.capacity_bytes(count, 1.0)
        free = device.kv_free_bytes(weights_b, count, 1.0) * util
    kv_per_token = model.kv_bytes_per_token(engine.kv_dtype or dtype)
    if isinstance(device, HbmDevice):
        kv_per_token *= tp / kv_shards(model, tp)  # replicas of the KV within a rank
    capacity = int(free // kv_per_token) if free > 0 else 0
    if capacity < engine.block_size:
        raise CatalogError(
            f"{model.name} ({dtype}) does not fit on {count} × {device.name}: weights "
            f"{weights_b / GB:.1f} GB + one KV block "
            f"{engine.block_size * kv_per_token / GB:.3f} GB "
            f"> {device.capacity_text(count, util)} = {total / GB:.1f} GB"
        )
    return Deployment(
        device, model, dtype, count, tp, engine, capacity, layout or ParallelLayout(tp=tp), formats
    )


class Catalog:
    """Devices, models and links, loaded from a config directory."""

    def __init__(
        self,
        devices: dict[str, AnyDevice],
        models: dict[str, ModelProfile],
        links: dict[str, LinkProfile],
        engines: dict[str, EngineProfile] | None = None,
    ) -> None:
        self.devices = devices
        self.models = models
        self.links = links
        self.engines = engines or {}

    @staticmethod
    def default_dir() -> Path:
        """The shipped ``config/`` directory (package data ``pdgate_config``)."""
        return Path(str(resources.files("pdgate_config")))

    @classmethod
    def load(cls, directory: Path | None = None) -> Catalog:
        root = directory or cls.default_dir()
        devices = {p.stem: _parse(_DEVICE, p) for p in sorted((root / "devices").glob("*.yaml"))}
        models = {p.stem: _parse(_MODEL, p) for p in sorted((root / "models").glob("*.yaml"))}
        links = _parse(_LINKS, root / "links.yaml")
        engines = _load_engines(root / "engines")
        for key, item in [*devices.items(), *models.items(), *engines.items()]:
            if item.name != key:
                raise CatalogError(f"{root}: file '{key}.yaml' declares name '{item.name}'")
        for key, lp in links.items():
            unknown = sorted({d for pair in lp.pairs for d in pair} - set(devices))
            if unknown:
                raise CatalogError(f"{root}/links.yaml: {key}: unknown devices {unknown}")
        return cls(devices, models, links, engines)

    def engine(self, name: str) -> EngineProfile:
        return _lookup(self.engines, name, "engine")

    def engine_knobs(
        self,
        profile: str | None,
        device: str,
        explicit: EngineKnobs | None = None,
        *,
        ranks: int = 1,
    ) -> EngineKnobs:
        """Knobs of engine ``profile`` on ``device``, with the fields set in ``explicit``
        taking precedence (``explicit`` alone when there is no profile), for a worker of
        ``ranks`` attention data-parallel ranks (:meth:`EngineProfile.worker_knobs`)."""
        if profile is None:
            return explicit or EngineKnobs()
        engine = self.engine(profile)
        knobs = engine.knobs_for(device)
        if explicit is not None:
            knobs = knobs.model_copy(update=explicit.model_dump(exclude_unset=True))
        return engine.worker_knobs(knobs, ranks)

    def engine_for(
        self, engine: str, version: str = "", measured: datetime.date | None = None
    ) -> EngineProfile:
        """The profile of ``engine`` whose version family covers ``version``.

        Without a version, a run's ``measured`` date picks the newest family already released
        on that day (a run uses a release that existed; which one is an assumption: the newest).
        Otherwise — no date, a date before every family, or a version newer than every family —
        the family marked default."""
        family = [e for e in self.engines.values() if e.engine == engine]
        if not family:
            raise CatalogError(f"no engine profile for {engine!r}")
        for e in family:
            if version and e.covers(version):
                return e
        if not version and measured is not None:
            out = [e for e in family if e.released is not None and e.released <= measured]
            if out:
                return max(out, key=lambda e: e.released or datetime.date.min)
        for e in family:
            if e.default:
                return e
        return family[-1]

    def device(self, name: str) -> AnyDevice:
        return _lookup(self.devices, name, "device")

    def model(self, name: str) -> ModelProfile:
        return _lookup(self.models, name, "model")

    def link(self, name: str) -> Link:
        return _lookup(self.links, name, "link").link(name)

    def handoff_link(self, prefill_device: str, decode_device: str) -> str | None:
        """The preset whose path a KV handoff from ``prefill_device`` to ``decode_device``
        takes (``config/links.yaml`` ``pairs``), or None where no cross-vendor path is set."""
        for key, lp in self.links.items():
            if (prefill_device, decode_device) in lp.pairs:
                return key
        return None

    def deployment(
        self,
        device: str,
        model: str,
        *,
        dtype: str = "bf16",
        count: int | None = None,
        tp: int = 1,
        engine: EngineKnobs | None = None,
        layout: ParallelLayout | None = None,
        weights: WeightFormats | None = None,
    ) -> Deployment:
        return plan_deployment(
            self.device(device),
            self.model(model),
            dtype,
            count,
            tp,
            engine or EngineKnobs(),
            layout,
            weights,
        )


_DEVICE = TypeAdapter[AnyDevice](DeviceProfile)
_MODEL = TypeAdapter(ModelProfile)
_LINKS = TypeAdapter(dict[str, LinkProfile])
_ENGINE = TypeAdapter(EngineProfile)
T = TypeVar("T")


def _lookup(table: dict[str, T], name: str, kind: str) -> T:
    try:
        return table[name]
    except KeyError:
        raise CatalogError(f"unknown {kind} '{name}'; known: {', '.join(sorted(table))}") from None


# libyaml's loader when PyYAML was built with it (the wheels are): the catalog is a hundred
# files, and the pure-Python parser took a tenth of a second of every simulation's start.
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse(adapter: TypeAdapter[T], path: Path) -> T:
    return _validate(adapter, _read(path), path)


def _read(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=SafeLoader)
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogError(f"{path}: {exc}") from exc


def _validate(adapter: TypeAdapter[T], data: Any, path: Path) -> T:
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise CatalogError(f"{path}: {format_validation_error(exc)}") from exc


# What an engine profile that ``extends`` another takes from it: the engine's behaviour (its
# knobs, graphs, front end, and the sources of those), not the family's identity (name,
# versions, release, default) nor its fits. Mappings merge key by key; the profile's own win.
_INHERITED = (
    "engine",
    "knobs",
    "memory_fraction",
    "batched_tokens",
    "mla_layer",
    "budget_per_rank",
    "cuda_graph_max_batch",
    "frontend_request_s",
    "frontend_token_s",
    "speculative",
)
_MERGED = ("knobs", "memory_fraction", "batched_tokens", "mla_layer", "sources")
_IDENTITY_SOURCES = ("released", "fitted")


def _load_engines(directory: Path) -> dict[str, EngineProfile]:
    """Every engine profile in ``directory``; one with ``extends: NAME`` is ``NAME``'s
    behaviour (``_INHERITED``) under its own identity and changes (one level, no chains)."""
    paths = {p.stem: p for p in sorted(directory.glob("*.yaml"))}
    raw = {key: _read(path) for key, path in paths.items()}
    out: dict[str, EngineProfile] = {}
    for key, data in raw.items():
        if isinstance(data, dict) and "extends" in data:
            data = dict(data)
            base_name = data.pop("extends")
            base = raw.get(base_name)
            if not isinstance(base, dict):
                raise CatalogError(f"{paths[key]}: extends unknown engine profile '{base_name}'")
            if "extends" in base:
                raise CatalogError(f"{paths[key]}: extends '{base_name}', which extends another")
            merged = {k: base[k] for k in _INHERITED if k in base}
            merged["sources"] = {
                k: v for k, v in base.get("sources", {}).items() if k not in _IDENTITY_SOURCES
            }
            for k, v in data.items():
                merged[k] = {**merged.get(k, {}), **v} if k in _MERGED else v
            data = merged
        out[key] = _validate(_ENGINE, data, paths[key])
    return out


# Discriminated unions put the chosen tag into an error's location; it is not a YAML key.
_UNION_TAGS = {
    "hbm",
    "sram_pipeline",
    "wafer_scale",
    "lpddr_sram",
    "in_memory",
    "dataflow",
    "hardwired",
    "emulated",  # gateway worker types
    "http",
}


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Render pydantic errors as ``path.to[0].field: reason`` lines."""
    lines = []
    for err in exc.errors():
        path = prefix
        for part in err["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part not in _UNION_TAGS:
                path = f"{path}.{part}" if path else str(part)
        lines.append(f"{path or '<root>'}: {err['msg']}")
    return "; ".join(lines)
