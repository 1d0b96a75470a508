"""Physics of the device families beyond HBM and SRAM pipelines (backends/emulator/timing.py).

Each function is checked against its documented formula, with expected values derived here from
synthetic constants or from the YAML, never from the function under test.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.emulator.catalog import Catalog
from backends.emulator.timing import (
    DataflowConstants,
    DramSramConstants,
    HardwiredConstants,
    HbmConstants,
    InMemoryConstants,
    MemoryTiers,
    ModelShape,
    StepShape,
    allreduce_time,
    dataflow_step_time,
    dram_sram_step_time,
    forward_flops,
    hardwired_step_time,
    in_memory_step_time,
    model_switch_time,
    ring_allreduce_time,
    tiered_memory_time,
)

CONFIG = Path(Catalog.default_dir())


def _yaml(rel: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CONFIG / rel).read_text())
    return data


# A small dense model with round numbers: 1 GB of 16-bit weights, 1 KB of KV per token.
TINY = ModelShape(
    layers=10,
    hidden=1000,
    attn_width=1000,
    active_params=0.5e9,
    dense_weight_bytes=1e9,
    expert_weight_bytes=0.0,
    experts=0,
    top_k=0,
    kv_bytes_per_token=1000.0,
    act_bytes=2.0,
)

TIERS = MemoryTiers(
    sram_bandwidth=100e12,
    dram_bandwidth=1e12,
    sram_efficiency=0.5,
    dram_efficiency=0.8,
    devices=2,
    weights_in_sram=True,
    sram_kv_bytes=1e6,
)


# -- all-reduce ---------------------------------------------------------------------------


def test_ring_allreduce_matches_the_hbm_all_reduce_for_the_same_fabric() -> None:
    shape = StepShape.of([(1, 100)] * 8)
    hbm = HbmConstants(
        peak_flops=1e15,
        bandwidth=1e12,
        mfu=0.5,
        bandwidth_efficiency=0.7,
        step_overhead_s=0.0,
        layer_overhead_s=0.0,
        tp=4,
        interconnect=50e9,
        allreduce_latency_s=1e-5,
    )
    expected = 2 * TINY.layers * (1e-5 + 2 * 3 / 4 * 8 * TINY.hidden * 2.0 / 50e9)
    assert ring_allreduce_time(TINY, shape, 4, 50e9, 1e-5) == pytest.approx(expected, rel=1e-12)
    assert allreduce_time(TINY, shape, hbm) == pytest.approx(expected, rel=1e-12)
    assert ring_allreduce_time(TINY, shape, 1, 50e9, 1e-5) == 0.0


# -- memory tiers (P1b, P4) ---------------------------------------------------------------


def test_tiered_memory_time_weights_in_sram_and_kv_filling_sram_first() -> None:
    # 99 context tokens + 1 new token on each of 20 sequences: 2,000 tokens, 2 MB of KV.
    shape = StepShape.of([(1, 99)] * 20)
    kv = 20 * 100 * 1000.0
    sram = 0.5 * 100e12 * 2
    dram = 0.8 * 1e12 * 2
    expected = 1e9 / sram + 1e6 / sram + (kv - 1e6) / dram
    assert tiered_memory_time(TINY, shape, TIERS) == pytest.approx(expected, rel=1e-12)


def test_tiered_memory_time_weights_in_dram_are_read_at_dram_speed() -> None:
    shape = StepShape.of([(1, 99)])
    in_dram = dataclasses.replace(TIERS, weights_in_sram=False)
    kv = 100 * 1000.0  # all of it fits in the SRAM left for KV
    expected = 1e9 / (0.8 * 1e12 * 2) + kv / (0.5 * 100e12 * 2)
    assert tiered_memory_time(TINY, shape, in_dram) == pytest.approx(expected, rel=1e-12)
    # Same step, weights in SRAM: faster by exactly the bandwidth ratio on the weight term.
    assert tiered_memory_time(TINY, shape, TIERS) == pytest.approx(
        1e9 / (0.5 * 100e12 * 2) + kv / (0.5 * 100e12 * 2), rel=1e-12
    )


def test_tiered_memory_time_without_sram_for_kv_reads_all_kv_from_dram() -> None:
    shape = StepShape.of([(1, 499)] * 4)
    full = dataclasses.replace(TIERS, sram_kv_bytes=0.0)
    expected = 1e9 / (0.5 * 100e12 * 2) + 4 * 500 * 1000.0 / (0.8 * 1e12 * 2)
    assert tiered_memory_time(TINY, shape, full) == pytest.approx(expected, rel=1e-12)


def _dram_sram(tiers: MemoryTiers = TIERS) -> DramSramConstants:
    return DramSramConstants(
        peak_flops=100e12,
        mfu=0.5,
        tiers=tiers,
        step_overhead_s=1e-4,
        layer_overhead_s=1e-6,
        interconnect=32e9,
        allreduce_latency_s=2e-5,
    )


def test_dram_sram_step_time_memory_bound_decode_is_the_formula() -> None:
    c = _dram_sram(dataclasses.replace(TIERS, weights_in_sram=False))
    shape = StepShape.of([(1, 999)])
    flops = 2 * 0.5e9 + 4 * 10 * 1000 * (999 + 1)
    t_compute = flops / (0.5 * 100e12 * 2)
    t_memory = 1e9 / (0.8 * 1e12 * 2) + 1000 * 1000.0 / (0.5 * 100e12 * 2)
    assert t_memory > 10 * t_compute
    comm = 2 * 10 * (2e-5 + 2 * 1 / 2 * 1 * 1000 * 2.0 / 32e9)
    expected = t_memory + 1e-4 + 10 * 1e-6 + comm
    assert dram_sram_step_time(TINY, shape, c) == pytest.approx(expected, rel=1e-12)


def test_dram_sram_step_time_compute_bound_prefill_is_the_formula() -> None:
    c = _dram_sram()
    n = 4096
    shape = StepShape.of([(n, 0)])
    flops = 2 * 0.5e9 * n + 4 * 10 * 1000 * n * (n + 1) / 2
    assert flops == pytest.approx(forward_flops(TINY, shape), rel=1e-12)
    t_compute = flops / (0.5 * 100e12 * 2)
    comm = 2 * 10 * (2e-5 + 2 * 1 / 2 * n * 1000 * 2.0 / 32e9)
    expected = t_compute + 1e-4 + 10 * 1e-6 + comm
    assert tiered_memory_time(TINY, shape, c.tiers) < t_compute
    assert dram_sram_step_time(TINY, shape, c) == pytest.approx(expected, rel=1e-12)


# -- in-memory compute (P4) ---------------------------------------------------------------


def test_in_memory_step_time_is_latency_plus_the_larger_roof() -> None:
    c = InMemoryConstants(latency_s=5e-4, compute_flops=1e15, tiers=TIERS)
    decode = StepShape.of([(1, 99)] * 20)
    t_mem = tiered_memory_time(TINY, decode, TIERS)
    t_flops = forward_flops(TINY, decode) / 1e15
    assert in_memory_step_time(TINY, decode, c) == pytest.approx(
        5e-4 + max(t_mem, t_flops), rel=1e-12
    )
    prefill = StepShape.of([(8192, 0)])
    flops = 2 * 0.5e9 * 8192 + 4 * 10 * 1000 * 8192 * 8193 / 2
    assert in_memory_step_time(TINY, prefill, c) == pytest.approx(5e-4 + flops / 1e15, rel=1e-12)


def test_in_memory_spill_to_dram_is_two_orders_slower_on_weights() -> None:
    c = InMemoryConstants(latency_s=0.0, compute_flops=math.inf, tiers=TIERS)
    spilled = dataclasses.replace(c, tiers=dataclasses.replace(TIERS, weights_in_sram=False))
    shape = StepShape.of([(1, 0)])
    ratio = in_memory_step_time(TINY, shape, spilled) / in_memory_step_time(TINY, shape, c)
    # Weight bytes dominate: the ratio is the achieved SRAM/DRAM bandwidth ratio, 50 TB/s / 0.8.
    assert ratio == pytest.approx((0.5 * 100e12) / (0.8 * 1e12), rel=1e-3)


# -- dataflow (P5) ------------------------------------------------------------------------

DATAFLOW = DataflowConstants(
    peak_flops=600e12,
    hbm_bandwidth=1.6e12,
    mfu=0.5,
    hbm_efficiency=0.75,
    step_overhead_s=1e-4,
    layer_overhead_s=1e-6,
    sockets=16,
    ddr_bandwidth=0.1e12,
)


def test_dataflow_step_time_streams_weights_and_kv_from_hbm() -> None:
    shape = StepShape.of([(1, 999)] * 4)
    bytes_moved = 1e9 + 4 * 1000 * 1000.0
    t_memory = bytes_moved / (0.75 * 1.6e12 * 16)
    t_compute = forward_flops(TINY, shape) / (0.5 * 600e12 * 16)
    assert t_memory > t_compute
    expected = t_memory + 1e-4 + 10 * 1e-6
    assert dataflow_step_time(TINY, shape, DATAFLOW) == pytest.approx(expected, rel=1e-12)


def test_dataflow_step_time_has_no_all_reduce_term() -> None:
    # More sockets only divide the roofs; nothing grows with the socket count.
    shape = StepShape.of([(1, 0)])
    few = dataclasses.replace(DATAFLOW, sockets=1, step_overhead_s=0.0, layer_overhead_s=0.0)
    many = dataclasses.replace(few, sockets=16)
    assert dataflow_step_time(TINY, shape, many) == pytest.approx(
        dataflow_step_time(TINY, shape, few) / 16, rel=1e-12
    )


def test_model_switch_time_is_weights_over_aggregate_ddr_bandwidth() -> None:
    assert model_switch_time(16e9, DATAFLOW) == pytest.approx(16e9 / (16 * 0.1e12))


# -- hard-wired (P6) ----------------------------------------------------------------------

HARDWIRED = HardwiredConstants(token_latency_s=6e-5, prompt_token_s=2e-6, slots=4)


@pytest.mark.parametrize(("batch", "waves"), [(1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_hardwired_decode_is_flat_until_the_slots_fill(batch: int, waves: int) -> None:
    shape = StepShape.of([(1, 500)] * batch)
    assert hardwired_step_time(TINY, shape, HARDWIRED) == pytest.approx(waves * 6e-5)


def test_hardwired_prompt_tokens_stream_behind_the_first() -> None:
    shape = StepShape.of([(1000, 0), (1, 200)])
    assert hardwired_step_time(TINY, shape, HARDWIRED) == pytest.approx(6e-5 + 999 * 2e-6)


def test_hardwired_time_ignores_the_model_shape() -> None:
    bigger = dataclasses.replace(TINY, layers=80, dense_weight_bytes=1e11)
    shape = StepShape.of([(64, 0), (1, 10)])
    assert hardwired_step_time(bigger, shape, HARDWIRED) == hardwired_step_time(
        TINY, shape, HARDWIRED
    )


# -- the families through the catalog, by hand from the YAML ------------------------------


def _gqa_kv_bytes(m: dict[str, Any], dtype_bytes: float) -> float:
    return float(2 * m["layers"] * m["kv_heads"] * m["head_dim"] * dtype_bytes)


def test_mtia_v2_8b_decode_is_lpddr_bound_by_hand(catalog: Catalog) -> None:
    dev = _yaml("devices/mtia-v2.yaml")
    mod = _yaml("models/llama-3.1-8b.yaml")
    e = dev["efficiency"]
    weights = mod["params_b"] * 1e9 * 2.0
    assert weights > dev["sram_gb"] * 1e9  # 16 GB of weights cannot sit in 256 MB
    ctx = 1000
    kv = (ctx + 1) * _gqa_kv_bytes(mod, 2.0)
    sram_kv = dev["sram_gb"] * 1e9 * 0.9  # the whole SRAM is free for KV
    assert kv < sram_kv
    t_memory = weights / (e["dram_bandwidth"] * dev["dram_bandwidth_tb_s"] * 1e12) + kv / (
        e["sram_bandwidth"] * dev["sram_bandwidth_tb_s"] * 1e12
    )
    expected = t_memory + e["step_overhead_s"] + mod["layers"] * e["layer_overhead_s"]
    dep = catalog.deployment("mtia-v2", "llama-3.1-8b")
    assert dep.step_time(StepShape.of([(1, ctx)])) == pytest.approx(expected, rel=1e-9)


def test_corsair_8b_step_by_hand(catalog: Catalog) -> None:
    dev = _yaml("devices/corsair.yaml")
    mod = _yaml("models/llama-3.1-8b.yaml")
    dep = catalog.deployment("corsair", "llama-3.1-8b", dtype="fp8", count=8)
    cards = 8
    weights = mod["params_b"] * 1e9 * 1.0
    sram_kv = cards * dev["sram_gb"] * 1e9 * 0.9 - weights
    batch, ctx = 32, 2000
    kv = batch * (ctx + 1) * _gqa_kv_bytes(mod, 1.0)
    sram = dev["sram_efficiency"] * dev["sram_bandwidth_tb_s"] * 1e12 * cards
    dram = dev["dram_efficiency"] * dev["dram_bandwidth_tb_s"] * 1e12 * cards
    kv_sram = min(kv, sram_kv)
    t_memory = weights / sram + kv_sram / sram + (kv - kv_sram) / dram
    shape = StepShape.of([(1, ctx)] * batch)
    t_compute = forward_flops(dep.model_shape, shape) / (
        dev["mfu"] * dev["peak_tflops"]["fp8"] * 1e12 * cards
    )
    latency = dev["tau0_s"] + mod["layers"] * dev["tau_layer_s"]
    assert dep.step_time(shape) == pytest.approx(latency + max(t_memory, t_compute), rel=1e-9)


def test_sn40l_model_switch_matches_hot_chips_for_8b_on_16_sockets(catalog: Catalog) -> None:
    dev = _yaml("devices/sn40l.yaml")
    mod = _yaml("models/llama-3.1-8b.yaml")
    dep = catalog.deployment("sn40l", "llama-3.1-8b", tp=16)
    expected = mod["params_b"] * 1e9 * 2.0 / (16 * dev["ddr_bandwidth_tb_s"] * 1e12)
    assert dep.model_switch_s == pytest.approx(expected, rel=1e-12)
    # SambaNova, Hot Chips 2024: "about 0.01 s" to switch to Llama 3.1 8B on 16 sockets.
    assert dep.model_switch_s == pytest.approx(0.01, rel=0.15)


def test_model_switch_is_not_modelled_outside_dataflow_devices(catalog: Catalog) -> None:
    assert catalog.deployment("h100-sxm", "llama-3.1-8b").model_switch_s is None
    assert catalog.deployment("taalas-hc1", "llama-3.1-8b").model_switch_s is None


def test_sn40l_decode_by_hand(catalog: Catalog) -> None:
    dev = _yaml("devices/sn40l.yaml")
    mod = _yaml("models/llama-3.1-70b.yaml")
    e = dev["efficiency"]
    sockets, ctx = 8, 1000
    dep = catalog.deployment("sn40l", "llama-3.1-70b", tp=sockets)
    bytes_moved = mod["params_b"] * 1e9 * 2.0 + (ctx + 1) * _gqa_kv_bytes(mod, 2.0)
    t_memory = bytes_moved / (e["bandwidth"] * dev["memory_bandwidth_tb_s"] * 1e12 * sockets)
    expected = t_memory + e["step_overhead_s"] + mod["layers"] * e["layer_overhead_s"]
    assert dep.step_time(StepShape.of([(1, ctx)])) == pytest.approx(expected, rel=1e-9)


def test_taalas_steps_by_hand(catalog: Catalog) -> None:
    dev = _yaml("devices/taalas-hc1.yaml")
    dep = catalog.deployment("taalas-hc1", "llama-3.1-8b")
    slots = dev["slots_per_device"]
    tau = dev["token_latency_s"]
    assert dep.step_time(StepShape.of([(1, 900)] * slots)) == pytest.approx(tau)
    assert dep.step_time(StepShape.of([(1, 900)] * (slots + 1))) == pytest.approx(2 * tau)
    prefill = dep.step_time(StepShape.of([(4096, 0)]))
    assert prefill == pytest.approx(tau + 4095 * dev["prompt_token_s"])
