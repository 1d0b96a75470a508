"""Physics of parallel layouts, MLA, sliding windows, linear attention and weight formats
(backends/timing.py, backends/catalog.py), each against a hand-worked figure."""

from __future__ import annotations

import datetime
import math
from dataclasses import replace

import pytest

from backends.emulator.catalog import (
    Catalog,
    Deployment,
    EngineKnobs,
    ParallelLayout,
    WeightFormats,
    kv_shards,
)
from backends.emulator.timing import (
    DTYPE_BYTES,
    HbmConstants,
    ModelShape,
    StepShape,
    all_to_all_time,
    allreduce_time,
    attention_bytes,
    attention_flops,
    collective_link,
    expert_imbalance,
    expert_layer_bytes,
    expert_layers_time,
    expert_parts,
    expert_rows,
    expert_time,
    hbm_step_time,
    indexer_time,
    layout_comm_time,
    sparse_keep,
    touched_fraction,
)

GB = 1e9


def shape(**kw: float) -> ModelShape:
    base = {
        "layers": 10,
        "hidden": 1000,
        "attn_width": 1000,
        "active_params": 1e9,
        "dense_weight_bytes": 1e9,
        "expert_weight_bytes": 0.0,
        "experts": 0,
        "top_k": 0,
        "kv_bytes_per_token": 100.0,
        "act_bytes": 2.0,
    }
    base.update(kw)
    return ModelShape(**base)  # type: ignore[arg-type]


def eight_experts() -> ModelShape:
    """Ten MoE layers of eight 1,000-wide experts, top-2, 3 MB of FP8 weights each."""
    return shape(
        experts=8,
        top_k=2,
        expert_ffn=1000,
        moe_layers=10,
        expert_weight_bytes=10 * 8 * 3e6,
        gemm_input_bytes=1.0,
    )


def consts(**kw: float) -> HbmConstants:
    base = {
        "peak_flops": 1e15,
        "bandwidth": 1e12,
        "mfu": 0.5,
        "bandwidth_efficiency": 0.5,
        "step_overhead_s": 0.0,
        "layer_overhead_s": 0.0,
        "tp": 1,
        "interconnect": 100e9,
        "allreduce_latency_s": 1e-5,
    }
    base.update(kw)
    return HbmConstants(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def test_expert_imbalance_hand_worked() -> None:
    # ep 8, 100 rows per device: 1 + sqrt(2 ln 8 · 7/8 / 100) = 1.19076
    assert expert_imbalance(100, 8) == pytest.approx(1 + math.sqrt(2 * math.log(8) * 0.875 / 100))
    assert expert_imbalance(100, 8) == pytest.approx(1.19076, abs=1e-5)
    assert expert_imbalance(100, 1) == 1.0
    assert expert_imbalance(0.01, 8) == 8.0  # capped at ep: one device takes everything


def test_expert_bytes_split_over_ep_and_moe_tp() -> None:
    m = shape(experts=8, top_k=2, expert_ffn=400, moe_layers=10, expert_weight_bytes=8e9)
    _, gu1, _, _ = expert_layer_bytes(m, 1000, 1)
    # EP 2: half the routed rows (times imbalance), half the expert weights per device.
    d2, gu2, dn2, c2 = expert_layer_bytes(m, 1000, 1, ep=2, local_tokens=500)
    imb = expert_imbalance(1000, 2)
    a = 1000 * 2 / 2 * imb
    h = 1000
    w = 8e9 * (1 - (1 - 2 / 8) ** 1000) / (10 * 2)
    assert d2 == pytest.approx(500 * h * 2 + a * h * 2)
    assert gu2 == pytest.approx(a * h * 2 + 2 / 3 * w + a * 2 * 400 * 2)
    assert dn2 == pytest.approx(a * 400 * 2 + w / 3 + a * h * 2)
    assert c2 == pytest.approx(a * h * 2 + 500 * h * 2)
    assert gu2 < gu1


def test_kv_shards_gqa_replicates_beyond_heads_mla_never_splits(catalog: Catalog) -> None:
    assert kv_shards(catalog.model("llama-3.1-70b"), 4) == 4
    assert kv_shards(catalog.model("qwen3-235b-a22b"), 8) == 4  # 4 KV heads at TP8
    assert kv_shards(catalog.model("deepseek-v3"), 8) == 1


def test_mla_kv_capacity_counts_one_latent_per_device(catalog: Catalog) -> None:
    knobs = EngineKnobs(kv_dtype="bf16")
    w = WeightFormats(dense="fp8", experts="fp8")
    dep = catalog.deployment(
        "h200-sxm",
        "deepseek-v3",
        dtype="fp8",
        engine=knobs,
        layout=ParallelLayout(tp=8),
        weights=w,
    )
    m = catalog.model("deepseek-v3")
    per_token = 61 * (512 + 64) * 2  # 70,272 B
    weights = sum(m.weight_bytes("fp8", "fp8"))
    free = 8 * 141 * GB * 0.9 - weights
    assert dep.kv_capacity_tokens == int(free // (per_token * 8))


def test_attention_flops_mla_prefill_and_absorbed_decode() -> None:
    # 10 layers, 4 heads: prefill 2·10·4·(128+64+128) per pair, decode 2·10·4·(2·512+64)
    m = shape(attn_pair_flops=2 * 10 * 4 * 320, attn_pair_flops_decode=2 * 10 * 4 * 1088)
    s = StepShape(
        new_tokens=11, attn_pairs=100.0 + 50.0, kv_read_tokens=49, seqs=2, decode_pairs=50.0
    )
    assert attention_flops(m, s) == pytest.approx(100 * 25600 + 50 * 87040)
    plain = shape()
    assert attention_flops(plain, s) == pytest.approx(4 * 10 * 1000 * 150)


def test_attention_bytes_window_and_recurrent_state() -> None:
    m = shape(
        kv_bytes_per_token=100.0,
        window=128,
        window_kv_bytes_per_token=10.0,
        state_bytes_per_seq=1000.0,
    )
    # 2 sequences with 1000 cached tokens each, decoding one token each
    s = StepShape(new_tokens=2, attn_pairs=2002.0, kv_read_tokens=2000, seqs=2)
    full = (2000 + 2) * 100
    window = (2 * 128 + 2) * 10  # at most 128 tokens per sequence
    state = 2 * 2 * 1000  # read and written once per sequence
    assert attention_bytes(m, s) == pytest.approx(full + window + state)


def test_collective_link_inside_and_across_domains() -> None:
    c = consts(nvlink_domain=8, scale_out=50e9, scale_out_latency_s=3e-5)
    assert collective_link(c, 8) == (100e9, 1e-5)
    assert collective_link(c, 16) == (50e9, 3e-5)


def test_all_to_all_splits_traffic_between_nvlink_and_scale_out() -> None:
    c = consts(nvlink_domain=8, scale_out=50e9, scale_out_latency_s=3e-5)
    # 16 devices, 1.5 MB per device: 7/15 of it inside the node, 8/15 across
    payload = 1.5e6
    inside = payload * 7 / 15
    outside = payload * 8 / 15
    expected = 3e-5 + max(inside / 100e9, outside / 50e9)
    assert all_to_all_time(c, payload, 16) == pytest.approx(expected)
    assert all_to_all_time(c, payload, 8) == pytest.approx(1e-5 + payload / 100e9)
    assert all_to_all_time(c, payload, 1) == 0.0


def test_data_parallel_attention_pays_all_to_all_not_allreduce() -> None:
    m = shape(experts=8, top_k=2, expert_ffn=400, moe_layers=10, expert_weight_bytes=8e9)
    s = StepShape(new_tokens=800, attn_pairs=0.0, kv_read_tokens=0, seqs=800)
    c = consts(tp=1, dp=8, ep=8, moe_tp=1)
    n_r = 100
    copies = 2 * 7 / 8
    per = 1e-5 + n_r * copies * 1000 * 2 / 100e9  # dispatch (bf16 inputs) = combine
    assert layout_comm_time(m, s, c) == pytest.approx(10 * 2 * per)
    assert allreduce_time(m, s, c) == pytest.approx(layout_comm_time(m, s, c))
    # plain TP: two all-reduces per layer of 800 rows over 8 devices
    tp = consts(tp=8)
    payload = 2 * 7 / 8 * 800 * 1000 * 2
    assert allreduce_time(m, s, tp) == pytest.approx(2 * 10 * (1e-5 + payload / 100e9))


def test_pipeline_stages_add_hand_offs() -> None:
    m = shape()
    s = StepShape(new_tokens=100, attn_pairs=0.0, kv_read_tokens=0, seqs=100)
    c = consts(pp=2)
    assert layout_comm_time(m, s, c) == pytest.approx(1e-5 + 100 * 1000 * 2 / 100e9)


def test_step_split_over_dp_ranks() -> None:
    s = StepShape(new_tokens=80, attn_pairs=400.0, kv_read_tokens=8000, seqs=80, decode_pairs=400.0)
    r = s.split(8)
    assert (r.new_tokens, r.attn_pairs, r.kv_read_tokens, r.seqs) == (10, 50, 1000, 10)
    assert s.split(1) is s


def test_a_prompt_is_prefilled_whole_on_one_attention_rank() -> None:
    # 16 decodes at context 1,000 and 2 prompts of 1,000 tokens over 8 ranks: each rank
    # decodes 2 sequences, and the busiest rank prefills one whole prompt.
    step = StepShape.of([(1, 1000)] * 16 + [(1000, 0)] * 2)
    assert (step.prompts, step.prompt_tokens) == (2, 2000)
    rank = step.split(8)
    prompt_pairs = 1000 * 1001 / 2
    assert rank.new_tokens == pytest.approx(16 / 8 + 1000)
    assert rank.attn_pairs == pytest.approx(16 * 1001 / 8 + prompt_pairs)
    assert rank.seqs == pytest.approx(2 + 1)
    assert (rank.prompts, rank.prompt_tokens) == (1, 1000)
    assert rank.decode_pairs == pytest.approx(16 * 1001 / 8)
    # Nine prompts over 8 ranks: the busiest prefills two of them.
    nine = StepShape.of([(1000, 0)] * 9).split(8)
    assert nine.new_tokens == pytest.approx(2000)
    # Decodes alone still split evenly (as does a shape that counts no prompts).
    assert StepShape.of([(1, 1000)] * 16).split(8).new_tokens == pytest.approx(2)
    bare = StepShape(2016, 1016016.0, 16000, 18)
    assert bare.split(8).new_tokens == pytest.approx(2016 / 8)


def test_dp_attention_reads_each_ranks_kv_only() -> None:
    m = shape()
    s = StepShape(
        new_tokens=80,
        attn_pairs=80 * 1001.0,
        kv_read_tokens=80_000,
        seqs=80,
        decode_pairs=80 * 1001.0,
    )
    one = hbm_step_time(m, s, consts(tp=1))
    dp = hbm_step_time(m, s, consts(tp=1, dp=8))
    # the KV term shrinks 8x; the weights are read by every rank
    kv_one = attention_bytes(m, s) / (0.5 * 1e12)
    assert one - dp == pytest.approx(kv_one * 7 / 8, rel=1e-6)


def test_weight_bytes_keep_unquantised_params_in_16_bits(catalog: Catalog) -> None:
    m = catalog.model("gpt-oss-120b")
    dense, experts = m.weight_bytes("bf16", "mxfp4")
    e_params = (m.params_b - m.active_params_b) * 1e9 / (1 - m.top_k / m.experts)  # type: ignore[operator]
    assert experts == pytest.approx(e_params * DTYPE_BYTES["mxfp4"])
    assert dense == pytest.approx((m.params_b * 1e9 - e_params) * 2)
    q = catalog.model("qwen3-32b")
    d8, _ = q.weight_bytes("fp8")
    assert d8 == pytest.approx((32.76 - 0.78) * 1e9 + 0.78e9 * 2)


def test_an_nvfp4_checkpoint_keeps_its_excluded_layers_in_16_bits(catalog: Catalog) -> None:
    # nvidia/DeepSeek-V3.1-NVFP4 excludes the LM head and each layer's MLA projections q_a
    # (7168 x 1536), q_b (1536 x 128·192), kv_a (7168 x 576) and kv_b (512 x 128·256).
    m = catalog.model("deepseek-v3")
    per_layer = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256
    assert per_layer == 69_664_768
    kept = 61 * per_layer + 129280 * 7168
    assert m.nvfp4_unquantised_params_b == pytest.approx(kept / 1e9, abs=0.005)
    dense, experts = m.weight_bytes("nvfp4")
    e_params = (m.params_b - m.active_params_b) * 1e9 / (1 - m.top_k / m.experts)  # type: ignore[operator]
    assert experts == pytest.approx(e_params * 0.5625)  # 4 bits + an FP8 scale per 16
    keep = m.nvfp4_unquantised_params_b * 1e9  # type: ignore[operator]
    assert dense == pytest.approx((m.params_b * 1e9 - e_params - keep) * 0.5625 + keep * 2)
    # The FP8 checkpoint keeps only the LM head.
    d8, _ = m.weight_bytes("fp8")
    assert d8 == pytest.approx((m.params_b * 1e9 - e_params) + m.unquantised_params_b * 1e9)


def test_blackwell_fp4_gemms_take_their_own_tile_curve(catalog: Catalog) -> None:
    eight = ParallelLayout(tp=8)

    def half(device: str, dtype: str) -> float:
        dep = catalog.deployment(device, "llama-3.1-70b", dtype=dtype, layout=eight)
        return dep._constants.gemm_half_tokens  # type: ignore[union-attr]

    # Block-scaled FP4 GEMMs need taller tiles (128 rows, fitted on T5); FP8 and BF16 keep
    # Hopper's 32, on every Blackwell GPU alike.
    for device in ("b200", "b300", "gb200", "gb300"):
        assert (half(device, "fp4"), half(device, "fp8"), half(device, "bf16")) == (128, 32, 32)
    assert half("h200-sxm", "fp8") == 32
    # Eight sequences of Llama-3.1-70B FP8 at TP8: B200 reads the weights 1.6x faster than
    # H200 and has 2.3x its FP8 peak, so its step is the shorter one.
    step = StepShape.of([(1, 1500)] * 8)
    b200 = catalog.deployment("b200", "llama-3.1-70b", dtype="fp8", layout=eight)
    h200 = catalog.deployment("h200-sxm", "llama-3.1-70b", dtype="fp8", layout=eight)
    assert b200.step_time(step) < h200.step_time(step)


def test_sliding_window_and_linear_layers_in_model_shapes(catalog: Catalog) -> None:
    oss = catalog.model("gpt-oss-120b").shape("bf16")
    assert oss.kv_bytes_per_token == 2 * 18 * 8 * 64 * 2
    assert oss.window == 128
    assert oss.window_kv_bytes_per_token == 2 * 18 * 8 * 64 * 2
    q35 = catalog.model("qwen3.5-397b-a17b").shape("fp8", kv_dtype="bf16")
    assert q35.kv_bytes_per_token == 2 * 15 * 2 * 256 * 2
    assert q35.state_bytes_per_seq == 45 * 64 * 128 * 128 * 2
    ds = catalog.model("deepseek-v3").shape("fp8", kv_dtype="bf16")
    assert ds.attn_pair_flops == 2 * 61 * 128 * (128 + 64 + 128)
    assert ds.attn_pair_flops_decode == 2 * 61 * 128 * (2 * 512 + 64)


def test_engine_profiles_cover_versions_and_cap_fitted_factors(catalog: Catalog) -> None:
    assert catalog.engine_for("vllm", "0.12.0").name == "vllm-0.11"
    assert catalog.engine_for("vllm", "0.18.0").name == "vllm-0.14"
    assert catalog.engine_for("vllm", "").name == "vllm-0.14"
    assert catalog.engine_for("trtllm", "1.0.0rc3").name == "trtllm-1.0"
    assert catalog.engine_for("sglang", "glm5-hopper").name == "sglang-0.5"
    # No version: the newest family released by the day the run was measured. vLLM 0.11.0
    # reached PyPI on 2025-10-04 and 0.13.0 (the first of the 0.14 family) on 2025-12-19.
    assert catalog.engine_for("vllm", "", datetime.date(2025, 10, 29)).name == "vllm-0.11"
    assert catalog.engine_for("vllm", "", datetime.date(2025, 12, 18)).name == "vllm-0.11"
    assert catalog.engine_for("vllm", "", datetime.date(2025, 12, 19)).name == "vllm-0.14"
    # Before every family, or no date: the default; a recorded version beats the date.
    assert catalog.engine_for("vllm", "", datetime.date(2025, 9, 1)).name == "vllm-0.14"
    assert catalog.engine_for("vllm", "0.18.0", datetime.date(2025, 10, 29)).name == "vllm-0.14"
    # TensorRT-LLM counts release candidates: 1.1.0rc0 reached PyPI on 2025-08-15.
    assert catalog.engine_for("trtllm", "", datetime.date(2025, 8, 1)).name == "trtllm-1.0"
    assert catalog.engine_for("trtllm", "", datetime.date(2025, 10, 29)).name == "trtllm-1.1"
    # Dynamo's TensorRT-LLM runtime images have their own serving path; a versionless
    # TensorRT-LLM row is never taken for one (the profile has no release date).
    dynamo = catalog.engine_for("trtllm", "0.8.1.post1")
    assert dynamo.name == "dynamo-trtllm-0.8"
    assert dynamo.released is None
    assert catalog.engine_for("trtllm", "0.7.0").name == "dynamo-trtllm-0.8"
    assert catalog.engine_for("trtllm", "0.21.0").name != "dynamo-trtllm-0.8"
    assert catalog.engine_for("trtllm", "", datetime.date(2026, 4, 6)).name == "trtllm-1.1"
    trt = catalog.engine("trtllm-1.1")
    assert dynamo.knobs.serving_latency_s > trt.knobs.serving_latency_s
    assert dynamo.knobs.step_policy == trt.knobs.step_policy == "whole_prompt"
    sg = catalog.engine("sglang-0.5")
    assert sg.knobs.step_policy == "prefill_first"
    assert sg.knobs_for("h200-sxm").gpu_memory_utilization == 0.90
    for profile in catalog.engines.values():
        assert len(profile.fitted) <= 2
        assert "fitted" in profile.sources


def test_sglang_prefills_in_larger_chunks_on_gpus_of_160_gib_or_more(catalog: Catalog) -> None:
    sglang = catalog.engine("sglang-0.5")
    assert sglang.knobs_for("h200-sxm").max_num_batched_tokens == 8192
    for device in ("b200", "b300", "gb200", "gb300"):
        assert sglang.knobs_for(device).max_num_batched_tokens == 16384
    assert catalog.engine("vllm-0.14").knobs_for("b200").max_num_batched_tokens == 8192


def test_free_memory_share_for_trtllm(catalog: Catalog) -> None:
    free = EngineKnobs(kv_memory_of="free", gpu_memory_utilization=0.9, kv_dtype="bf16")
    total = replace_knobs(free, kv_memory_of="total")
    a = catalog.deployment("h100-sxm", "llama-3.1-8b", engine=free)
    b = catalog.deployment("h100-sxm", "llama-3.1-8b", engine=total)
    w = 8.03e9 * 2
    per = catalog.model("llama-3.1-8b").kv_bytes_per_token("bf16")
    assert a.kv_capacity_tokens == int((80 * GB - w) * 0.9 // per)
    assert b.kv_capacity_tokens == int((80 * GB * 0.9 - w) // per)


def replace_knobs(k: EngineKnobs, **kw: object) -> EngineKnobs:
    return k.model_copy(update=kw)


def test_replace_is_available() -> None:  # keeps dataclasses.replace imported for readers
    assert replace(consts(), tp=2).tp == 2


def test_engine_knobs_profile_defaults_with_explicit_overrides(catalog: Catalog) -> None:
    knobs = catalog.engine_knobs("sglang-0.5", "h100-sxm", EngineKnobs(max_num_seqs=7))
    assert knobs.max_num_seqs == 7  # set explicitly
    assert knobs.step_policy == "prefill_first"  # the profile's
    assert knobs.gpu_memory_utilization == 0.83  # the profile's, for this device
    assert catalog.engine_knobs(None, "h100-sxm", None) == EngineKnobs()


def test_worker_engine_profile_reaches_the_deployment(catalog: Catalog) -> None:
    from gateway.service import worker_deployment
    from gateway.settings import EmulatedWorker, ModelConfig, PoolConfig

    worker = EmulatedWorker(
        device="h200-sxm",
        tp=8,
        dtype="fp8",
        engine_profile="trtllm-1.1",
        engine=EngineKnobs(max_num_seqs=32),
        layout=ParallelLayout(tp=8, moe_tp=1, ep=8),
        weights=WeightFormats(dense="fp8", experts="fp8"),
    )
    model = ModelConfig(
        name="deepseek-v3", mode="aggregated", pools={"aggregated": PoolConfig(workers=[worker])}
    )
    dep = worker_deployment(catalog, worker, model)
    assert dep.engine.step_policy == "whole_prompt"
    assert dep.engine.scheduler_policy == "guaranteed_no_evict"
    assert dep.engine.max_num_seqs == 32
    assert dep.layout.ep == 8
    assert dep.kv_shards == 1


def test_each_attention_rank_gets_its_own_budget_where_its_engine_gives_one(
    catalog: Catalog,
) -> None:
    from gateway.service import worker_deployment
    from gateway.settings import EmulatedWorker, ModelConfig, PoolConfig

    def budget(profile: str, dp: int) -> int:
        worker = EmulatedWorker(
            device="h200-sxm",
            tp=1,
            count=8,
            dtype="fp8",
            engine_profile=profile,
            layout=ParallelLayout(tp=1, dp=dp, moe_tp=1, ep=8),
        )
        pool = PoolConfig(workers=[worker])
        model = ModelConfig(name="deepseek-v3", mode="aggregated", pools={"aggregated": pool})
        return worker_deployment(catalog, worker, model).engine.max_num_batched_tokens

    # TensorRT-LLM and vLLM: eight ranks, eight 8,192-token budgets; SGLang splits one.
    assert budget("trtllm-1.1", 8) == 8 * 8192
    assert budget("vllm-0.14", 8) == 8 * 8192
    assert budget("sglang-0.5", 8) == 8192


def test_expert_rows_count_only_the_experts_tokens_route_to() -> None:
    # 4 tokens, 128 experts, top-4: touched = 1 − (124/128)^4 = 0.11926; 16 routed rows over
    # 128 × 0.11926 = 15.265 touched experts: 1.0481 rows each (not 16/128 = 0.125).
    m = shape(experts=128, top_k=4, expert_weight_bytes=1e9, expert_ffn=1000, moe_layers=10)
    assert touched_fraction(m, 4) == pytest.approx(1 - (124 / 128) ** 4)
    assert touched_fraction(m, 4) == pytest.approx(0.11926, abs=1e-5)
    assert expert_rows(m, 4) == pytest.approx(16 / (128 * 0.11926), rel=1e-4)
    assert expert_rows(m, 4) == pytest.approx(1.0481, abs=1e-3)
    # Thousands of tokens touch every expert: rows are the plain share N · k / E.
    assert expert_rows(m, 4096) == pytest.approx(4096 * 4 / 128)
    # Dense models: every token is a row.
    assert expert_rows(shape(), 7) == 7.0


def test_small_batch_experts_are_bound_by_their_weights_not_by_idle_tiles() -> None:
    # One token, 128 experts top-4 (4 touched), each expert 1000 x 1000 x 3 at 1 byte: the
    # experts' kernels read the touched weights, 4/128 of 3 MB per layer at 0.5 TB/s, and do
    # next to no work: one row each, GEMM efficiency 0.5 · 1/(1 + 32).
    m = shape(
        experts=128,
        top_k=4,
        expert_ffn=1000,
        moe_layers=1,
        layers=1,
        expert_weight_bytes=128 * 3e6,
        gemm_input_bytes=1.0,
    )
    c = consts(gemm_half_tokens=32.0)
    s = StepShape.of([(1, 100)])
    t = expert_time(m, s, c)
    weights = 128 * 3e6 * touched_fraction(m, 1) / (0.5 * 1e12)
    flops = 2 * 4 * 1000 * 2 * 1000 / (1e15 * 0.5 * 1 / 33)
    assert touched_fraction(m, 1) == pytest.approx(4 / 128)
    assert weights == pytest.approx(24e-6)
    assert flops == pytest.approx(1.056e-6)
    # gate/up and down: each the larger of its FLOPs and its bytes; bytes win by 20x.
    assert t == pytest.approx(weights, rel=0.01)


def ten_moe_layers() -> ModelShape:
    """Ten MoE layers of 128 experts, top-4, 3 MB each, FP8 GEMM inputs."""
    return shape(
        experts=128,
        top_k=4,
        expert_ffn=1000,
        moe_layers=10,
        layers=10,
        expert_weight_bytes=10 * 128 * 3e6,
        gemm_input_bytes=1.0,
    )


def test_routed_experts_take_at_least_their_kernel_chain() -> None:
    # One token over 128 experts (4 touched): the experts' roofline is 24 us per layer (the
    # test above), under a 100 us floor per MoE layer; ten MoE layers cost 1 ms, not 0.24.
    m = ten_moe_layers()
    s = StepShape.of([(1, 100)])
    free = consts(gemm_half_tokens=32.0)
    floored = consts(gemm_half_tokens=32.0, moe_layer_floor_s=100e-6)
    assert expert_time(m, s, free) == pytest.approx(240e-6, rel=0.01)
    assert hbm_step_time(m, s, floored) - hbm_step_time(m, s, free) == pytest.approx(
        1e-3 - expert_time(m, s, free)
    )
    # A big batch's experts take longer than the floor: the floor adds nothing.
    big = StepShape.of([(1, 100)] * 4096)
    assert expert_time(m, big, free) > 1e-3
    assert hbm_step_time(m, big, floored) == pytest.approx(hbm_step_time(m, big, free))


def test_the_expert_chain_small_kernels_run_in_series_with_the_gemms() -> None:
    # The ten MoE layers above, their chain's floor 100 us a layer of which the two grouped
    # GEMMs take 2/10: 80 us of router, sort, permute, activation and combine kernels, then
    # the GEMMs at the larger of their roofline and 20 us.
    m = ten_moe_layers()
    free = consts(gemm_half_tokens=32.0)
    overlapped = consts(gemm_half_tokens=32.0, moe_layer_floor_s=100e-6)
    serial = consts(gemm_half_tokens=32.0, moe_layer_floor_s=100e-6, moe_gemm_share=0.2)
    one = StepShape.of([(1, 100)])
    moves, gemms = expert_parts(m, one, free)
    assert moves + gemms == pytest.approx(expert_time(m, one, free))
    # One token: 24 us a layer of GEMMs (beating their 20 us share) after 80 us of the rest,
    # whose own bytes (a few KB) take far less than that.
    assert gemms == pytest.approx(240e-6, rel=0.02)
    assert moves < 10e-6
    assert expert_layers_time(m, one, serial) == pytest.approx(10 * 80e-6 + gemms)
    assert expert_layers_time(m, one, overlapped) == pytest.approx(1e-3)
    assert hbm_step_time(m, one, serial) - hbm_step_time(m, one, free) == pytest.approx(
        10 * 80e-6 - moves
    )
    # A big batch: the row-moving kernels are bound by their bytes, not by their launches,
    # and the GEMMs by theirs; the chain adds nothing.
    big = StepShape.of([(1, 100)] * 4096)
    moves, gemms = expert_parts(m, big, free)
    assert moves > 10 * 80e-6
    assert hbm_step_time(m, big, serial) == pytest.approx(hbm_step_time(m, big, free))


def test_the_expert_chain_gemm_share_is_two_kernels_of_the_engine_chain(
    catalog: Catalog,
) -> None:
    # Ten kernels a layer, two of them the grouped GEMMs, on FP8 experts; vLLM's fused MXFP4
    # chain has six, and the same two GEMMs read the weights.
    fp8 = WeightFormats(dense="fp8", experts="fp8")
    mxfp4 = WeightFormats(dense="bf16", experts="mxfp4")

    def share(engine: str, model: str, weights: WeightFormats, dtype: str) -> float:
        knobs = catalog.engine(engine).knobs_for("h200-sxm")
        dep = catalog.deployment(
            "h200-sxm",
            model,
            dtype=dtype,
            weights=weights,
            engine=knobs,
            layout=ParallelLayout(tp=8),
        )
        return dep._constants.moe_gemm_share  # type: ignore[union-attr]

    assert share("trtllm-1.1", "qwen3-235b-a22b", fp8, "fp8") == pytest.approx(0.2)
    assert share("vllm-0.14", "gpt-oss-120b", mxfp4, "bf16") == pytest.approx(2 / 6)


def test_host_work_per_sequence_hides_behind_the_gpu_only_with_overlap(catalog: Catalog) -> None:
    # Llama-3.1-8B on one H200, 400 decoding sequences: 100 us of host work each is 40 ms a
    # step. Overlapped with the GPU's step (a few ms here) the step takes the host's 40 ms;
    # without overlap scheduling the two add up.
    shape = StepShape.of([(1, 1000)] * 400)
    gpu = catalog.deployment("h200-sxm", "llama-3.1-8b").step_time(shape)
    assert gpu < 0.04

    def step(**knobs: object) -> float:
        engine = EngineKnobs(max_num_seqs=512, host_seq_s=1e-4, **knobs)  # type: ignore[arg-type]
        return catalog.deployment("h200-sxm", "llama-3.1-8b", engine=engine).step_time(shape)

    assert step(overlap_scheduling=True) == pytest.approx(0.04)
    assert step(overlap_scheduling=False) == pytest.approx(gpu + 0.04)
    # A small batch's host work (10 sequences: 1 ms) stays hidden behind the GPU's step.
    few = StepShape.of([(1, 1000)] * 10)
    engine = EngineKnobs(host_seq_s=1e-4, overlap_scheduling=True)
    hidden = catalog.deployment("h200-sxm", "llama-3.1-8b", engine=engine).step_time(few)
    assert hidden == pytest.approx(catalog.deployment("h200-sxm", "llama-3.1-8b").step_time(few))


def test_a_step_with_prompt_tokens_pays_its_eager_launches(catalog: Catalog) -> None:
    # Llama-3.1-8B has 32 layers: at 1 ms of host time per layer a step that holds a prompt
    # (outside the CUDA graphs) needs 32 ms of host time. 8 GPUs prefill one 1,024-token
    # prompt beside 64 decodes in a few ms, so the host's 32 ms is the step under overlap
    # scheduling and adds to it without. A decode-only step runs in its graph: no change.
    mixed = StepShape.of([(1024, 0)] + [(1, 1000)] * 64)
    decode = StepShape.of([(1, 1000)] * 64)

    def dep(**knobs: object) -> Deployment:
        engine = EngineKnobs(**knobs)  # type: ignore[arg-type]
        return catalog.deployment("h100-sxm", "llama-3.1-8b", count=8, tp=8, engine=engine)

    gpu = dep().step_time(mixed)
    assert gpu < 0.032
    assert dep(eager_layer_s=1e-3, overlap_scheduling=True).step_time(mixed) == pytest.approx(0.032)
    assert dep(eager_layer_s=1e-3).step_time(mixed) == pytest.approx(gpu + 0.032)
    assert dep(eager_layer_s=1e-3).step_time(decode) == pytest.approx(dep().step_time(decode))


def test_an_engines_mla_path_adds_its_constant_per_mla_layer(catalog: Catalog) -> None:
    # DeepSeek-V3 has 61 MLA layers: at 59 us per layer an engine's step takes 61 x 59 us =
    # 3.599 ms longer, at 4 sequences and at 64 alike (a constant, not a batch term). A GQA
    # model (Llama-3.1-70B) on the same engine knobs pays nothing.
    def step(model: str, batch: int, **knobs: object) -> float:
        engine = EngineKnobs(**knobs)  # type: ignore[arg-type]
        dep = catalog.deployment("h200-sxm", model, count=8, tp=8, dtype="fp8", engine=engine)
        return dep.step_time(StepShape.of([(1, 1500)] * batch))

    for batch in (4, 64):
        base = step("deepseek-v3", batch)
        assert step("deepseek-v3", batch, mla_layer_s=59e-6) == pytest.approx(base + 0.003599)
    llama = step("llama-3.1-70b", 16)
    assert step("llama-3.1-70b", 16, mla_layer_s=59e-6) == pytest.approx(llama)


def test_each_linear_attention_layer_pays_its_kernel_chain(catalog: Catalog) -> None:
    # Qwen3.5-397B has 45 Gated-DeltaNet layers among its 60: on H200 each costs a 50 us
    # chain of small kernels per step, 45 x 50 us = 2.25 ms, at 4 sequences and at 64 alike.
    # Llama-3.1-70B has none and pays nothing.
    def steps(model: str, batch: int) -> tuple[float, float]:
        dep = catalog.deployment("h200-sxm", model, count=8, tp=8, dtype="fp8")
        c = dep._constants
        assert isinstance(c, HbmConstants)
        shape = StepShape.of([(1, 1500)] * batch)
        without = replace(c, linear_layer_floor_s=0.0)
        return hbm_step_time(dep.model_shape, shape, c), hbm_step_time(
            dep.model_shape, shape, without
        )

    assert catalog.devices["h200-sxm"].efficiency.linear_layer_floor_s == pytest.approx(50e-6)
    for batch in (4, 64):
        with_chain, without = steps("qwen3.5-397b-a17b", batch)
        assert with_chain - without == pytest.approx(45 * 50e-6)
    with_chain, without = steps("llama-3.1-70b", 16)
    assert with_chain == pytest.approx(without)


def test_attention_runs_at_the_kv_dtype_throughput(catalog: Catalog) -> None:
    # An FP8 Llama-3.1-70B with a BF16 KV cache (the engines' default for FP8 checkpoints):
    # its GEMMs run at 0.6 of the 1,979 TFLOP/s FP8 peak, its attention at 0.55 of the
    # 989 TFLOP/s BF16 peak = 544.0 TFLOP/s per GPU. With an FP8 KV cache attention runs at
    # the serving dtype's throughput, as before.
    bf16_kv = catalog.deployment(
        "h100-sxm", "llama-3.1-70b", dtype="fp8", engine=EngineKnobs(kv_dtype="bf16")
    )
    c = bf16_kv._constants
    assert c.attention_flops_s == pytest.approx(0.55 * 989e12)  # type: ignore[union-attr]
    fp8_kv = catalog.deployment(
        "h100-sxm", "llama-3.1-70b", dtype="fp8", engine=EngineKnobs(kv_dtype="fp8")
    )
    assert fp8_kv._constants.attention_flops_s == 0.0  # type: ignore[union-attr]

    # The step time prices attention FLOPs at that throughput: one 8,192-token prompt on a
    # model whose attention is compute-bound (KV bytes tiny), 1e14 FLOP/s for attention
    # against mfu · peak = 5e14 for everything else.
    m = shape(kv_bytes_per_token=1.0)
    s = StepShape.of([(8192, 0)])
    f = attention_flops(m, s)
    slow = consts(attention_flops_s=1e14)
    assert hbm_step_time(m, s, slow) - hbm_step_time(m, s, consts()) == pytest.approx(
        f / 1e14 - f / 5e14
    )


def test_block_fp8_experts_have_a_ceiling_on_their_gemm_efficiency() -> None:
    # 4,096 tokens, top-2 of 8 experts: 1,024 rows per expert, so the GEMM efficiency curve
    # gives 0.5 · 1024 / (1024 + 32) = 0.485 of peak. Bandwidth made ample: compute-bound.
    # Per layer F = 2 · 8192 · 1000 · 3000 = 4.9152e10 FLOPs; ten layers at 0.485 · 1e15
    # FLOP/s take 1.0138 ms; under a 0.2 ceiling, 2.4576 ms.
    m = eight_experts()
    big = StepShape.of([(1, 100)] * 4096)
    free = consts(bandwidth=1e18, gemm_half_tokens=32.0)
    capped = consts(bandwidth=1e18, gemm_half_tokens=32.0, expert_mfu_cap=0.2)
    eff = 0.5 * 1024 / (1024 + 32)
    assert expert_time(m, big, free) == pytest.approx(10 * 4.9152e10 / (eff * 1e15), rel=1e-3)
    assert expert_time(m, big, capped) == pytest.approx(10 * 4.9152e10 / (0.2 * 1e15), rel=1e-3)
    # Four tokens: 1 row per expert, efficiency 0.5 / 33 = 0.015, under the ceiling; and the
    # weight reads bound the kernels anyway (real bandwidth): the ceiling changes nothing.
    few = StepShape.of([(1, 100)] * 4)
    assert expert_time(m, few, consts(expert_mfu_cap=0.2, gemm_half_tokens=32.0)) == (
        pytest.approx(expert_time(m, few, consts(gemm_half_tokens=32.0)))
    )


def test_the_ceiling_applies_to_block_scaled_fp8_experts_on_hopper_only(catalog: Catalog) -> None:
    fp8 = WeightFormats(dense="fp8", experts="fp8")
    eight = ParallelLayout(tp=8)

    def cap(device: str, model: str, dtype: str, weights: WeightFormats | None) -> float:
        dep = catalog.deployment(device, model, dtype=dtype, weights=weights, layout=eight)
        return dep._constants.expert_mfu_cap  # type: ignore[union-attr]

    assert cap("h200-sxm", "deepseek-v3", "fp8", fp8) == 0.3
    assert cap("h100-sxm", "qwen3-235b-a22b", "fp8", fp8) == 0.3
    # BF16 experts, an FP8 checkpoint scaled per tensor (Mixtral), Blackwell (block scales in
    # its tensor cores): no ceiling.
    assert cap("h200-sxm", "qwen3-235b-a22b", "bf16", None) == 0.0
    assert cap("h200-sxm", "mixtral-8x7b", "fp8", None) == 0.0
    assert cap("b200", "deepseek-v3", "fp8", fp8) == 0.0


def test_block_fp8_dense_gemms_have_their_own_ceiling() -> None:
    # One 4,096-token prompt through a dense 1e9-parameter model: F = 2 · 1e9 · 4096 = 8.192e12
    # FLOPs at 0.5 · 4096 / (4096 + 32) = 0.4961 of peak, 16.51 ms; under a 0.2 ceiling,
    # 40.96 ms. The weights (1e9 bytes at 0.5 TB/s, 2 ms) do not bind, attention is unchanged,
    # so the step grows by exactly the difference.
    prompt = StepShape.of([(4096, 0)])
    eff = 0.5 * 4096 / (4096 + 32)
    f = 2 * 1e9 * 4096
    dense = shape()
    free, capped = consts(gemm_half_tokens=32.0), consts(gemm_half_tokens=32.0, dense_mfu_cap=0.2)
    grown = hbm_step_time(dense, prompt, capped) - hbm_step_time(dense, prompt, free)
    assert grown == pytest.approx(f / 0.2e15 - f / (eff * 1e15), rel=1e-9)
    # A MoE model: only the non-expert share of the active parameters, 1e9 / (1e9 + 6e7)
    # (routed experts active: 2.4e8 bytes · 2 / 8), moves; the experts keep their own ceiling.
    moe = eight_experts()
    share = 1e9 / (1e9 + 2.4e8 * 2 / 8)
    grown = hbm_step_time(moe, prompt, capped) - hbm_step_time(moe, prompt, free)
    assert grown == pytest.approx(share * (f / 0.2e15 - f / (eff * 1e15)), rel=1e-9)
    # A ceiling above the curve changes nothing (four decode rows run at 0.5 · 4 / 36).
    few = StepShape.of([(1, 100)] * 4)
    assert hbm_step_time(dense, few, capped) == hbm_step_time(dense, few, free)


def test_the_dense_ceiling_applies_to_block_scaled_fp8_dense_models_on_hopper_only(
    catalog: Catalog,
) -> None:
    eight = ParallelLayout(tp=8)

    def cap(device: str, model: str, dtype: str, weights: WeightFormats | None = None) -> float:
        dep = catalog.deployment(device, model, dtype=dtype, weights=weights, layout=eight)
        return dep._constants.dense_mfu_cap  # type: ignore[union-attr]

    assert cap("h100-sxm", "qwen3-32b", "fp8") == 0.4
    assert cap("h200-sxm", "qwen3-32b", "fp8") == 0.4
    # A MoE checkpoint's other GEMMs (its experts have their own ceiling), 16-bit weights, a
    # checkpoint scaled per tensor (Llama), Blackwell (block scales in its tensor cores): none.
    assert cap("h200-sxm", "deepseek-v3", "fp8", WeightFormats(dense="fp8", experts="fp8")) == 0.0
    assert cap("h100-sxm", "qwen3-32b", "bf16") == 0.0
    assert cap("h100-sxm", "llama-3.1-70b", "fp8") == 0.0
    assert cap("b200", "qwen3-32b", "fp8") == 0.0


def test_fused_moe_kernels_read_block_fp8_experts_at_their_share_of_the_bandwidth(
    catalog: Catalog,
) -> None:
    # One token through top-2 of 8 experts, bytes-bound: half the bandwidth, twice the time.
    m = eight_experts()
    one = StepShape.of([(1, 100)])
    full = expert_time(m, one, consts())
    assert expert_time(m, one, consts(expert_bandwidth_share=0.5)) == pytest.approx(2 * full)
    # vLLM's profiles carry their fused-MoE kernels' share to block-scaled FP8 experts only.
    vllm = catalog.engine("vllm-0.14").knobs_for("h200-sxm")
    fp8 = WeightFormats(dense="fp8", experts="fp8")
    layout = ParallelLayout(tp=8)
    qwen = catalog.deployment(
        "h200-sxm", "qwen3-235b-a22b", dtype="fp8", weights=fp8, engine=vllm, layout=layout
    )
    assert qwen._constants.expert_bandwidth_share == 0.6  # type: ignore[union-attr]
    mixtral = catalog.deployment("h200-sxm", "mixtral-8x7b", dtype="fp8", engine=vllm)
    assert mixtral._constants.expert_bandwidth_share == 1.0  # type: ignore[union-attr]


def test_a_fused_mxfp4_expert_chain_lowers_the_expert_floor_by_its_kernel_count(
    catalog: Catalog,
) -> None:
    # H200's floor is 50 us a routed-expert layer: ten kernels. vLLM runs gpt-oss's MXFP4
    # experts through six (triton_kernels), so 30 us; TensorRT-LLM's profile keeps ten.
    mxfp4 = WeightFormats(dense="bf16", experts="mxfp4")
    layout = ParallelLayout(tp=8)

    def floor(engine: str, model: str, weights: WeightFormats, dtype: str) -> float:
        knobs = catalog.engine(engine).knobs_for("h200-sxm")
        dep = catalog.deployment(
            "h200-sxm", model, dtype=dtype, weights=weights, engine=knobs, layout=layout
        )
        return dep._constants.moe_layer_floor_s  # type: ignore[union-attr]

    assert catalog.engine("vllm-0.14").knobs_for("h200-sxm").mxfp4_moe_kernels == 6
    assert floor("vllm-0.14", "gpt-oss-120b", mxfp4, "bf16") == pytest.approx(30e-6)
    assert floor("vllm-0.11", "gpt-oss-120b", mxfp4, "bf16") == pytest.approx(30e-6)
    assert floor("trtllm-1.1", "gpt-oss-120b", mxfp4, "bf16") == pytest.approx(50e-6)
    # Other expert formats keep the usual chain under the same engine.
    fp8 = WeightFormats(dense="fp8", experts="fp8")
    assert floor("vllm-0.14", "qwen3-235b-a22b", fp8, "fp8") == pytest.approx(50e-6)


def sparse(**kw: float) -> ModelShape:
    """Ten layers of DeepSeek sparse attention: top-100 keys, an indexer of 2 heads of 64
    (2·10·2·64 = 2,560 FLOPs a pair), 10·(64 + 4) = 680 bytes of indexer keys per token on
    top of 100 bytes of latent."""
    return shape(
        kv_bytes_per_token=780.0,
        sparse_topk=100,
        index_pair_flops=2 * 10 * 2 * 64,
        index_kv_bytes_per_token=680.0,
        **kw,
    )


def test_sparse_attention_attends_to_at_most_topk_keys_per_query() -> None:
    m = sparse()
    # Four sequences decoding at 1,000 cached tokens: 1,001 pairs each, 100 kept.
    decode = StepShape.of([(1, 1000)] * 4)
    assert sparse_keep(m, decode) == pytest.approx((100 / 1001, 100 / 1000))
    assert attention_flops(m, decode) == pytest.approx(4 * 10 * 1000 * 4 * 100)
    # Latent reads: 100 of each sequence's cached tokens and the 4 new ones; the indexer's
    # keys are not attention's to read.
    assert attention_bytes(m, decode) == pytest.approx((4 * 100 + 4) * 100.0)
    # Short contexts are untouched: 50 cached tokens are under the top 100.
    short = StepShape.of([(1, 50)] * 4)
    assert sparse_keep(m, short) == (1.0, 1.0)
    assert attention_flops(m, short) == attention_flops(shape(), short)
    # A dense model keeps everything, however long its context.
    assert sparse_keep(shape(), decode) == (1.0, 1.0)


def test_sparse_prefill_keeps_topk_pairs_per_new_token() -> None:
    # A 1,000-token prompt from scratch: 500,500 causal pairs, 1,000 · 100 kept (at the mean:
    # the exact count, 100 · 1,000 − 100 · 99 / 2 = 95,050, is 5 % lower).
    m = sparse()
    prompt = StepShape.of([(1000, 0)])
    assert sparse_keep(m, prompt)[0] == pytest.approx(100_000 / 500_500)
    assert attention_flops(m, prompt) == pytest.approx(4 * 10 * 1000 * 100_000)


def test_the_indexer_scores_every_key_and_takes_at_least_its_kernel_chain() -> None:
    m = sparse()
    c = consts(index_layer_floor_s=10e-6)
    # A 10,000-token prefill: 50,005,000 pairs at 2,560 FLOPs on one device at 0.5 of
    # 1 PFLOP/s = 256 us, above the key writes (10,000 · 680 B at 0.5 TB/s = 13.6 us) and the
    # ten layers' 10 us floors.
    prompt = StepShape.of([(10_000, 0)])
    assert indexer_time(m, prompt, c) == pytest.approx(50_005_000 * 2560 / 0.5e15)
    # Four decodes at 1,000 cached tokens: 4,004 pairs (0.02 us of FLOPs), 4,004 keys read
    # (5.4 us): the ten layers' kernel chains, 100 us, bind.
    decode = StepShape.of([(1, 1000)] * 4)
    assert indexer_time(m, decode, c) == pytest.approx(100e-6)
    # At a large decode batch the key cache binds: 512 · 1,001 keys of 680 B at 0.5 TB/s.
    batch = StepShape.of([(1, 1000)] * 512)
    assert indexer_time(m, batch, c) == pytest.approx(512 * 1001 * 680 / 0.5e12)
    # Replicated over tensor parallelism: TP 4 leaves it as it is, while each of 4
    # data-parallel ranks scores only its own quarter of the sequences.
    assert indexer_time(m, batch, consts(index_layer_floor_s=10e-6, tp=4)) == pytest.approx(
        indexer_time(m, batch, c)
    )
    assert indexer_time(m, batch, consts(index_layer_floor_s=10e-6, dp=4)) == pytest.approx(
        128 * 1001 * 680 / 0.5e12
    )
    # The step pays for it; a dense model has none.
    assert hbm_step_time(m, decode, c) - hbm_step_time(
        replace(m, index_pair_flops=0.0), decode, c
    ) == pytest.approx(100e-6)
    assert indexer_time(shape(), decode, c) == 0.0


def test_glm5_indexer_from_its_config(catalog: Catalog) -> None:
    # GLM-5: 78 layers, index_n_heads 32, index_head_dim 128, index_topk 2048.
    m = catalog.model("glm-5").shape("fp8", kv_dtype="bf16")
    assert m.sparse_topk == 2048
    assert m.index_pair_flops == 2 * 78 * 32 * 128
    assert m.index_kv_bytes_per_token == 78 * (128 + 4)
    assert m.kv_bytes_per_token == 78 * 576 * 2 + 78 * 132
    # The indexer's floor is nine kernels at the per-kernel time of the experts' ten.
    dep = catalog.deployment("h200-sxm", "glm-5", dtype="fp8", tp=8)
    assert dep._constants.index_layer_floor_s == pytest.approx(90e-6)  # type: ignore[union-attr]
    # DeepSeek-V3 attends densely.
    assert catalog.model("deepseek-v3").shape("fp8").sparse_topk == 0
