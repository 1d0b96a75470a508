"""The candidate deployments: mode, and per pool a device, its layout, engine knobs and count.

Layouts come from the catalog: a device sized by memory (LPU pipelines, wafers, in-memory
cards) runs one layout, the device count its memory needs; any other device runs tensor
parallel over 1, 2, 4 or 8 devices, wherever the model fits with room for a batch of KV.
Engine knobs vary the two that trade TTFT against TPOT and throughput: the batch cap
(``max_num_seqs``) and the chunk budget (``max_num_batched_tokens``). With an engine profile
(``config/engines``, e.g. ``sglang-0.5``) every instance runs that engine as it ships: all its
knobs on each device (:meth:`EngineProfile.knobs_for`), its batch cap and chunk budget too.

Example::

    space = Space(catalog, "llama-3.1-70b", devices=["h100-sxm"], dtype="fp8")
    [i.label for i in space.instances()]   # ['h100-sxm tp2 fp8 seqs 256 chunk 8192', ...]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from backends.emulator.catalog import Catalog, Deployment, EngineKnobs
from backends.errors import CatalogError

TP_DEGREES = (1, 2, 4, 8)
MAX_NUM_SEQS = (64, 256)
CHUNK_BUDGETS = (2048, 8192)
MIN_BATCH = 4  # a layout must hold at least this many sequences of the workload's length
MODES = ("aggregated", "disaggregated", "conditional")


@dataclass(frozen=True)
class Instance:
    """One instance's deployment: device, devices per instance, tensor parallel degree, dtype
    and engine knobs; ``engine`` names the engine profile whose knobs on this device
    (``profile``) the instance runs (None: the default knobs)."""

    device: str
    count: int
    tp: int
    dtype: str
    max_num_seqs: int
    max_num_batched_tokens: int
    engine: str | None = None
    profile: EngineKnobs | None = None

    @property
    def knobs(self) -> EngineKnobs:
        if self.profile is not None:
            return self.profile
        return EngineKnobs(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens
        )

    @property
    def label(self) -> str:
        layout = f"tp{self.tp}" if self.tp == self.count else f"×{self.count}"
        engine = f" {self.engine}" if self.engine else ""
        return (
            f"{self.device} {layout} {self.dtype}{engine} seqs {self.max_num_seqs} "
            f"chunk {self.max_num_batched_tokens}"
        )


@dataclass(frozen=True)
class Pool:
    role: str  # aggregated | prefill | decode
    instance: Instance
    replicas: int

    @property
    def devices(self) -> int:
        return self.instance.count * self.replicas


@dataclass(frozen=True)
class Candidate:
    """A whole deployment: a mode, its pools and the KV link between them."""

    mode: str
    pools: tuple[Pool, ...]
    link: str | None = None

    @property
    def devices(self) -> int:
        return sum(p.devices for p in self.pools)

    @property
    def heterogeneous(self) -> bool:
        return len({p.instance.device for p in self.pools}) > 1

    def pool(self, role: str) -> Pool:
        return next(p for p in self.pools if p.role == role)

    def with_replicas(self, role: str, replicas: int) -> Candidate:
        pools = tuple(
            Pool(p.role, p.instance, replicas) if p.role == role else p for p in self.pools
        )
        return Candidate(self.mode, pools, self.link)

    @property
    def label(self) -> str:
        parts = [f"{p.role[0].upper()}: {p.replicas} × ({p.instance.label})" for p in self.pools]
        return f"{self.mode} " + " | ".join(parts)


@dataclass
class Space:
    """The devices, layouts and knobs a plan may use for ``model``."""

    catalog: Catalog
    model: str
    devices: Sequence[str]
    dtype: str = "fp8"
    isl: float = 1024.0
    osl: float = 256.0
    tp_degrees: Sequence[int] = TP_DEGREES
    max_num_seqs: Sequence[int] = MAX_NUM_SEQS
    chunk_budgets: Sequence[int] = CHUNK_BUDGETS
    engine: str | None = None  # an engine profile's knobs instead of the grids above
    skipped: dict[str, str] = field(default_factory=dict)

    def instances(self) -> list[Instance]:
        return self._instances

    @cached_property
    def _instances(self) -> list[Instance]:
        out: list[Instance] = []
        for device in self.devices:
            out.extend(self._layouts(device))
        return out

    def _knob_grid(self, device: str) -> list[tuple[EngineKnobs, EngineKnobs | None]]:
        """(knobs, the engine profile's knobs or None) to try on ``device``: the profile's
        alone, or every batch cap and chunk budget of the grid."""
        if self.engine is not None:
            knobs = self.catalog.engine(self.engine).knobs_for(device)
            return [(knobs, knobs)]
        return [
            (EngineKnobs(max_num_seqs=seqs, max_num_batched_tokens=chunk), None)
            for seqs in self.max_num_seqs
            for chunk in self.chunk_budgets
        ]

    def _layouts(self, device: str) -> Iterable[Instance]:
        profile = self.catalog.device(device)
        found = False
        reasons: list[str] = []
        for knobs, engine_knobs in self._knob_grid(device):
            sizes: Iterable[int | None] = (None,) if profile.sized_by_memory else self.tp_degrees
            for tp in sizes:
                try:
                    dep = self.catalog.deployment(
                        device,
                        self.model,
                        dtype=self.dtype,
                        tp=tp or 1,
                        count=tp,
                        engine=knobs,
                    )
                except CatalogError as exc:
                    reasons.append(str(exc))
                    continue
                if dep.kv_capacity_tokens < MIN_BATCH * (self.isl + self.osl):
                    reasons.append(f"{device} tp{tp}: KV holds too few sequences")
                    continue
                found = True
                yield Instance(
                    device,
                    dep.count,
                    dep.tp,
                    self.dtype,
                    knobs.max_num_seqs,
                    knobs.max_num_batched_tokens,
                    self.engine,
                    engine_knobs,
                )
        if not found:
            self.skipped[device] = reasons[0] if reasons else "no layout fits"

    def deployment(self, instance: Instance) -> Deployment:
        return self.catalog.deployment(
            instance.device,
            self.model,
            dtype=instance.dtype,
            tp=instance.tp,
            count=instance.count,
            engine=instance.knobs,
        )


def link_between(catalog: Catalog, prefill: str, decode: str, same: str, cross: str) -> str:
    """The KV link of a prefill → decode pair: ``same`` (GPU-direct RDMA) between devices of
    one vendor, ``cross`` between vendors, whose KV is staged through host memory (the
    network hop is then the narrower one: PCIe 5 staging runs at 54 GB/s, config/links.yaml)."""
    a, b = catalog.device(prefill), catalog.device(decode)
    return same if a.vendor and a.vendor == b.vendor else cross
