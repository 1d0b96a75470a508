"""The device, model and link catalog: data from ``config/``, validated, and bound to physics.

Device and model profiles are YAML files (``config/devices/*.yaml``, ``config/models/*.yaml``);
KV-transfer links are presets in ``config/links.yaml``. Every number carries its source in the
file's ``sources`` map. A device's ``family`` selects its physics (:mod:`backends.timing`);
nothing else in the code branches on a device's name or family.

Example::

    catalog = Catalog.load()
    dep = catalog.deployment("h100-sxm", "llama-3.1-8b", dtype="bf16", tp=1)
    dep.step_time(StepShape.of([(1, 1000)]))   # one decode step, seconds
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from backends.errors import CatalogError
from backends.timing import (
    DTYPE_BYTES,
    HbmConstants,
    Link,
    ModelShape,
    PipelineConstants,
    StepShape,
    hbm_step_time,
    pipeline_step_time,
)

GB = 1e9
TB = 1e12
TFLOPS = 1e12


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
        """
        b = DTYPE_BYTES[dtype]
        if self.attention == "mla":
            return self.layers * ((self.kv_lora_rank or 0) + (self.qk_rope_dim or 0)) * b
        return 2 * self.layers * self.kv_heads * self.head_dim * b

    def shape(self, dtype: str) -> ModelShape:
        """Physics view at a serving dtype; routed-expert bytes derived from total and active.

        With ``E`` routed experts and top-``k``: ``active = dense + experts_total · k / E`` and
        ``total = dense + experts_total``, so ``experts_total = (total − active) / (1 − k/E)``.
        """
        b = DTYPE_BYTES[dtype]
        total = self.params_b * 1e9
        experts_total = 0.0
        if self.experts > 0 and self.top_k > 0:
            experts_total = (total - self.active_params) / (1.0 - self.top_k / self.experts)
        return ModelShape(
            layers=self.layers,
            hidden=self.hidden,
            attn_width=self.q_heads * self.head_dim,
            active_params=self.active_params,
            dense_weight_bytes=(total - experts_total) * b,
            expert_weight_bytes=experts_total * b,
            experts=self.experts,
            top_k=self.top_k,
            kv_bytes_per_token=self.kv_bytes_per_token(dtype),
            act_bytes=2.0,
        )


class _DeviceBase(_Data):
    name: str
    display_name: str = ""
    vendor: str = ""
    status: Literal["calibrated", "spec-only"]
    peak_tflops: dict[str, float] = Field(description="dense TFLOP/s per device by dtype")
    memory_gb: float = Field(gt=0, description="weight-holding memory per device (HBM or SRAM)")
    tdp_w: float | None = Field(None, gt=0)
    usd_per_hour: float | None = Field(None, gt=0)
    sources: dict[str, str] = Field(min_length=1)

    def peak_flops(self, dtype: str) -> float:
        if dtype not in self.peak_tflops:
            known = ", ".join(sorted(self.peak_tflops))
            raise CatalogError(f"device '{self.name}' has no {dtype} throughput; known: {known}")
        return self.peak_tflops[dtype] * TFLOPS


class HbmEfficiency(_Data):
    mfu: float = Field(gt=0, le=1)
    bandwidth: float = Field(gt=0, le=1)
    step_overhead_s: float = Field(ge=0)
    layer_overhead_s: float = Field(ge=0)
    allreduce_latency_s: float = Field(ge=0)


class HbmDevice(_DeviceBase):
    """GPU or other accelerator serving weights from HBM (roofline physics)."""

    family: Literal["hbm"]
    memory_bandwidth_tb_s: float = Field(gt=0)
    interconnect_gb_s: float = Field(gt=0, description="scale-up bandwidth per direction")
    efficiency: HbmEfficiency


class PipelineDevice(_DeviceBase):
    """SRAM-resident pipeline (``sram_pipeline``, Groq) or wafer-scale engine (``wafer_scale``).

    Per-token latency: ``tau0_s + layers · tau_layer_s + hops · tau_hop_s`` where ``hops`` is
    the number of device-to-device crossings of the pipeline (``count − 1`` for wafers, ``0`` for
    LPUs whose chip-to-chip latency is folded into ``tau_layer_s``).
    """

    family: Literal["sram_pipeline", "wafer_scale"]
    sram_bandwidth_tb_s: float = Field(gt=0)
    tau0_s: float = Field(ge=0)
    tau_layer_s: float = Field(gt=0)
    tau_hop_s: float = Field(0.0, ge=0)
    slots_per_device: float = Field(gt=0, description="sequences in flight per device")
    mfu: float = Field(gt=0, le=1)
    kv_reserve_fraction: float = Field(
        gt=0, lt=1, description="share of memory kept for KV when the device count is derived"
    )


DeviceProfile = Annotated[HbmDevice | PipelineDevice, Field(discriminator="family")]


class LinkProfile(_Data):
    bandwidth_gb_s: float = Field(gt=0)
    efficiency: float = Field(gt=0, le=1)
    setup_s: float = Field(ge=0)
    per_descriptor_s: float = Field(0.0, ge=0)
    source: str

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


@dataclass(frozen=True)
class Deployment:
    """One emulated instance: device × count × tp × dtype × engine knobs, with its physics."""

    device: HbmDevice | PipelineDevice
    model: ModelProfile
    dtype: str
    count: int
    tp: int
    engine: EngineKnobs
    kv_capacity_tokens: int

    @cached_property
    def model_shape(self) -> ModelShape:
        return self.model.shape(self.dtype)

    @cached_property
    def _constants(self) -> HbmConstants | PipelineConstants:
        d = self.device
        if isinstance(d, HbmDevice):
            e = d.efficiency
            return HbmConstants(
                peak_flops=d.peak_flops(self.dtype),
                bandwidth=d.memory_bandwidth_tb_s * TB,
                mfu=e.mfu,
                bandwidth_efficiency=e.bandwidth,
                step_overhead_s=e.step_overhead_s,
                layer_overhead_s=e.layer_overhead_s,
                tp=self.tp,
                interconnect=d.interconnect_gb_s * GB,
                allreduce_latency_s=e.allreduce_latency_s,
            )
        hops = self.count - 1 if d.family == "wafer_scale" else 0
        return PipelineConstants(
            latency_s=d.tau0_s + self.model.layers * d.tau_layer_s + hops * d.tau_hop_s,
            slots=max(1, int(self.count * d.slots_per_device)),
            compute_flops=d.mfu * d.peak_flops(self.dtype) * self.count,
        )

    def step_time(self, shape: StepShape) -> float:
        """Seconds one engine step of this composition takes on this deployment."""
        c = self._constants
        if isinstance(c, HbmConstants):
            return hbm_step_time(self.model_shape, shape, c)
        return pipeline_step_time(self.model_shape, shape, c)

    @property
    def kv_bytes_per_token(self) -> float:
        return self.model_shape.kv_bytes_per_token


def plan_deployment(
    device: HbmDevice | PipelineDevice,
    model: ModelProfile,
    dtype: str,
    count: int | None,
    tp: int,
    engine: EngineKnobs,
) -> Deployment:
    """Size a deployment and its KV capacity; raise :class:`CatalogError` if it cannot fit.

    HBM devices: ``count`` defaults to ``tp``. Pipeline devices: ``count`` defaults to the
    fewest devices whose memory holds the weights with ``kv_reserve_fraction`` left for KV.
    KV capacity = ``count · memory · utilisation − weights``.
    """
    device.peak_flops(dtype)
    weights = model.params_b * 1e9 * DTYPE_BYTES[dtype]
    per_device = device.memory_gb * GB * engine.gpu_memory_utilization
    if count is None:
        if isinstance(device, PipelineDevice):
            usable = per_device * (1.0 - device.kv_reserve_fraction)
            count = max(1, math.ceil(weights / usable))
        else:
            count = tp
    if count < tp or count % tp:
        raise CatalogError(f"count {count} must be a positive multiple of tp {tp}")
    free = count * per_device - weights
    kv_per_token = model.kv_bytes_per_token(dtype)
    capacity = int(free // kv_per_token) if free > 0 else 0
    if capacity < engine.block_size:
        raise CatalogError(
            f"{model.name} ({dtype}) does not fit on {count} × {device.name}: weights "
            f"{weights / GB:.1f} GB + one KV block {engine.block_size * kv_per_token / GB:.3f} GB "
            f"> {count} × {device.memory_gb:g} GB × {engine.gpu_memory_utilization:g} utilisation "
            f"= {count * per_device / GB:.1f} GB"
        )
    return Deployment(device, model, dtype, count, tp, engine, capacity)


class Catalog:
    """Devices, models and links, loaded from a config directory."""

    def __init__(
        self,
        devices: dict[str, HbmDevice | PipelineDevice],
        models: dict[str, ModelProfile],
        links: dict[str, LinkProfile],
    ) -> None:
        self.devices = devices
        self.models = models
        self.links = links

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
        for key, item in [*devices.items(), *models.items()]:
            if item.name != key:
                raise CatalogError(f"{root}: file '{key}.yaml' declares name '{item.name}'")
        return cls(devices, models, links)

    def device(self, name: str) -> HbmDevice | PipelineDevice:
        return _lookup(self.devices, name, "device")

    def model(self, name: str) -> ModelProfile:
        return _lookup(self.models, name, "model")

    def link(self, name: str) -> Link:
        return _lookup(self.links, name, "link").link(name)

    def deployment(
        self,
        device: str,
        model: str,
        *,
        dtype: str = "bf16",
        count: int | None = None,
        tp: int = 1,
        engine: EngineKnobs | None = None,
    ) -> Deployment:
        return plan_deployment(
            self.device(device), self.model(model), dtype, count, tp, engine or EngineKnobs()
        )


_DEVICE = TypeAdapter[HbmDevice | PipelineDevice](DeviceProfile)
_MODEL = TypeAdapter(ModelProfile)
_LINKS = TypeAdapter(dict[str, LinkProfile])
T = TypeVar("T")


def _lookup(table: dict[str, T], name: str, kind: str) -> T:
    try:
        return table[name]
    except KeyError:
        raise CatalogError(f"unknown {kind} '{name}'; known: {', '.join(sorted(table))}") from None


def _parse(adapter: TypeAdapter[T], path: Path) -> T:
    try:
        return adapter.validate_python(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        raise CatalogError(f"{path}: {format_validation_error(exc)}") from exc


# Discriminated unions put the chosen tag into an error's location; it is not a YAML key.
_UNION_TAGS = {"hbm", "sram_pipeline", "wafer_scale"}


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
