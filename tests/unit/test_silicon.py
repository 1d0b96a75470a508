"""Measured-run rows: parsing, mapping to the emulation, the closed loop and the accuracy maths
(backends/sim/silicon.py, gateway/silicon.py)."""

from __future__ import annotations

import datetime
import math
import random
from pathlib import Path
from statistics import mean
from typing import Any

import pytest

from backends.emulator.engine import Engine
from backends.emulator.timing import StepShape
from gateway.sim.silicon import (
    AIPERF,
    BENCH_SERVING,
    BREAKDOWNS,
    Layout,
    LoopResult,
    ManualClock,
    Prediction,
    RowError,
    SiliconRow,
    accuracy,
    breakdown,
    ceiling,
    closed_loop,
    concurrency_of,
    device_of,
    fit_objective,
    is_train,
    parse_row,
    recipe_of,
    rel_error,
    sibling_deployments,
    summary_table,
    weights_of,
)

AGG = {
    "id": "r1",
    "silicon_data_source": "db-dump; config_id=1; silicon_concurrency=16; measured=x",
    "backend": "trtllm",
    "backend_version": "1.0.0rc3",
    "model_path": "deepseek-ai/DeepSeek-R1",
    "system": "h200_sxm",
    "precision": "fp8",
    "mode": "agg",
    "isl": "1024",
    "osl": "128",
    "gemm_quant_mode": "fp8",
    "moe_quant_mode": "fp8_block",
    "batch_size": "16",
    "tp_size": "8",
    "pp_size": "1",
    "attention_dp_size": "",
    "moe_tp_size": "1",
    "moe_ep_size": "8",
    "silicon_ttft_ms": "250.0",
    "silicon_tpot_ms": "12.5",
}

DISAGG = {
    "id": "d1",
    "silicon_data_source": "source_file=x.csv; silicon_concurrency=64",
    "backend": "sglang",
    "backend_version": "0.5.9",
    "model_path": "Qwen/Qwen3-32B",
    "system": "h100_sxm",
    "precision": "",
    "mode": "disagg",
    "isl": "4000",
    "osl": "1000",
    "prefill_batch_size": "1",
    "prefill_num_workers": "2",
    "prefill_tp_size": "2",
    "prefill_pp_size": "1",
    "prefill_moe_ep_size": "0",
    "decode_batch_size": "32",
    "decode_num_workers": "1",
    "decode_tp_size": "4",
    "decode_attention_dp_size": "1",
    "silicon_ttft_ms": "900",
    "silicon_tpot_ms": "40",
}


def test_parse_agg_row_reads_layout_concurrency_and_measurements() -> None:
    row = parse_row(AGG)
    assert (row.mode, row.isl, row.osl, row.concurrency) == ("agg", 1024, 128, 16)
    assert row.agg == Layout(tp=8, pp=1, dp=1, moe_tp=1, moe_ep=8, batch=16, workers=1)
    assert (row.ttft_ms, row.tpot_ms) == (250.0, 12.5)
    assert row.model == "deepseek-v3"
    assert row.device == "h200-sxm"
    assert row.family == "deepseek"


def test_parse_disagg_row_reads_both_layouts_and_worker_counts() -> None:
    row = parse_row(DISAGG)
    assert row.prefill == Layout(tp=2, pp=1, dp=1, moe_tp=1, moe_ep=1, batch=1, workers=2)
    assert row.decode == Layout(tp=4, pp=1, dp=1, moe_tp=1, moe_ep=1, batch=32, workers=1)
    assert row.prefill.gpus == 2
    assert row.agg is None


def test_a_row_without_a_version_gets_the_engine_family_of_the_day_it_was_measured() -> None:
    from gateway.sim.silicon_run import engine_profile

    dated = {**AGG, "backend": "vllm", "backend_version": ""}
    dated["silicon_data_source"] = "silicon_concurrency=4; measured=2025-10-29T00:00:00.000Z"
    row = parse_row(dated)
    assert row.measured == datetime.date(2025, 10, 29)
    assert engine_profile(row).name == "vllm-0.11"  # 0.13.0, the next family, is 2025-12-19
    undated = parse_row({**dated, "silicon_data_source": "silicon_concurrency=4; measured=x"})
    assert undated.measured is None
    assert engine_profile(undated).name == "vllm-0.14"  # the default family


@pytest.mark.parametrize(
    ("path", "profile"),
    [
        ("deepseek-ai/DeepSeek-R1", "deepseek-v3"),
        ("deepseek-ai/DeepSeek-R1-0528", "deepseek-v3"),
        ("nvidia/DeepSeek-V3.1-NVFP4", "deepseek-v3"),
        ("nvidia/GLM-5-NVFP4", "glm-5"),
        ("nvidia/MiniMax-M2.5-NVFP4", "minimax-m2.5"),
        ("nvidia/Qwen3.5-397B-A17B-NVFP4", "qwen3.5-397b-a17b"),
        ("meta-llama/Meta-Llama-3.1-405B", "llama-3.1-405b"),
        ("nvidia/Llama-3.3-70B-Instruct-FP4", "llama-3.1-70b"),
        ("Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "qwen3-235b-a22b"),
        ("moonshotai/Kimi-K2-Instruct", "kimi-k2.5"),
        # Another architecture under a related name: not guessed.
        ("deepseek-ai/DeepSeek-V3.2", None),
        ("zai-org/GLM-5.1", None),
        ("openai/gpt-oss-20b", None),
    ],
)
def test_model_paths_resolve_to_their_architecture(path: str, profile: str | None) -> None:
    assert parse_row({**AGG, "model_path": path}).model == profile


def test_concurrency_falls_back_to_batch_times_workers() -> None:
    d = {**DISAGG, "silicon_data_source": "source_file=x.csv"}
    assert concurrency_of(d) == 32
    with pytest.raises(RowError):
        concurrency_of({**AGG, "silicon_data_source": "", "batch_size": ""})


@pytest.mark.parametrize(
    ("change", "message"),
    [({"mode": "both"}, "mode"), ({"isl": "0"}, "isl"), ({"id": ""}, "id"), ({"osl": "x"}, "osl")],
)
def test_bad_rows_are_refused(change: dict[str, str], message: str) -> None:
    with pytest.raises(RowError, match=message):
        parse_row({**AGG, **change})


def test_weight_formats_follow_precision_and_quant_modes() -> None:
    row = parse_row(AGG)
    assert weights_of(row) == weights_of(parse_row({**AGG, "moe_quant_mode": "fp8"}))
    assert (weights_of(row).dense, weights_of(row).experts) == ("fp8", "fp8")
    bf16 = parse_row({**AGG, "precision": "", "gemm_quant_mode": "", "moe_quant_mode": ""})
    assert weights_of(bf16).compute == "bf16"
    kimi = parse_row({**AGG, "precision": "int4", "moe_quant_mode": "int4_wo"})
    assert (weights_of(kimi).dense, weights_of(kimi).experts) == ("bf16", "int4")
    # gpt-oss ships its own MXFP4 experts: the same formats with or without FP4 tensor cores.
    fp4 = {"precision": "fp4", "gemm_quant_mode": "nvfp4", "moe_quant_mode": "nvfp4"}
    oss = parse_row({**AGG, **fp4, "model_path": "openai/gpt-oss-120b"})
    for native in (False, True):
        w = weights_of(oss, fp4_gemms=native)
        assert (w.dense, w.experts, w.compute) == ("bf16", "mxfp4", "bf16")
    # Any other model at FP4 is NVIDIA's NVFP4 checkpoint: FP4 GEMMs where the GPU has them.
    nv = parse_row({**AGG, **fp4, "model_path": "nvidia/DeepSeek-V3.1-NVFP4"})
    w = weights_of(nv, fp4_gemms=True)
    assert (w.dense, w.experts, w.compute) == ("nvfp4", "nvfp4", "fp4")
    assert weights_of(nv).compute == "bf16"  # no FP4 tensor cores: dequantised into BF16
    mixed = parse_row({**AGG, "moe_quant_mode": "nvfp4"})  # FP8 attention, NVFP4 experts
    w = weights_of(mixed, fp4_gemms=True)
    assert (w.dense, w.experts, w.compute) == ("fp8", "nvfp4", "fp4")
    w4a8 = parse_row({**AGG, "gemm_quant_mode": "w4afp8", "moe_quant_mode": "w4afp8"})
    assert (weights_of(w4a8).experts, weights_of(w4a8).compute) == ("int4", "fp8")
    spelled = {"precision": "bfloat16", "gemm_quant_mode": "", "moe_quant_mode": ""}
    assert weights_of(parse_row({**AGG, **spelled})).compute == "bf16"
    with pytest.raises(RowError):
        weights_of(parse_row({**AGG, "precision": "int2", "gemm_quant_mode": "int2"}))


class ConstantTimer:
    """Every step takes ``t`` seconds, whatever it holds."""

    def __init__(self, t: float, capacity: int = 1_000_000) -> None:
        self.t = t
        self.kv_capacity_tokens = capacity

    def step_time(self, shape: StepShape) -> float:
        return self.t


def on_10ms_steps(
    concurrency: int, osl: int, budget: int = 8192, **loop: Any
) -> tuple[LoopResult, float]:
    """The closed loop of 100-token prompts on an engine whose every step takes 10 ms, with a
    token budget of ``budget`` per step; its result and the clock at its end."""
    timer = ConstantTimer(0.010)
    clock = ManualClock()
    engine = Engine(timer, clock, max_num_batched_tokens=budget, bulk_decode=False)  # type: ignore[arg-type]
    r = closed_loop(
        engine, clock, timer.step_time, concurrency=concurrency, isl=100, osl=osl, **loop
    )
    return r, clock.t


def test_closed_loop_single_client_hand_worked() -> None:
    # One client, a prompt that fits one step: the first token comes after the front end
    # (2 ms) and one step (10 ms); every further token one step later.
    r, _ = on_10ms_steps(1, 5, frontend_s=0.002)
    assert r.ttft_s == pytest.approx(0.012)
    assert r.tpot_s == pytest.approx(0.010)
    assert r.converged
    assert 2 <= r.counted <= 20
    # The engine is idle when the request arrives: it waits only for the front end.
    assert r.wait_s == pytest.approx(0.002)
    assert r.admitted_together == 1.0


def test_a_serving_path_latency_adds_to_ttft_and_not_to_tpot() -> None:
    # One client, 10 ms steps, a 30 ms serving path: the first token leaves the engine after one
    # step (10 ms) and reaches the client 30 ms later (40 ms); the last one too, so every token
    # is shifted alike and TPOT stays one step. The client sends its next request when it reads
    # the last token, so the engine is idle again when it arrives: no wait.
    r, end = on_10ms_steps(1, 5, latency_s=0.03)
    assert r.ttft_s == pytest.approx(0.040)
    assert r.tpot_s == pytest.approx(0.010)
    assert r.wait_s == pytest.approx(0.0)
    # A request's cycle is its 5 steps plus the 30 ms path: 80 ms between sends.
    assert end == pytest.approx((1 + r.counted) * 0.080 - 0.030)


def test_closed_loop_reports_the_wait_for_a_running_step_and_synchronised_arrivals() -> None:
    # Two clients, no front end, 10 ms steps, prompts that fit one step together: the counted
    # phase opens with both requests sent at once into an idle engine, admitted together,
    # prefilled in the same step and finished in the same step, so every wave is the same:
    # both admitted at once (2 together), no wait, first token after one step.
    timer = ConstantTimer(0.010)
    clock = ManualClock()
    engine = Engine(timer, clock, max_num_batched_tokens=8192, bulk_decode=False)  # type: ignore[arg-type]
    r = closed_loop(engine, clock, timer.step_time, concurrency=2, isl=100, osl=5)
    assert r.admitted_together == 2.0
    assert r.wait_s == pytest.approx(0.0)
    assert r.ttft_s == pytest.approx(0.010)
    # With a 1 ms front end the second request reaches the engine 1 ms after the first, which
    # is already in its prefill step: it waits the 9 ms left of that step, so the two clients
    # stay one step apart, each admitted alone.
    clock = ManualClock()
    engine = Engine(timer, clock, max_num_batched_tokens=8192, bulk_decode=False)  # type: ignore[arg-type]
    r = closed_loop(engine, clock, timer.step_time, concurrency=2, isl=100, osl=5, frontend_s=0.001)
    assert r.admitted_together == 1.0
    assert r.wait_s > 0.001
    assert r.ttft_s == pytest.approx(r.wait_s + 0.010)


def test_closed_loop_counts_waves_after_warmup_and_queues_behind_budget() -> None:
    # Budget 100 tokens, prompts of 100: four clients' prompts take one step each, so the
    # n-th prompt of a wave waits n steps (mean 2.5 steps) on the engine's first wave.
    timer = ConstantTimer(0.010)
    clock = ManualClock()
    engine = Engine(timer, clock, max_num_batched_tokens=100, bulk_decode=False)  # type: ignore[arg-type]
    r = closed_loop(engine, clock, timer.step_time, concurrency=4, isl=100, osl=50)
    assert r.counted % 4 == 0
    assert r.ttft_s >= 0.010
    assert r.tpot_s >= 0.010 * 0.99


def test_a_spread_start_desynchronises_the_clients() -> None:
    # Four clients, 10 ms steps, room for all four prompts in one step. Started as one burst
    # they are admitted together and stay one wave: four prompts every 50-step round. Started
    # one after another over the warm-up wave's latency (0.5 s: one prefill step and 49
    # decodes), each arrives alone, 125 ms after the one before, waits at most the step
    # running (10 ms) and is prefilled in the next (10 ms); having the same latency, they
    # never meet again.
    (burst, _), (spread, _) = on_10ms_steps(4, 50, spread=False), on_10ms_steps(4, 50, spread=True)
    assert burst.admitted_together == 4.0
    assert spread.admitted_together == 1.0
    assert 0.010 < spread.ttft_s <= 0.020 + 1e-9
    assert spread.wait_s <= 0.010 + 1e-9
    assert spread.tpot_s == pytest.approx(0.010)
    assert burst.converged
    assert spread.converged


def test_the_benchmark_recipe_follows_the_rows_source() -> None:
    assert recipe_of("source_file=2026-03-25.csv; model=DeepSeek-R1; silicon_concurrency=13") is (
        BENCH_SERVING
    )
    assert recipe_of("db-dump/2026-04-27; config_id=81; silicon_concurrency=4") is BENCH_SERVING
    assert recipe_of("silicon_concurrency=16") is AIPERF
    assert recipe_of("gtl_job_id=23364591; silicon_concurrency=8") is AIPERF
    row = parse_row({**AGG, "silicon_data_source": "silicon_concurrency=16"})
    assert row.recipe is AIPERF
    # The harness's summary groups rows by it.
    bench = parse_row({**AGG, "silicon_data_source": "source_file=x.csv; silicon_concurrency=4"})
    assert [BREAKDOWNS["client"](r) for r in (row, bench)] == ["aiperf", "bench_serving"]


def test_bench_serving_draws_each_length_from_four_fifths_of_it_to_all_of_it() -> None:
    rng = random.Random(1)
    draws = [BENCH_SERVING.lengths(rng, 1000, 50) for _ in range(4000)]
    isls, osls = [i for i, _ in draws], [o for _, o in draws]
    assert (min(isls), max(isls)) == (800, 1000)
    assert (min(osls), max(osls)) == (40, 50)
    assert mean(isls) == pytest.approx(900, rel=0.01)
    assert mean(osls) == pytest.approx(45, rel=0.01)
    assert AIPERF.lengths(rng, 1000, 50) == (1000, 50)


def test_bench_serving_counts_every_request_and_its_clients_drift_apart() -> None:
    # Four clients, 10 ms steps, a budget of one 100-token prompt per step. aiperf's fixed
    # lengths keep the clients one wave: after the warm-up they queue behind each other's
    # prompts every round. benchmark_serving counts its first wave too (one burst into an idle
    # engine: TTFT 10, 20, 30 and 40 ms, 2.5 ms of the mean over 40 requests) and then draws
    # outputs from [40, 50] tokens, so the clients finish at different steps and a prompt mostly
    # arrives alone (10 ms). The mean TTFT is therefore at least 2.5 + 36 × 10 / 40 = 11.5 ms
    # and below aiperf's; all 10 × 4 requests are run and counted.
    (aiperf, _), (bench, _) = (
        on_10ms_steps(4, 50, budget=100, recipe=recipe) for recipe in (AIPERF, BENCH_SERVING)
    )
    assert (bench.counted, bench.waves, bench.converged) == (40, 10, False)
    assert bench.tpot_s == pytest.approx(0.010)
    assert 0.0115 - 1e-9 <= bench.ttft_s < aiperf.ttft_s


def test_clients_beyond_one_workers_cap_run_on_more_workers() -> None:
    from gateway.sim.silicon_run import agg_loop, agg_replicas

    def row(clients: int, cap: str = "16") -> SiliconRow:
        src = f"silicon_concurrency={clients}"
        return parse_row({**AGG, "silicon_data_source": src, "batch_size": cap})

    one, four, uneven, uncapped = row(16), row(64), row(50), row(64, cap="")
    layouts = [r.agg for r in (one, four, uneven, uncapped)]
    assert all(lay is not None for lay in layouts)
    assert [agg_replicas(r, r.agg) for r in (one, four, uneven, uncapped) if r.agg] == [1, 4, 4, 1]
    # 64 clients on four workers capped at 16 each: every worker runs the 16-client loop.
    assert one.agg is not None
    assert four.agg is not None
    a, b = agg_loop(one, one.agg), agg_loop(four, four.agg)
    assert (b.ttft_s, b.tpot_s, b.counted) == (a.ttft_s, a.tpot_s, a.counted)


def test_explain_splits_ttft_into_the_wait_and_the_engine() -> None:
    from gateway.sim.silicon_run import agg_loop, explain

    row = parse_row(AGG)
    assert row.agg is not None
    r = agg_loop(row, row.agg)
    text = explain(row)
    assert "profile trtllm-1.0" in text
    # A db-dump row came from benchmark_serving.
    assert "client: bench_serving (no warm-up, 10×C counted, lengths drawn from [0.8·L, L])" in text
    assert f"TTFT {r.ttft_s * 1e3:.1f} ms (measured 250.0)" in text
    assert f"{r.wait_s * 1e3:.1f} ms before the engine admits it" in text
    assert f"{(r.ttft_s - r.wait_s) * 1e3:.1f} ms in the engine" in text
    assert 0.0 < r.wait_s < r.ttft_s
    assert 1.0 <= r.admitted_together <= row.concurrency
    # A disaggregated row is explained by its deployment (test_silicon_disagg).
    assert "deployment: recorded" in explain(parse_row(DISAGG))


def test_accuracy_maths_hand_worked() -> None:
    rows = [parse_row({**AGG, "id": f"r{i}"}) for i in range(4)]
    preds = [
        Prediction("r0", 250.0, 12.5),  # exact
        Prediction("r1", 300.0, 14.0),  # TTFT +20 %, TPOT +12 %
        Prediction("r2", 125.0, 10.0),  # TTFT -50 %, TPOT -20 %
        Prediction("r3", None, None, "unsupported"),
    ]
    acc = accuracy(list(zip(rows, preds, strict=True)))
    assert acc.rows == 4
    assert acc.covered == 3
    assert acc.coverage == pytest.approx(0.75)
    assert acc.tpot_within == pytest.approx(2 / 3)
    assert acc.ttft_within == pytest.approx(2 / 3)
    assert acc.tpot_median == pytest.approx(0.12)
    assert acc.ttft_median == pytest.approx(0.20)
    # Signed: TPOT 0, +12 %, -20 % has median 0; TTFT 0, +20 %, -50 % has median 0 too.
    assert acc.tpot_bias == pytest.approx(0.0)
    assert acc.ttft_bias == pytest.approx(0.0)
    assert not acc.meets_targets()
    groups = breakdown(list(zip(rows, preds, strict=True)), lambda r: r.backend)
    assert list(groups) == ["trtllm"]
    table = summary_table(list(zip(rows, preds, strict=True)))
    assert "engine=trtllm" in table
    # AGG is a 1,024-token prompt at 16 clients.
    assert "isl=≤1500 " in table
    assert "clients=≤32 " in table
    line = next(x for x in table.splitlines() if x.startswith("all "))
    assert line.split()[-1] == "+0%"  # TTFT bias
    assert line.split()[-4] == "+0%"  # TPOT bias


def test_ceiling_is_the_best_one_prediction_per_group_of_identical_inputs() -> None:
    def row(i: int, tpot: float, ttft: float, **change: str) -> SiliconRow:
        d = {**AGG, "id": f"r{i}", "silicon_tpot_ms": str(tpot), "silicon_ttft_ms": str(ttft)}
        return parse_row({**d, **change})

    # Three runs on the same inputs: TPOT 10, 11 and 20 ms. 10 and 11 share a band (any
    # prediction in [9.35, 11.5] is within 15 % of both), 20 shares none: 2 of 3 at best.
    # TTFT 100, 140 and 160 ms: their ±25 % bands [75, 125], [105, 175] and [120, 200] all
    # hold [120, 125], so one prediction hits all three.
    same = [row(0, 10.0, 100.0), row(1, 11.0, 140.0), row(2, 20.0, 160.0)]
    # A fourth row on other inputs (64 clients) is its own group, always reachable.
    other = row(3, 50.0, 900.0, silicon_data_source="db-dump; silicon_concurrency=64")
    c = ceiling([*same, other])
    assert (c.rows, c.inputs) == (4, 2)
    assert c.tpot_within == pytest.approx(3 / 4)
    assert c.ttft_within == pytest.approx(4 / 4)
    # TTFT 100 and 200 ms: bands [75, 125] and [150, 250] are disjoint.
    apart = ceiling([row(0, 10.0, 100.0), row(1, 10.0, 200.0)])
    assert apart.ttft_within == pytest.approx(1 / 2)
    assert apart.tpot_within == pytest.approx(1.0)
    # The summary closes with it, for all rows and by mode.
    table = summary_table([(r, Prediction(r.id, 1.0, 1.0)) for r in [*same, other]])
    assert "ceiling" in table
    assert "mode=agg" in table.split("ceiling")[1]


def test_disaggregated_rows_are_grouped_by_whether_they_give_their_deployment() -> None:
    given = parse_row(DISAGG)
    inferred = parse_row(
        {**DISAGG, "id": "d2", "prefill_num_workers": "", "decode_num_workers": ""}
    )
    preds = [Prediction(r.id, 900.0, 40.0) for r in (given, inferred)]
    groups = breakdown(list(zip([given, inferred], preds, strict=True)), BREAKDOWNS["deployment"])
    assert {k: g.rows for k, g in groups.items()} == {"given": 1, "inferred": 1}
    assert BREAKDOWNS["deployment"](parse_row(AGG)) == "given"


def test_a_run_without_its_deployment_takes_the_one_a_sibling_run_records() -> None:
    given = parse_row(DISAGG)
    blank = {"prefill_num_workers": "", "decode_num_workers": "", "decode_batch_size": ""}
    # The same point (engine, version, model, system, lengths, 64 clients) without workers:
    # it takes d1's 2 prefill workers of TP2 and 1 decode worker of TP4 at 32 sequences.
    twin = parse_row({**DISAGG, **blank, "id": "d2", "decode_tp_size": "8"})
    # 128 clients is another point, and an aggregated row is never touched.
    other_src = {"silicon_data_source": "source_file=x.csv; silicon_concurrency=128"}
    other = parse_row({**DISAGG, **blank, "id": "d3", **other_src})
    agg = parse_row(AGG)
    out = sibling_deployments([twin, given, other, agg])
    assert [r.id for r in out] == ["d2", "d1", "d3", "r1"]
    filled = out[0]
    assert (filled.prefill, filled.decode) == (given.prefill, given.decode)
    assert filled.workers_given
    assert filled.deployment_of == "d1"
    assert filled.ttft_ms == twin.ttft_ms  # measurements stay the row's own
    assert out[1] == given
    assert out[3] == agg
    assert not out[2].workers_given
    assert out[2].deployment_of is None
    assert BREAKDOWNS["deployment"](filled) == "sibling"
    assert BREAKDOWNS["deployment"](out[2]) == "inferred"


def test_buckets_of_prompt_length_and_clients_list_in_numeric_order() -> None:
    rows = [
        parse_row({**AGG, "id": f"r{c}", "silicon_data_source": f"silicon_concurrency={c}"})
        for c in (300, 4, 64, 16)
    ]
    preds = [Prediction(r.id, 250.0, 12.5) for r in rows]
    groups = breakdown(list(zip(rows, preds, strict=True)), BREAKDOWNS["clients"])
    assert list(groups) == ["≤8", "≤32", "≤128", ">128"]
    assert [g.rows for g in groups.values()] == [1, 1, 1, 1]


def test_bias_says_which_way_a_group_is_off() -> None:
    rows = [parse_row({**AGG, "id": f"r{i}"}) for i in range(3)]
    preds = [
        Prediction(f"r{i}", 250.0 * (1 + d), 12.5 * (1 - d)) for i, d in enumerate((0.1, 0.3, 0.5))
    ]
    acc = accuracy(list(zip(rows, preds, strict=True)))
    assert acc.ttft_bias == pytest.approx(0.3)  # TTFT too long
    assert acc.tpot_bias == pytest.approx(-0.3)  # TPOT too short
    assert acc.ttft_median == pytest.approx(0.3)


def test_rel_error_and_empty_accuracy() -> None:
    assert rel_error(110.0, 100.0) == pytest.approx(0.10)
    assert rel_error(None, 100.0) is None
    acc = accuracy([])
    assert math.isnan(acc.tpot_median)
    assert math.isnan(acc.coverage)


def test_fit_objective_caps_errors_and_charges_uncovered_rows() -> None:
    rows = [parse_row({**AGG, "id": f"r{i}"}) for i in range(3)]
    preds = [
        Prediction("r0", 250.0, 12.5),
        Prediction("r1", 2500.0, 125.0),  # +900 %: capped at 1
        Prediction("r2", None, None, "x"),  # charged 1
    ]
    assert fit_objective(list(zip(rows, preds, strict=True))) == pytest.approx(2.0)


def test_train_split_is_a_fixed_half() -> None:
    ids = [f"row{i}" for i in range(2000)]
    train = [i for i in ids if is_train(i)]
    assert 900 < len(train) < 1100
    assert train == [i for i in ids if is_train(i)]


def test_whole_prompt_engines_get_a_budget_that_holds_a_prompt_beside_the_batch() -> None:
    """TensorRT-LLM without chunked prefill admits a prompt only if all of it fits in the step's
    token budget. At the default 8,192 tokens an 8,192-token prompt could never join a step
    with decodes in it and the closed loop would serve one request at a time; where the row's
    recipe leaves the engine's default, the mapping sizes the budget to ``isl + batch``."""
    from gateway.sim.silicon_run import knobs_for, predict

    row = parse_row(
        {
            **AGG,
            "model_path": "meta-llama/Llama-3.1-8B-Instruct",
            "precision": "bf16",
            "gemm_quant_mode": "",
            "moe_quant_mode": "",
            "tp_size": "1",
            "moe_ep_size": "",
            "moe_tp_size": "",
            "isl": "8192",
            "osl": "32",
            "batch_size": "8",
            # A recipe that leaves the engine's default budget (benchmark_serving's sources).
            "silicon_data_source": "source_file=x.csv; silicon_concurrency=8",
        }
    )
    assert row.agg is not None
    knobs = knobs_for(row, row.agg)
    assert knobs.step_policy == "whole_prompt"
    assert knobs.max_num_batched_tokens == 8192 + 8
    # (tests/unit/test_engine_policies.py: a whole prompt joins a step only if it fits beside
    # the decodes.) The row runs to a prediction on that budget.
    assert predict(row).ttft_ms is not None


def test_aiperf_rows_run_with_the_token_budget_their_deployment_generator_wrote() -> None:
    """The aiperf pipeline deploys with max_num_tokens = batch + ISL + 1500 (TensorRT-LLM, in
    whole 32-token blocks; vLLM) and ISL + 1500 on prefill workers; decode workers, SGLang
    (whose rows show none of these rules) and the benchmark_serving sources keep the engine's
    default. Hand-worked for ISL 1024, batch 16."""
    from gateway.sim.silicon_run import engine_profile, knobs_for, predict, predict_with

    aiperf = {**AGG, "silicon_data_source": "silicon_concurrency=16"}
    trt = parse_row(aiperf)
    assert trt.agg is not None
    assert trt.recipe is AIPERF
    assert knobs_for(trt, trt.agg).max_num_batched_tokens == 2560  # 2540 → 80 blocks of 32
    assert knobs_for(trt, trt.agg, role="prefill").max_num_batched_tokens == 2528  # 2524 → 79
    assert knobs_for(trt, trt.agg, role="decode").max_num_batched_tokens == 8192

    dense = {
        **aiperf,
        "model_path": "Qwen/Qwen3-32B",
        "moe_ep_size": "",
        "moe_tp_size": "",
        "tp_size": "2",
    }
    vllm = parse_row({**dense, "backend": "vllm", "backend_version": "0.12.0"})
    assert vllm.agg is not None
    assert knobs_for(vllm, vllm.agg).max_num_batched_tokens == 16 + 1024 + 1500
    sglang = parse_row({**dense, "backend": "sglang", "backend_version": "0.5.6"})
    assert sglang.agg is not None
    assert knobs_for(sglang, sglang.agg).max_num_batched_tokens == 8192  # its own default

    served = parse_row(
        {
            **dense,
            "backend": "vllm",
            "backend_version": "0.12.0",
            "silicon_data_source": "source_file=x.csv; silicon_concurrency=16",
        }
    )
    assert served.agg is not None
    assert knobs_for(served, served.agg).max_num_batched_tokens == 8192

    # The burst after the warm-up is prefilled two prompts a step, not eight: the first
    # clients see their first token sooner, so the mean TTFT falls.
    default = predict_with(vllm, {engine_profile(vllm).name: {"max_num_batched_tokens": 8192}})
    generated = predict(vllm)
    assert default.ttft_ms is not None
    assert generated.ttft_ms is not None
    assert generated.ttft_ms < 0.9 * default.ttft_ms


def test_fit_grid_scores_every_combination_of_the_grids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bench_silicon --fit`` with two ``--fit-grid`` knobs scores all 2 × 2 pairs on the
    profile's train rows and reports the best pair."""
    import csv

    from loadtests import bench_silicon

    ids = [i for i in (f"r{n}" for n in range(40)) if is_train(i)][:2]
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(AGG))
        w.writeheader()
        for i in ids:
            w.writerow({**AGG, "id": i, "silicon_data_source": "silicon_concurrency=16"})
    grids = ["serving_latency_s=0,0.05", "eager_layer_s=0,0.001"]
    args = [str(path), "--fit", "trtllm-1.0", "--fit-rows", "2", "--jobs", "1"]
    assert bench_silicon.main(args + [a for g in grids for a in ("--fit-grid", g)]) == 0
    out = capsys.readouterr().out
    tried = [line for line in out.splitlines() if "->" in line]
    assert len(tried) == 4
    for latency in ("0.0", "0.05"):
        for eager in ("0.0", "0.001"):
            pair = f"'serving_latency_s': {latency}, 'eager_layer_s': {eager}"
            assert any(pair in line for line in tried)
    assert "on 2 train rows" in out


def test_an_nvfp4_row_on_blackwell_runs_fp4_gemms_over_an_fp8_kv_cache() -> None:
    from gateway.sim.silicon_run import deployment_for

    fp4 = {"precision": "fp4", "gemm_quant_mode": "nvfp4", "moe_quant_mode": "nvfp4"}
    nvfp4 = {**fp4, "model_path": "nvidia/DeepSeek-V3.1-NVFP4", "system": "b200_sxm"}
    b200 = parse_row({**AGG, **nvfp4})
    assert b200.agg is not None
    dep = deployment_for(b200, b200.agg)
    assert (dep.dtype, dep.engine.kv_dtype) == ("fp4", "fp8")
    assert dep.weights is not None
    assert dep.weights.dense == "nvfp4"
    # The same layout at FP8 on H200: half the weight bytes and twice the bandwidth per
    # token of batch make B200's large decode step the shorter one.
    h200 = parse_row(AGG)
    assert h200.agg is not None
    fp8 = deployment_for(h200, h200.agg)
    batch = StepShape.of([(1, 1500)] * 64)
    assert dep.step_time(batch) < fp8.step_time(batch)
    assert dep.model_shape.expert_weight_bytes == pytest.approx(
        fp8.model_shape.expert_weight_bytes * 0.5625
    )


def test_tensorrt_llm_keeps_an_nvidia_fp8_llamas_kv_cache_in_fp8() -> None:
    from gateway.sim.silicon_run import catalog, deployment_for

    llama = {
        **AGG,
        "backend_version": "",
        "model_path": "meta-llama/Llama-3.1-70B",
        "moe_quant_mode": "fp8",
        "tp_size": "1",
        "moe_tp_size": "",
        "moe_ep_size": "",
        "batch_size": "32",
        "isl": "1024",
        "osl": "8192",
    }
    trt = parse_row(llama)
    assert trt.agg is not None
    dep = deployment_for(trt, trt.agg)
    assert dep.engine.kv_dtype == "fp8"
    # 32 clients of 1,024 + 8,192 tokens (295k) fit one H200 beside the 70B weights at one
    # byte per KV element, not at two: TensorRT-LLM admits a request only with KV for its
    # whole completion, so the format decides whether the 32 queue.
    assert dep.kv_capacity_tokens >= 32 * 9216
    bf16 = catalog().deployment(
        "h200-sxm",
        "llama-3.1-70b",
        dtype="fp8",
        engine=dep.engine.model_copy(update={"kv_dtype": "bf16"}),
    )
    assert bf16.kv_capacity_tokens < 32 * 9216
    # vLLM's auto is the model's 16-bit dtype; the model makers' block-scaled FP8 checkpoints
    # (Qwen3-32B-FP8, DeepSeek-R1) declare no KV format.
    for other in (
        {**llama, "backend": "vllm", "backend_version": "0.12.0"},
        {**llama, "model_path": "Qwen/Qwen3-32B"},
        AGG,
    ):
        row = parse_row(other)
        assert row.agg is not None
        assert deployment_for(row, row.agg).engine.kv_dtype == "bf16"


def test_a_system_name_maps_to_the_gpu_it_carries() -> None:
    # The sample's own names, then other spellings of the same GPUs: case, form factor and
    # rack suffixes do not matter; another GPU (PCIe H100, A100, L40S) is not guessed.
    assert [device_of(s) for s in ("h100_sxm", "h200_sxm", "b200_sxm", "gb200_nvl72")] == [
        "h100-sxm",
        "h200-sxm",
        "b200",
        "gb200",
    ]
    assert [device_of(s) for s in ("gb200_sxm", "GB300", "B300_SXM", "h200", "gb200-nvl72")] == [
        "gb200",
        "gb300",
        "b300",
        "h200-sxm",
        "gb200",
    ]
    assert [device_of(s) for s in ("h100_pcie", "a100_sxm", "l40s")] == [None, None, None]
    row = parse_row({**AGG, "system": "gb200_sxm"})
    assert row.device == "gb200"
