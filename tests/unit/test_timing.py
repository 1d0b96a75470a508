"""Device timing physics (backends/emulator/timing.py), checked against hand arithmetic from
the YAML."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.emulator.catalog import Catalog
from backends.emulator.timing import (
    HbmConstants,
    Link,
    PipelineConstants,
    StepShape,
    allreduce_time,
    expert_layer_bytes,
    expert_time,
    forward_flops,
    gemm_efficiency,
    hbm_step_time,
    kv_transfer_time,
    pipeline_step_time,
    weight_bytes_read,
)

CONFIG = Catalog.default_dir()


def _yaml(rel: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((Path(CONFIG) / rel).read_text())
    return data


def _gqa_kv_bytes(m: dict[str, Any], dtype_bytes: float) -> float:
    return float(2 * m["layers"] * m["kv_heads"] * m["head_dim"] * dtype_bytes)


# -- StepShape ----------------------------------------------------------------------------


def _brute_force_pairs(n: int, c: int) -> int:
    """Causal attention: new token i (1-based) sees the c cached tokens and tokens 1..i."""
    return sum(c + i for i in range(1, n + 1))


@pytest.mark.parametrize(
    "chunks",
    [
        [(1, 0)],
        [(1, 1000)],
        [(512, 0)],
        [(7, 33), (1, 100), (1, 2048), (300, 700)],
    ],
)
def test_step_shape_of_matches_brute_force_counts(chunks: list[tuple[int, int]]) -> None:
    shape = StepShape.of(chunks)
    assert shape.new_tokens == sum(n for n, _ in chunks)
    assert shape.kv_read_tokens == sum(c for _, c in chunks)
    assert shape.seqs == len(chunks)
    assert shape.attn_pairs == pytest.approx(sum(_brute_force_pairs(n, c) for n, c in chunks))


def test_step_shape_of_empty_batch_is_zero() -> None:
    assert StepShape.of([]) == StepShape(0, 0.0, 0, 0)


# -- HBM roofline -------------------------------------------------------------------------


def test_batch1_decode_8b_h100_is_memory_bound_and_matches_hand_arithmetic(
    catalog: Catalog,
) -> None:
    dev = _yaml("devices/h100-sxm.yaml")
    mod = _yaml("models/llama-3.1-8b.yaml")
    eff = dev["efficiency"]
    ctx = 1000
    params = mod["params_b"] * 1e9
    kv_per_token = _gqa_kv_bytes(mod, 2.0)

    # Weights at η, KV (context read + one written) at attention's η_kv: separate kernels.
    bw = dev["memory_bandwidth_tb_s"] * 1e12
    t_memory = params * 2.0 / (eff["bandwidth"] * bw) + (ctx + 1) * kv_per_token / (
        eff.get("kv_bandwidth", eff["bandwidth"]) * bw
    )
    flops = 2 * params + 4 * mod["layers"] * mod["q_heads"] * mod["head_dim"] * (ctx + 1)
    t_compute = flops / (eff["mfu"] * dev["peak_tflops"]["bf16"] * 1e12)
    overhead = eff["step_overhead_s"] + mod["layers"] * eff["layer_overhead_s"]
    assert t_compute < t_memory / 10  # clearly memory-bound

    dep = catalog.deployment("h100-sxm", "llama-3.1-8b")
    shape = StepShape.of([(1, ctx)])
    assert dep.step_time(shape) == pytest.approx(t_memory + overhead, rel=1e-9)
    # The pure function agrees with the deployment it backs.
    m = dep.model_shape
    assert forward_flops(m, shape) == pytest.approx(flops, rel=1e-12)


def test_large_prefill_8b_h100_is_compute_bound_and_matches_hand_arithmetic(
    catalog: Catalog,
) -> None:
    dev = _yaml("devices/h100-sxm.yaml")
    mod = _yaml("models/llama-3.1-8b.yaml")
    eff = dev["efficiency"]
    n = 8192
    params = mod["params_b"] * 1e9
    attn_width = mod["q_heads"] * mod["head_dim"]
    # The BF16 MFU (mfu_by_dtype, else the device's mfu).
    mfu = eff.get("mfu_by_dtype", {}).get("bf16", eff["mfu"])
    peak = mfu * dev["peak_tflops"]["bf16"] * 1e12
    # GEMMs over 8192 rows run at mfu · r / (r + half); attention at mfu.
    half = eff.get("gemm_half_tokens", 0.0)
    t_compute = 2 * params * n / (peak * n / (n + half))
    t_compute += 4 * mod["layers"] * attn_width * n * (n + 1) / 2 / peak
    bytes_moved = params * 2.0 + n * _gqa_kv_bytes(mod, 2.0)
    t_memory = bytes_moved / (eff["bandwidth"] * dev["memory_bandwidth_tb_s"] * 1e12)
    overhead = eff["step_overhead_s"] + mod["layers"] * eff["layer_overhead_s"]
    assert t_memory < t_compute / 2  # clearly compute-bound

    dep = catalog.deployment("h100-sxm", "llama-3.1-8b")
    assert dep.step_time(StepShape.of([(n, 0)])) == pytest.approx(t_compute + overhead, rel=1e-9)


def test_decode_step_time_grows_with_batch_once_kv_reads_dominate(catalog: Catalog) -> None:
    dev = _yaml("devices/h100-sxm.yaml")
    mod = _yaml("models/llama-3.1-8b.yaml")
    dep = catalog.deployment("h100-sxm", "llama-3.1-8b")
    ctx = 1000
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    times = [dep.step_time(StepShape.of([(1, ctx)] * b)) for b in batches]
    assert all(a < b for a, b in itertools.pairwise(times))
    # At 64 and 128 the GEMMs are still bound by weight reads, the same for both, so the
    # difference is exactly 64 more sequences' KV, read at attention's KV bandwidth.
    extra_kv = 64 * (ctx + 1) * _gqa_kv_bytes(mod, 2.0)
    eff = dev["efficiency"]
    bw = eff.get("kv_bandwidth", eff["bandwidth"]) * dev["memory_bandwidth_tb_s"] * 1e12
    assert times[-2] - times[-3] == pytest.approx(extra_kv / bw, rel=1e-9)
    # At 256 sequences KV traffic exceeds the weights, and the step is over twice batch 1.
    assert 256 * (ctx + 1) * _gqa_kv_bytes(mod, 2.0) > mod["params_b"] * 1e9 * 2
    assert times[-1] > 2 * times[0]


def test_allreduce_term_matches_formula_for_tp2_70b_fp8(catalog: Catalog) -> None:
    dev = _yaml("devices/h100-sxm.yaml")
    mod = _yaml("models/llama-3.1-70b.yaml")
    eff = dev["efficiency"]
    dep = catalog.deployment("h100-sxm", "llama-3.1-70b", dtype="fp8", tp=2)
    shape = StepShape.of([(1, 1000)])
    tp = 2
    payload = 2 * (tp - 1) / tp * 1 * mod["hidden"] * 2.0  # activations stay 16-bit
    expected_ar = (
        2
        * mod["layers"]
        * (eff["allreduce_latency_s"] + payload / (dev["interconnect_gb_s"] * 1e9))
    )
    c = dep._constants
    assert isinstance(c, HbmConstants)
    assert allreduce_time(dep.model_shape, shape, c) == pytest.approx(expected_ar, rel=1e-12)

    bw = dev["memory_bandwidth_tb_s"] * 1e12 * tp
    t_memory = mod["params_b"] * 1e9 * 1.0 / (eff["bandwidth"] * bw)
    t_memory += 1001 * _gqa_kv_bytes(mod, 1.0) / (eff.get("kv_bandwidth", eff["bandwidth"]) * bw)
    overhead = eff["step_overhead_s"] + mod["layers"] * eff["layer_overhead_s"]
    assert dep.step_time(shape) == pytest.approx(t_memory + overhead + expected_ar, rel=1e-9)


def test_no_allreduce_without_tensor_parallelism(catalog: Catalog) -> None:
    dep = catalog.deployment("h100-sxm", "llama-3.1-8b")
    c = dep._constants
    assert isinstance(c, HbmConstants)
    assert allreduce_time(dep.model_shape, StepShape.of([(4096, 0)]), c) == 0.0


@pytest.mark.parametrize("chunks", [[(1, 1000)], [(1, 1000)] * 32, [(4096, 0)]])
def test_tensor_parallel_two_h100s_beat_one_for_70b_fp8(
    catalog: Catalog, chunks: list[tuple[int, int]]
) -> None:
    shape = StepShape.of(chunks)
    tp1 = catalog.deployment("h100-sxm", "llama-3.1-70b", dtype="fp8", tp=1)
    tp2 = catalog.deployment("h100-sxm", "llama-3.1-70b", dtype="fp8", tp=2)
    assert tp2.step_time(shape) < tp1.step_time(shape)


def test_hbm_step_time_with_synthetic_constants_takes_the_max_of_both_roofs(
    catalog: Catalog,
) -> None:
    m = catalog.model("llama-3.1-8b").shape("bf16")
    shape = StepShape.of([(1, 10)])
    base = HbmConstants(
        peak_flops=1e15,
        bandwidth=1e12,
        mfu=1.0,
        bandwidth_efficiency=1.0,
        step_overhead_s=0.0,
        layer_overhead_s=0.0,
        tp=1,
        interconnect=1e11,
        allreduce_latency_s=0.0,
    )
    flops = forward_flops(m, shape)
    mem = m.dense_weight_bytes + 11 * m.kv_bytes_per_token
    assert hbm_step_time(m, shape, base) == pytest.approx(max(flops / 1e15, mem / 1e12))
    # Slash the bandwidth 1000x: still memory-bound, 1000x slower.
    slow = dataclasses.replace(base, bandwidth=1e9)
    assert hbm_step_time(m, shape, slow) == pytest.approx(mem / 1e9)
    # Overheads are additive.
    over = dataclasses.replace(base, step_overhead_s=1e-3, layer_overhead_s=1e-5)
    assert hbm_step_time(m, shape, over) == pytest.approx(
        hbm_step_time(m, shape, base) + 1e-3 + m.layers * 1e-5
    )


# -- MoE weight reads ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "dtype_bytes"),
    [("mixtral-8x7b", 2.0), ("qwen3-30b-a3b", 2.0), ("deepseek-v3", 1.0)],
)
def test_moe_weight_bytes_grow_with_tokens_and_saturate(
    catalog: Catalog, model: str, dtype_bytes: float
) -> None:
    y = _yaml(f"models/{model}.yaml")
    dtype = {2.0: "bf16", 1.0: "fp8"}[dtype_bytes]
    m = catalog.model(model).shape(dtype)
    experts, k = y["experts"], y["top_k"]
    # Parameters a quantised checkpoint keeps in 16 bits (the LM head) read at 2 bytes.
    keep = y.get("unquantised_params_b", 0.0) * 1e9 * (max(dtype_bytes, 2.0) - dtype_bytes)
    total = y["params_b"] * 1e9 * dtype_bytes + keep
    active = y["active_params_b"] * 1e9 * dtype_bytes + keep

    # One token reads exactly the active parameters; every expert read is the whole model.
    assert weight_bytes_read(m, 1) == pytest.approx(active, rel=1e-9)
    assert weight_bytes_read(m, 100_000) == pytest.approx(total, rel=1e-9)

    # In between, the expected number of experts touched is E·(1 − (1 − k/E)^N).
    per_expert = (total - active) / (1 - k / experts) / experts
    dense = total - per_expert * experts
    previous = 0.0
    for n in [1, 2, 3, 5, 8, 16, 64, 256, 1024]:
        touched = experts * (1 - (1 - k / experts) ** n)
        expected = dense + per_expert * touched
        got = weight_bytes_read(m, n)
        assert got == pytest.approx(expected, rel=1e-9)
        assert got >= previous
        assert got <= total * (1 + 1e-12)
        previous = got


# -- MoE expert kernels -------------------------------------------------------------------


def test_expert_layer_bytes_match_hand_arithmetic_qwen3_tp8(catalog: Catalog) -> None:
    y = _yaml("models/qwen3-235b-a22b.yaml")
    m = catalog.model("qwen3-235b-a22b").shape("fp8")
    n, tp = 8192, 8
    a, h, f = n * y["top_k"], y["hidden"], y["expert_ffn"] / tp
    # Every expert is touched by 8,192 tokens: W is all expert weights of one layer per device.
    w = m.expert_weight_bytes / y["layers"] / tp
    dispatch, gate_up, down, combine = expert_layer_bytes(m, n, tp)
    assert dispatch == pytest.approx(n * h * 2 + a * h * 1)
    assert gate_up == pytest.approx(a * h * 1 + 2 / 3 * w + a * 2 * f * 2, rel=1e-6)
    assert down == pytest.approx(a * f * 1 + w / 3 + a * h * 2, rel=1e-6)
    assert combine == pytest.approx(a * h * 2 + n * h * 2)


def _hbm(catalog: Catalog, device: str, model: str, tp: int) -> tuple[Any, HbmConstants]:
    dep = catalog.deployment(device, model, dtype="fp8", tp=tp)
    c = catalog.device(device).constants(dep)
    assert isinstance(c, HbmConstants)
    return dep.model_shape, c


def test_wide_experts_are_compute_bound_mixtral_tp1(catalog: Catalog) -> None:
    """Mixtral's 14,336-wide experts at TP1: the expert kernels cost their FLOPs, plus the
    dispatch and combine traffic, which is small next to them."""
    y = _yaml("models/mixtral-8x7b.yaml")
    m, c = _hbm(catalog, "h200-sxm", "mixtral-8x7b", 1)
    n = 8192
    a = n * y["top_k"]
    flops = 2 * a * 3 * y["hidden"] * y["expert_ffn"] * y["layers"]
    pi = c.peak_flops * gemm_efficiency(c.mfu, a / y["experts"], c.gemm_half_tokens)
    got = expert_time(m, StepShape.of([(n, 0)]), c)
    assert flops / pi < got < 1.05 * flops / pi


def test_narrow_experts_are_bound_by_routed_rows_qwen3_tp8(catalog: Catalog) -> None:
    """Qwen3-235B's 1,536-wide experts at TP8 leave 192 columns per device: the routed rows'
    traffic, not the FLOPs, sets the expert time of a prefill chunk, and it does not shrink
    with tp as the FLOPs do."""
    y = _yaml("models/qwen3-235b-a22b.yaml")
    shape = StepShape.of([(8192, 0)])
    m, c8 = _hbm(catalog, "h200-sxm", "qwen3-235b-a22b", 8)
    times = {}
    for tp in (1, 8):
        c = dataclasses.replace(c8, tp=tp)
        a = 8192 * y["top_k"]
        flops = 2 * a * 3 * y["hidden"] * y["expert_ffn"] / tp * y["layers"]
        pi = c.peak_flops * gemm_efficiency(c.mfu, a / y["experts"], c.gemm_half_tokens)
        times[tp] = expert_time(m, shape, c)
        if tp == 8:
            assert times[tp] > 2 * flops / pi
    assert times[1] / times[8] < 4  # FLOPs alone would give 8


def test_dense_model_reads_all_weights_regardless_of_tokens(catalog: Catalog) -> None:
    y = _yaml("models/llama-3.1-8b.yaml")
    m = catalog.model("llama-3.1-8b").shape("bf16")
    for n in [1, 7, 4096]:
        assert weight_bytes_read(m, n) == pytest.approx(y["params_b"] * 1e9 * 2.0)


# -- SRAM pipelines -----------------------------------------------------------------------


def test_pipeline_step_time_flat_until_slots_fill_then_doubles_synthetic(
    catalog: Catalog,
) -> None:
    m = catalog.model("llama-3.1-8b").shape("bf16")
    c = PipelineConstants(latency_s=2e-3, slots=4, compute_flops=math.inf)
    times = {b: pipeline_step_time(m, StepShape.of([(1, 100)] * b), c) for b in range(1, 10)}
    assert times[1] == times[2] == times[3] == times[4] == pytest.approx(2e-3)
    assert times[5] == times[8] == pytest.approx(4e-3)
    assert times[9] == pytest.approx(6e-3)


def test_groq_pipeline_slots_and_latency_from_yaml(catalog: Catalog) -> None:
    dev = _yaml("devices/groq-lpu-v1.yaml")
    mod = _yaml("models/llama-3.1-8b.yaml")
    dep = catalog.deployment("groq-lpu-v1", "llama-3.1-8b")
    weights = mod["params_b"] * 1e9 * 2.0
    usable = dev["memory_gb"] * 1e9 * 0.9 * (1 - dev["kv_reserve_fraction"])
    chips = math.ceil(weights / usable)
    assert dep.count == chips
    slots = int(chips * dev["slots_per_device"])
    latency = dev["tau0_s"] + mod["layers"] * dev["tau_layer_s"]
    compute = dev["mfu"] * dev["peak_tflops"]["bf16"] * 1e12 * chips

    def expected(b: int) -> float:
        shape = StepShape.of([(1, 1000)] * b)
        return float(
            math.ceil(b / slots) * latency + forward_flops(dep.model_shape, shape) / compute
        )

    for b in [1, slots // 2, slots, slots + 1, 2 * slots, 2 * slots + 1]:
        t = dep.step_time(StepShape.of([(1, 1000)] * b))
        assert t == pytest.approx(expected(b), rel=1e-9)
    t1 = dep.step_time(StepShape.of([(1, 1000)]))
    t_full = dep.step_time(StepShape.of([(1, 1000)] * slots))
    t_over = dep.step_time(StepShape.of([(1, 1000)] * (slots + 1)))
    assert t_full - t1 < 0.15 * latency  # flat while the slots last (only FLOPs grow)
    assert t_over - t_full > 0.95 * latency  # one more wave through the pipeline


def test_pipeline_prefill_adds_compute_time_on_top_of_latency(catalog: Catalog) -> None:
    dep = catalog.deployment("groq-lpu-v1", "llama-3.1-8b")
    short = dep.step_time(StepShape.of([(16, 0)]))
    long = dep.step_time(StepShape.of([(8192, 0)]))
    assert long > short
    c = dep._constants
    assert isinstance(c, PipelineConstants)
    assert long - short == pytest.approx(
        (
            forward_flops(dep.model_shape, StepShape.of([(8192, 0)]))
            - forward_flops(dep.model_shape, StepShape.of([(16, 0)]))
        )
        / c.compute_flops
    )


# -- KV transfer --------------------------------------------------------------------------


def test_kv_transfer_time_formula_from_links_yaml(catalog: Catalog) -> None:
    links = _yaml("links.yaml")
    mod = _yaml("models/llama-3.1-8b.yaml")
    tokens = 1000
    kv_bytes = tokens * _gqa_kv_bytes(mod, 2.0)
    descriptors = math.ceil(tokens / 16)
    for name, spec in links.items():
        expected = (
            spec["setup_s"]
            + descriptors * spec["per_descriptor_s"]
            + kv_bytes / (spec["efficiency"] * spec["bandwidth_gb_s"] * 1e9)
        )
        got = kv_transfer_time(catalog.link(name), kv_bytes, descriptors)
        assert got == pytest.approx(expected, rel=1e-12), name


def test_kv_transfer_time_synthetic_link() -> None:
    link = Link("x", bandwidth=1e9, efficiency=0.5, setup_s=0.01, per_descriptor_s=1e-4)
    assert kv_transfer_time(link, 0.0, 0) == pytest.approx(0.01)
    assert kv_transfer_time(link, 1e9, 10) == pytest.approx(0.01 + 10 * 1e-4 + 2.0)
