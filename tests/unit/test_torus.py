"""Collectives on a torus fabric (TPU ICI, Trainium2 and Inferentia2 NeuronLink): hand-worked
numbers.

Notation: ``V`` the buffer per chip (bytes), ``B`` one link's bandwidth per direction, ``α``
the collective's fixed latency (``efficiency.allreduce_latency_s``, 13 µs), ``τ`` one hop
(``topology.hop_latency_s``, 1 µs). A ring along an axis of ``d`` chips gets ``2B`` per chip
when the axis closes (it spans the whole fabric axis, ``d ≥ 3``), else ``B`` (a line).
Reduce-scatter along one axis costs ``(d − 1)/d · V_axis / BW_axis`` and ``d − 1`` hops; an
all-reduce is a reduce-scatter plus the mirroring all-gather, ``α + 2 · RS``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from backends.emulator.catalog import Catalog, HbmDevice, ParallelLayout, TorusTopology
from backends.emulator.timing import (
    HbmConstants,
    ModelShape,
    StepShape,
    Torus,
    all_to_all_time,
    allreduce_time,
    layout_comm_time,
    torus_all_to_all_time,
    torus_allreduce_time,
    torus_group,
    torus_reduce_scatter_time,
)
from backends.errors import CatalogError

CONFIG = Path(__file__).resolve().parents[2] / "config"
MIB64 = 64 * 2**20  # 67,108,864 bytes
ALPHA = 13e-6
TAU = 1e-6


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def _fabric(catalog: Catalog, device: str, tp: int) -> HbmConstants:
    dep = catalog.deployment(device, "llama-3.1-8b", dtype="bf16", tp=tp)
    c = dep._constants
    assert isinstance(c, HbmConstants)
    return c


def _torus(c: HbmConstants) -> Torus:
    assert c.torus is not None
    return c.torus


# --- the profiles' fabrics ---------------------------------------------------------------


def test_profiles_split_the_chip_bandwidth_over_their_links(catalog: Catalog) -> None:
    """Per-direction chip bandwidth / links = one link: v5e 200/4 = 50 GB/s, v6e 400/4 = 100,
    Ironwood 600/6 = 100, Inferentia2 103/2 = 51.5; Trn2 gives its links per axis: 160 in the
    instance's plane (640/4) and 160 across the UltraServer's instances (assumed the same)."""
    expected = {
        "tpu-v5e": ((16, 16), 50e9),
        "tpu-v6e": ((16, 16), 100e9),
        "tpu-v7": ((4, 4, 4), 100e9),
        "trainium2": ((4, 4, 4), 160e9),
        "inferentia2": ((12,), 51.5e9),
    }
    for name, (dims, link) in expected.items():
        t = _torus(_fabric(catalog, name, 2))
        assert t.dims == dims, name
        assert t.link == pytest.approx(link, rel=1e-12), name
        assert t.hop_latency_s == TAU
        device = catalog.device(name)
        assert isinstance(device, HbmDevice)
        assert "topology" in device.sources
        assert "topology.hop_latency_s" in device.sources


def test_switched_devices_have_no_torus(catalog: Catalog) -> None:
    """NVIDIA, AMD, Gaudi, Trainium3 (NeuronSwitch) and the rest keep the switched link."""
    torus = {"tpu-v5e", "tpu-v6e", "tpu-v7", "trainium2", "inferentia2"}
    for name, device in catalog.devices.items():
        if isinstance(device, HbmDevice):
            assert (device.topology is not None) == (name in torus), name


# --- the sub-torus a group runs on -------------------------------------------------------


def test_groups_take_the_compact_box() -> None:
    """v6e: 4 chips 2 × 2, 8 chips 2 × 4, 16 chips 4 × 4 (Google's slices); Trn2: 16 = the
    whole 4 × 4; Ironwood: 8 chips 2 × 2 × 2. 16 chips of a 16 × 16 pod tie on bandwidth
    between 4 × 4 (lines: rotated RS 3/4·1/2/B + 3/4·1/8/B = 0.46875 V/B) and a closed 1 × 16
    ring (15/16 · V / 2B = 0.46875 V/B); the box wins on hops (6 against 15)."""
    v6e = Torus((16, 16), 100e9, TAU)
    assert [_shape(v6e, n) for n in (2, 4, 8, 16)] == [(1, 2), (2, 2), (2, 4), (4, 4)]
    assert _shape(Torus((4, 4), 160e9, TAU), 16) == (4, 4)
    assert _shape(Torus((4, 4, 4), 100e9, TAU), 8) == (2, 2, 2)
    assert torus_group(Torus((4, 4), 160e9, TAU), 32) is None
    assert torus_group(Torus((4, 4, 4), 160e9, TAU, instance_axes=2), 128) is None
    assert torus_group(Torus((12,), 51.5e9, TAU), 13) is None
    assert torus_group(Torus((4, 4), 160e9, TAU), 5) is None  # prime, longer than any axis


def _shape(t: Torus, n: int) -> tuple[int, ...]:
    group = torus_group(t, n)
    assert group is not None
    return group.shape


# --- 64 MiB all-reduces, by hand ---------------------------------------------------------


def test_64mib_allreduce_on_a_v6e_2x2(catalog: Catalog) -> None:
    """2 × 2 box of a 16 × 16 pod: both axes are lines (no wraparound), B = 100 GB/s.
    Axes run at once on halves of V: phase 1 each half (V/2) over its axis: 1/2 · V/2 / B;
    phase 2 the quarter left: 1/2 · V/4 / B. RS = 2τ + 0.375 · V/B
    = 2 µs + 0.375 · 67,108,864 / 1e11 = 2 µs + 251.658 µs; AR = α + 2 · RS = 520.316 µs."""
    c = _fabric(catalog, "tpu-v6e", 4)
    t = _torus(c)
    rs = 2 * TAU + 0.375 * MIB64 / 100e9
    assert torus_reduce_scatter_time(t, 4, MIB64, 0.0) == pytest.approx(rs, rel=1e-12)
    got = torus_allreduce_time(t, 4, MIB64, c.allreduce_latency_s)
    assert got == pytest.approx(ALPHA + 2 * rs, rel=1e-12)
    assert got == pytest.approx(520.316e-6, abs=1e-9)
    # a switch giving each chip all four links (400 GB/s) would take 2 · 3/4 · V / 4e11:
    # the box uses two of each chip's four links, so its bandwidth term is twice that.
    switched = ALPHA + 2 * 3 / 4 * MIB64 / 400e9
    assert got - ALPHA - 4 * TAU == pytest.approx(2 * (switched - ALPHA), rel=1e-12)


def test_64mib_allreduce_on_a_v6e_4x4(catalog: Catalog) -> None:
    """4 × 4 box: lines again (4 < 16). Rotated: phase 1 3/4 · V/2 / B, phase 2 3/4 · V/8 / B,
    RS = 0.46875 · V/B and 2 · 3 hops. AR = 13 µs + 2 · (6 µs + 314.573 µs) = 654.146 µs."""
    c = _fabric(catalog, "tpu-v6e", 16)
    rs = 6 * TAU + 0.46875 * MIB64 / 100e9
    got = torus_allreduce_time(_torus(c), 16, MIB64, c.allreduce_latency_s)
    assert got == pytest.approx(ALPHA + 2 * rs, rel=1e-12)
    assert got == pytest.approx(654.146e-6, abs=1e-9)


def test_64mib_allreduce_on_a_trn2_4x4(catalog: Catalog) -> None:
    """The whole Trn2 instance: both axes close (wraparound), 2B = 320 GB/s per axis.
    Rotated: 3/4 · V/2 / 2B + 3/4 · V/8 / 2B = 0.234375 · V/B = 0.234375 · 67,108,864 / 1.6e11
    = 98.304 µs; RS = 6 µs + 98.304 µs; AR = 13 + 2 · 104.304 = 221.608 µs. Its bandwidth term
    equals a switch's at 640 GB/s (2 · 15/16 · V / 6.4e11 = 196.608 µs): every link is busy."""
    c = _fabric(catalog, "trainium2", 16)
    got = torus_allreduce_time(_torus(c), 16, MIB64, c.allreduce_latency_s)
    assert got == pytest.approx(221.608e-6, abs=1e-9)
    switched_bw = 2 * 15 / 16 * MIB64 / 640e9
    assert got - ALPHA - 12 * TAU == pytest.approx(switched_bw, rel=1e-12)


def test_64mib_allreduce_on_a_v7_2x2x2(catalog: Catalog) -> None:
    """2 × 2 × 2 box of a 4 × 4 × 4 cube: three lines, B = 100 GB/s. Thirds of V, one per axis:
    1/2 · V/3 / B + 1/2 · V/6 / B + 1/2 · V/12 / B = 7/24 · V/B = 195.734 µs; 3 hops.
    AR = 13 µs + 2 · (3 µs + 195.734 µs) = 410.468 µs."""
    c = _fabric(catalog, "tpu-v7", 8)
    got = torus_allreduce_time(_torus(c), 8, MIB64, c.allreduce_latency_s)
    assert got == pytest.approx(ALPHA + 2 * (3 * TAU + 7 / 24 * MIB64 / 100e9), rel=1e-12)
    assert got == pytest.approx(410.468e-6, abs=1e-9)


def test_small_buffers_take_the_fewest_hops() -> None:
    """A decode step's all-reduce (one token of an 8,192-wide model at 16 bits: 16 KiB) on a
    v6e 2 × 4: one axis after the other costs 1 + 3 = 4 hops and (1/2 + 3/4 · 1/2) · V/B;
    all axes at once costs 3 + 3 = 6 hops. The library runs the first:
    4 µs + 0.875 · 16,384 / 1e11 = 4.143 µs."""
    t = Torus((16, 16), 100e9, TAU)
    v = 16384.0
    assert torus_reduce_scatter_time(t, 8, v, 0.0) == pytest.approx(4e-6 + 0.875 * v / 100e9)


def test_an_axis_that_closes_runs_at_two_links() -> None:
    """A closed ring of 16 (the full axis of a 16 × 16 pod) against the same 16 chips as a line
    (a 32-long axis cut to 16): (15/16) · V / 2B against (15/16) · V / B."""
    closed = Torus((16,), 100e9, 0.0)
    line = Torus((32,), 100e9, 0.0)
    v = 1e6
    assert torus_reduce_scatter_time(closed, 16, v, 0.0) == pytest.approx(15 / 16 * v / 200e9)
    assert torus_reduce_scatter_time(line, 16, v, 0.0) == pytest.approx(15 / 16 * v / 100e9)
    mesh = Torus((16,), 100e9, 0.0, wraparound=False)
    assert torus_reduce_scatter_time(mesh, 16, v, 0.0) == pytest.approx(15 / 16 * v / 100e9)


# --- Trainium2: an instance's 4 × 4, an UltraServer's 4 × 4 × 4 -----------------------------


def test_trn2_groups_that_fit_an_instance_are_unchanged(catalog: Catalog) -> None:
    """The UltraServer profile (4 × 4 × 4, instances on the first two axes) prices every group
    of up to 16 chips as the 4 × 4 instance did, to the last bit: the box stays in one
    instance. 8 chips would run faster as 2 × 2 × 2 over two instances (7/24 · V/B against
    2 × 4's 11/32 · V/B), but a deployment on one trn2.48xlarge has no third axis."""
    instance = Torus((4, 4), 160e9, TAU)
    ultra = _torus(_fabric(catalog, "trainium2", 16))
    for n in (2, 4, 8, 12, 16):
        assert _shape(ultra, n)[2] == 1, n
        for v in (16384.0, float(MIB64)):
            assert torus_allreduce_time(ultra, n, v, ALPHA) == torus_allreduce_time(
                instance, n, v, ALPHA
            )
            assert torus_all_to_all_time(ultra, n, v, ALPHA) == torus_all_to_all_time(
                instance, n, v, ALPHA
            )
    free = dataclasses.replace(ultra, instance_axes=0)
    assert _shape(free, 8) == (2, 2, 2)
    assert torus_reduce_scatter_time(free, 8, MIB64, 0.0) < torus_reduce_scatter_time(
        ultra, 8, MIB64, 0.0
    )


def test_64mib_allreduce_on_a_trn2_ultraserver(catalog: Catalog) -> None:
    """64 chips, the whole 4 × 4 × 4, every axis closed (2B = 320 GB/s). Thirds of V, one per
    axis: 3/4 · V/3 / 2B + 3/4 · V/12 / 2B + 3/4 · V/48 / 2B = 0.1640625 · V/B
    = 0.1640625 · 419.4304 µs = 68.8128 µs; 3 + 3 + 3 hops. AR = 13 + 2 · (9 + 68.8128)
    = 168.6256 µs. The bandwidth term is a switch's at six links (960 GB/s):
    2 · 63/64 · V / 9.6e11 = 137.6256 µs."""
    c = _fabric(catalog, "trainium2", 64)
    t = _torus(c)
    assert _shape(t, 64) == (4, 4, 4)
    got = torus_allreduce_time(t, 64, MIB64, c.allreduce_latency_s)
    assert got == pytest.approx(168.6256e-6, abs=1e-9)
    assert got - ALPHA - 18 * TAU == pytest.approx(2 * 63 / 64 * MIB64 / 960e9, rel=1e-12)


def test_64mib_allreduce_on_half_a_trn2_ultraserver(catalog: Catalog) -> None:
    """32 chips: two whole instances, 4 × 4 × 2 (of the equal boxes, 2 × 4 × 4 over four
    instances costs the same; the one over fewer machines is taken). The third axis is a line
    of two (B). Thirds of V; phase 1: the line's third 1/2 · V/3 / B = 32/192 · V/B (the
    in-plane thirds take 3/4 · V/3 / 2B = 24/192); phase 2: the line's part on a closed axis
    3/4 · V/6 / 2B = 12/192; phase 3: 3/4 · V/24 / 2B = 3/192. RS = 9τ + 47/192 · V/B
    = 9 µs + 102.6731 µs; AR = 13 + 2 · 111.6731 = 236.3462 µs: slower than one instance's
    16 chips (221.608 µs) because the half-server's third axis does not close."""
    c = _fabric(catalog, "trainium2", 32)
    t = _torus(c)
    assert _shape(t, 32) == (4, 4, 2)
    rs = 9 * TAU + 47 / 192 * MIB64 / 160e9
    got = torus_allreduce_time(t, 32, MIB64, c.allreduce_latency_s)
    assert got == pytest.approx(ALPHA + 2 * rs, rel=1e-12)
    assert got == pytest.approx(236.3462e-6, abs=1e-9)


def test_llama_405b_at_16_bits_deploys_on_32_and_64_trn2_chips(catalog: Catalog) -> None:
    """405B parameters at 2 bytes = 810 GB: 25.3 GB a chip over 32, 12.7 over 64 (103.1 GB
    each); the step's all-reduces run on the UltraServer's boxes."""
    for tp, shape in ((32, (4, 4, 2)), (64, (4, 4, 4))):
        dep = catalog.deployment("trainium2", "llama-3.1-405b", dtype="bf16", tp=tp)
        c = dep._constants
        assert isinstance(c, HbmConstants)
        assert c.tp == tp
        assert _shape(_torus(c), tp) == shape
        assert dep.kv_capacity_tokens > 0


# --- Inferentia2: the inf2.48xlarge's ring of 12 -------------------------------------------


def test_64mib_allreduce_on_the_inf2_ring(catalog: Catalog) -> None:
    """All 12 chips close the ring: 2B = 103 GB/s per chip, the switched figure. RS = 11τ +
    11/12 · V / 103e9 = 11 µs + 597.2472 µs; AR = 13 + 2 · 608.2472 = 1,229.494 µs, the switched
    all-reduce (1,207.494 µs) plus 22 hops."""
    c = _fabric(catalog, "inferentia2", 12)
    t = _torus(c)
    got = torus_allreduce_time(t, 12, MIB64, c.allreduce_latency_s)
    assert got == pytest.approx(1229.494e-6, abs=1e-9)
    switched = ALPHA + 2 * 11 / 12 * MIB64 / 103e9
    assert got - 22 * TAU == pytest.approx(switched, rel=1e-12)


def test_64mib_allreduce_on_an_arc_of_the_inf2_ring(catalog: Catalog) -> None:
    """4 chips are an arc of the ring, a line: one link, B = 51.5 GB/s. RS = 3τ + 3/4 · V/B
    = 3 µs + 977.3136 µs; AR = 13 + 2 · 980.3136 = 1,973.627 µs: the bandwidth term is twice
    the switched model's (which gave each chip both links' 103 GB/s)."""
    c = _fabric(catalog, "inferentia2", 4)
    t = _torus(c)
    assert _shape(t, 4) == (4,)
    got = torus_allreduce_time(t, 4, MIB64, c.allreduce_latency_s)
    assert got == pytest.approx(1973.627e-6, abs=1e-9)
    switched_bw = 2 * 3 / 4 * MIB64 / 103e9
    assert got - ALPHA - 6 * TAU == pytest.approx(2 * switched_bw, rel=1e-12)


@pytest.mark.parametrize(
    ("device", "model", "tp"),
    [
        ("trainium2", "llama-3.1-405b", 32),
        ("trainium2", "llama-3.1-405b", 64),
        ("inferentia2", "llama-3.1-70b", 12),
        ("inferentia2", "llama-3.1-8b", 2),
    ],
)
def test_pdgate_simulate_runs_on_the_neuronlink_fabrics(
    device: str, model: str, tp: int, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from gateway.cli import main

    argv = ["simulate", "--device", device, "--model", model, "--dtype", "bf16"]
    argv += ["--tp", str(tp), "--isl", "128", "--osl", "8", "--concurrency", "2"]
    assert main([*argv, "--requests", "2", "--json", "--no-progress"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["requests"] == 2, m["errors"]
    assert m["itl_s"]["mean"] > 0


# --- all-to-all ----------------------------------------------------------------------------


def test_all_to_all_on_a_v6e_2x4_is_bisection_bound() -> None:
    """8 chips, 2 × 4 lines, each sending P over the other 7. Cutting the 4-axis in halves of
    4 chips: 4 · 4/7 · P cross each way over 2 rows of one link: 16/7 · P / 2B = 1.1429 P/B;
    the 2-axis cut has 4 rows: 0.5714 P/B; injection over two links P / 2B. Diameter 1 + 3.
    A switch at 400 GB/s per chip would take P / 4B: the torus is 4.57 × slower."""
    t = Torus((16, 16), 100e9, TAU)
    p = 1e6
    got = torus_all_to_all_time(t, 8, p, ALPHA)
    assert got == pytest.approx(ALPHA + 4 * TAU + 16 / 7 * p / 200e9, rel=1e-12)


def test_all_to_all_on_a_trn2_4x4() -> None:
    """16 chips, both axes closed (2B each): cut halves 8 | 8, 8 · 8/15 · P each way over
    4 rows × 2 links: 64/15 · P / (8B) = 0.5333 P/B; injection P / 4B. Diameter 2 + 2."""
    t = Torus((4, 4), 160e9, TAU)
    p = 1e6
    got = torus_all_to_all_time(t, 16, p, ALPHA)
    assert got == pytest.approx(ALPHA + 4 * TAU + 64 / 15 * p / (8 * 160e9), rel=1e-12)


# --- never faster than a switch ------------------------------------------------------------

FABRICS = st.lists(st.integers(1, 16), min_size=1, max_size=3).map(tuple)


@settings(max_examples=300, deadline=None)
@given(FABRICS, st.integers(2, 64), st.floats(1.0, 1e9), st.booleans())
def test_a_torus_is_never_faster_than_a_switch(
    dims: tuple[int, ...], n: int, volume: float, wrap: bool
) -> None:
    """With ``2 · axes`` links per chip at ``B``, a switch gives each chip ``2 · axes · B`` per
    direction: all-reduce ``2 · (n − 1)/n · V / BW``, all-to-all ``P / BW``. No algorithm on the
    torus can beat that (each chip must move as many bytes over fewer or equal links)."""
    t = Torus(dims, 50e9, 1e-6, wrap)
    if torus_group(t, n) is None:
        return
    bw = 2 * len(dims) * t.link
    assert torus_allreduce_time(t, n, volume, ALPHA) >= ALPHA + 2 * (n - 1) / n * volume / bw
    assert torus_all_to_all_time(t, n, volume, ALPHA) >= ALPHA + volume / bw


@settings(max_examples=300, deadline=None)
@given(
    FABRICS.filter(lambda d: len(d) > 1),
    st.lists(st.floats(10e9, 400e9), min_size=3, max_size=3),
    st.integers(2, 64),
    st.floats(1.0, 1e9),
    st.integers(0, 2),
)
def test_per_axis_links_and_instances_never_beat_a_switch(
    dims: tuple[int, ...], rates: list[float], n: int, volume: float, instance_axes: int
) -> None:
    """The same bound with a link rate per axis (a switch at ``2 · Σ_axes B_axis`` per chip),
    and with groups kept inside one machine of the leading ``instance_axes`` axes."""
    axis_link = tuple(rates[: len(dims)])
    t = Torus(dims, axis_link[0], 1e-6, True, axis_link, min(instance_axes, len(dims) - 1))
    if torus_group(t, n) is None:
        return
    bw = 2 * sum(axis_link)
    assert torus_allreduce_time(t, n, volume, ALPHA) >= ALPHA + 2 * (n - 1) / n * volume / bw
    assert torus_all_to_all_time(t, n, volume, ALPHA) >= ALPHA + volume / bw


# --- the step physics: torus devices use it, switched devices are unchanged ----------------

MODEL = ModelShape(
    layers=10,
    hidden=1000,
    attn_width=1000,
    active_params=1e9,
    dense_weight_bytes=2e9,
    expert_weight_bytes=0.0,
    experts=0,
    top_k=0,
    kv_bytes_per_token=1e4,
    act_bytes=2.0,
)


def _consts(**kw: object) -> HbmConstants:
    base: dict[str, object] = {
        "peak_flops": 1e15,
        "bandwidth": 1e12,
        "mfu": 0.5,
        "bandwidth_efficiency": 0.7,
        "step_overhead_s": 0.0,
        "layer_overhead_s": 0.0,
        "tp": 4,
        "interconnect": 400e9,
        "allreduce_latency_s": ALPHA,
    }
    base.update(kw)
    return HbmConstants(**base)  # type: ignore[arg-type]


def test_step_allreduce_goes_over_the_torus() -> None:
    """Two all-reduces per layer of ``N · hidden · 2`` bytes: 100 tokens → V = 200,000 B."""
    t = Torus((16, 16), 100e9, TAU)
    s = StepShape.of([(100, 0)])
    got = allreduce_time(MODEL, s, _consts(torus=t))
    assert got == pytest.approx(2 * 10 * torus_allreduce_time(t, 4, 200_000.0, ALPHA))
    flat = allreduce_time(MODEL, s, _consts())
    assert flat == 2 * 10 * (ALPHA + 2 * 3 / 4 * 200_000.0 / 400e9)  # switched: as before
    assert got > flat


def test_layouts_on_a_torus() -> None:
    """Attention DP 2 × TP 4: one all-reduce per layer of N/dp tokens over the TP box (a dense
    model has no expert all-to-all); the all-to-all over 8 expert chips is the torus's;
    pipeline stages hand over through one link (B) and one hop."""
    t = Torus((16, 16), 100e9, TAU)
    s = StepShape.of([(100, 0)] * 2)
    c = _consts(torus=t, dp=2, ep=2)
    ar = torus_allreduce_time(t, 4, 100 * 1000 * 2.0, ALPHA)
    assert layout_comm_time(MODEL, s, c) == pytest.approx(10 * ar)  # dense model: no experts
    assert all_to_all_time(c, 1e6, 8) == torus_all_to_all_time(t, 8, 1e6, ALPHA)
    pp = _consts(torus=t, tp=1, pp=3)
    send = ALPHA + TAU + 200 * 1000 * 2.0 / 100e9
    assert layout_comm_time(MODEL, s, pp) == pytest.approx(2 * send)


def test_switched_gpu_timing_is_unchanged(catalog: Catalog) -> None:
    """H100 TP 8, a decode and a prefill step: the all-reduce term is still the flat ring
    ``2 · layers · (α + 2 · 7/8 · N · hidden · 2 / 450 GB/s)``, to the last bit."""
    dev = yaml.safe_load((CONFIG / "devices" / "h100-sxm.yaml").read_text())
    mod = yaml.safe_load((CONFIG / "models" / "llama-3.1-70b.yaml").read_text())
    dep = catalog.deployment("h100-sxm", "llama-3.1-70b", dtype="fp8", tp=8)
    c = dep._constants
    assert isinstance(c, HbmConstants)
    assert c.torus is None
    lat = dev["efficiency"]["allreduce_latency_s"]
    bw = dev["interconnect_gb_s"] * 1e9
    for shape in (StepShape.of([(1, 1000)] * 4), StepShape.of([(2048, 0)])):
        payload = 2.0 * 7 / 8 * shape.new_tokens * mod["hidden"] * 2.0
        expected = 2 * mod["layers"] * (lat + payload / bw)
        assert allreduce_time(dep.model_shape, shape, c) == expected


def test_a_tpu_step_pays_more_than_the_flat_ring(catalog: Catalog) -> None:
    """TPU v6e TP 8 on Llama 3.1 70B: the torus's hops and its unused links make each step's
    communication costlier than the old flat ring at the same per-chip bandwidth."""
    dep = catalog.deployment("tpu-v6e", "llama-3.1-70b", dtype="bf16", tp=8)
    c = dep._constants
    assert isinstance(c, HbmConstants)
    assert c.torus is not None
    flat = dataclasses.replace(c, torus=None)
    for shape in (StepShape.of([(1, 1000)]), StepShape.of([(4096, 0)])):
        assert allreduce_time(dep.model_shape, shape, c) > allreduce_time(
            dep.model_shape, shape, flat
        )


# --- the catalog ----------------------------------------------------------------------------


def test_a_group_that_fits_no_box_is_refused(catalog: Catalog) -> None:
    with pytest.raises(CatalogError, match="128 chips fits no box"):
        catalog.deployment("trainium2", "llama-3.1-8b", dtype="bf16", tp=128)
    with pytest.raises(CatalogError, match="16 chips fits no box of its 12-chip ring"):
        catalog.deployment("inferentia2", "llama-3.1-8b", dtype="bf16", tp=16)
    device = catalog.device("trainium2")
    with pytest.raises(CatalogError, match="5 chips"):
        device.check_layout(ParallelLayout(tp=1, moe_tp=1, ep=5))
    catalog.device("h100-sxm").check_layout(ParallelLayout(tp=5))  # switched: anything goes


def test_per_axis_links_and_instances_are_checked() -> None:
    with pytest.raises(ValidationError, match="one positive rate per axis"):
        TorusTopology(
            kind="torus", dims=[4, 4, 4], links=6, hop_latency_s=1e-6, axis_link_gb_s=[160, 160]
        )
    with pytest.raises(ValidationError, match="instance_axes must leave an axis"):
        TorusTopology(kind="torus", dims=[4, 4], links=4, hop_latency_s=1e-6, instance_axes=2)
    topo = TorusTopology(
        kind="torus",
        dims=[4, 4, 4],
        links=6,
        hop_latency_s=1e-6,
        axis_link_gb_s=[160, 160, 80],
        instance_axes=2,
    )
    t = topo.fabric(640.0)
    assert (t.link, t.axis_bandwidth(2)) == (160e9, 80e9)  # not 640/6 per link
    assert topo.describe() == "4×4×4 torus (4×4 per instance), 6 links per chip"
    # a slower third axis: the 64 chips' ring across the instances runs at 2 · 80 GB/s
    whole = torus_group(t, 64)
    assert whole is not None
    assert whole.axis_bw == (320e9, 320e9, 160e9)


def test_a_torus_needs_two_links_per_axis() -> None:
    with pytest.raises(ValidationError, match="needs 6 links"):
        TorusTopology(kind="torus", dims=[4, 4, 4], links=4, hop_latency_s=1e-6)
    topo = TorusTopology(kind="torus", dims=[4, 4], links=6, hop_latency_s=1e-6)
    assert topo.fabric(600.0).link == pytest.approx(100e9)  # spare links share the bandwidth
    assert topo.chips == math.prod([4, 4])
