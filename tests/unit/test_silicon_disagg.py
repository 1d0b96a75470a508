"""Disaggregated rows without worker counts: the inferred xPyD deployment (hand-worked), and
the parsing of the disaggregated columns it relies on."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from backends.emulator.timing import StepShape
from gateway.sim.run import RequestRecord
from gateway.sim.silicon import (
    Layout,
    RowError,
    concurrency_of,
    parse_row,
    without_deployments,
)
from gateway.sim.silicon_disagg import (
    MAX_DECODE_GPUS,
    decode_cap,
    decode_pool,
    infer_pools,
    prefill_workers,
    sweep_pool,
)
from gateway.sim.silicon_run import (
    disagg_layouts,
    disagg_settings,
    explain,
    parallel_layout,
    predict,
    wave_means,
)


def _step(shape: StepShape) -> float:
    # 10 ms per step, 0.2 ms per sequence, 10 µs per new token.
    return 0.010 + 2e-4 * shape.seqs + 1e-5 * shape.new_tokens


def fake_dep(max_num_seqs: int = 64, kv_tokens: int = 80_000, dp: int = 1, gpus: int = 8) -> Any:
    engine = SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=4096)
    layout = SimpleNamespace(dp=dp, devices=gpus)
    return SimpleNamespace(
        engine=engine, kv_capacity_tokens=kv_tokens, step_time=_step, layout=layout
    )


def test_decode_cap_is_the_batch_cap_or_the_kv_capacity_at_full_length() -> None:
    # 80,000 KV tokens / (1,000 + 101) tokens a sequence = 72 sequences; the cap 64 binds.
    assert decode_cap(fake_dep(), 1000, 101) == 64
    # 20,000 / 1,101 = 18.2: 18 sequences fit.
    assert decode_cap(fake_dep(kv_tokens=20_000), 1000, 101) == 18


def test_decode_pool_is_the_fewest_workers_that_hold_every_client() -> None:
    assert decode_pool(400, 64) == (7, 58)  # ⌈400/64⌉ = 7 workers, ⌈400/7⌉ = 58 each
    assert decode_pool(64, 64) == (1, 64)
    assert decode_pool(1, 64) == (1, 1)
    with pytest.raises(ValueError, match="at least one"):
        decode_pool(10, 0)


def test_sweep_pool_reads_the_worker_count_off_a_power_of_two_batch() -> None:
    # 288 = 9 · 2^5: nine 8-GPU workers of 32 (the recorded TensorRT-LLM H200 1k/1k series).
    assert sweep_pool(288, 1, 8, 350) == (9, 32)
    assert sweep_pool(36, 1, 8, 350) == (9, 4)
    # Attention DP: 1,152 = 9 workers · 8 ranks · 16 each; a worker's batch is 8 · 16 = 128.
    assert sweep_pool(1152, 8, 8, 350) == (9, 128)
    # A power of two is one worker; an odd client count is that many workers of one.
    assert sweep_pool(64, 1, 8, 350) == (1, 64)
    assert sweep_pool(11, 1, 8, 350) == (11, 1)


def test_sweep_pool_declines_what_no_sweep_deployment_explains() -> None:
    assert MAX_DECODE_GPUS == 128
    assert sweep_pool(17, 1, 8, 350) is None  # 17 workers · 8 GPUs = 136 > 128
    assert sweep_pool(17, 1, 4, 350) == (17, 1)  # 68 GPUs: fits
    assert sweep_pool(9, 1, 16, 350) is None  # 9 two-node workers: 144 GPUs
    assert sweep_pool(576, 1, 8, 32) is None  # 9 workers of 64 > a worker's 32 sequences
    assert sweep_pool(100, 8, 8, 350) is None  # not a multiple of the DP ranks
    assert sweep_pool(0, 1, 8, 350) is None


def test_infer_pools_takes_the_sweep_pool_first() -> None:
    # 288 clients: nine workers of 32 (not the fewest, five of 58 at 64 a worker).
    s = infer_pools(concurrency=288, isl=1000, osl=101, prefill=fake_dep(), decode=fake_dep())
    assert (s.decode_workers, s.decode_batch) == (9, 32)
    assert s.tpot_s == pytest.approx(0.010 + 2e-4 * 32 + 1e-5 * 32)
    # With 16-GPU workers nine would need 144 GPUs: the fewest that hold 288, 5 of 58.
    wide = fake_dep(gpus=16)
    s = infer_pools(concurrency=288, isl=1000, osl=101, prefill=fake_dep(), decode=wide)
    assert (s.decode_workers, s.decode_batch) == (5, 58)


def test_prefill_workers_match_the_rate() -> None:
    assert prefill_workers(178.7, 78.74, 1.0) == 3  # 2.27 workers' worth → 3
    assert prefill_workers(157.48, 78.74, 1.0) == 2  # exactly two workers' worth
    assert prefill_workers(157.48, 78.74, 0.8) == 3  # at most 80 % busy
    assert prefill_workers(0.1, 78.74, 1.0) == 1
    with pytest.raises(ValueError, match="positive"):
        prefill_workers(1.0, 0.0, 1.0)


def test_infer_pools_hand_worked() -> None:
    """C = 400 clients, ISL 1,000, OSL 101.

    400 = 25 · 16, and 25 workers of 8 GPUs exceed the 128-GPU sweep bound, so the decode
    pool is the fewest workers: 64 sequences a worker → 7 workers of 58. TPOT at batch 58:
    10 + 11.6 + 0.58 ms = 22.18 ms. Prefill alone: 10 + 0.2 + 10 ms = 20.2 ms; batched, 4
    prompts (4,096-token budget) a step of 10 + 0.8 + 40 = 50.8 ms → 78.74 prompts/s. Closed
    loop without queueing:
    400 / (0.0202 + 100 · 0.02218) = 178.7 requests/s → ⌈178.7 / 78.74⌉ = 3 prefill workers.
    """
    s = infer_pools(concurrency=400, isl=1000, osl=101, prefill=fake_dep(), decode=fake_dep())
    assert (s.prefill_workers, s.decode_workers, s.decode_batch, s.decode_cap) == (3, 7, 58, 64)
    assert s.tpot_s == pytest.approx(0.02218)
    assert s.prefill_rate == pytest.approx(4 / 0.0508)
    assert s.rate == pytest.approx(400 / (0.0202 + 100 * 0.02218))


# -- rows -------------------------------------------------------------------------------------

ROW = {
    "id": "r1",
    "silicon_data_source": "source_file=x.csv; silicon_concurrency=576",
    "backend": "trtllm",
    "backend_version": "0.8.1.post1",
    "model_path": "deepseek-ai/DeepSeek-R1",
    "system": "h200_sxm",
    "precision": "fp8",
    "gemm_quant_mode": "fp8",
    "moe_quant_mode": "fp8",
    "mode": "disagg",
    "isl": "1024",
    "osl": "1024",
    "prefill_tp_size": "8",
    "prefill_pp_size": "1",
    "prefill_attention_dp_size": "1",
    "prefill_moe_tp_size": "1",
    "prefill_moe_ep_size": "8",
    "decode_tp_size": "8",
    "decode_pp_size": "1",
    "decode_attention_dp_size": "1",
    "decode_moe_tp_size": "1",
    "decode_moe_ep_size": "8",
    "silicon_ttft_ms": "1659",
    "silicon_tpot_ms": "31.0",
}
# The same run as its results database records it: one prefill worker (the engine's default
# batch) and nine decode workers of 64.
RECORDED = {**ROW, "prefill_num_workers": "1", "decode_num_workers": "9", "decode_batch_size": "64"}


def test_a_row_without_worker_counts_gets_a_deployment_that_holds_every_client() -> None:
    row = parse_row(ROW)
    assert not row.workers_given
    prefill, decode = disagg_layouts(row)
    assert (prefill.tp, prefill.moe_ep, decode.tp, decode.moe_ep) == (8, 8, 8, 8)
    assert decode.batch is not None
    # 576 = 9 · 64: the sweep's nine workers of 64, as the recorded twin of this run has.
    assert (decode.workers, decode.batch) == (9, 64)
    assert decode.batch * decode.workers >= row.concurrency
    assert decode.batch * (decode.workers - 1) < row.concurrency  # no idle decode worker
    settings = disagg_settings(row)
    pools = settings.models[0].pools
    assert pools["decode"].workers[0].replicas == decode.workers
    assert pools["prefill"].workers[0].replicas == prefill.workers


def test_a_row_with_worker_counts_keeps_them() -> None:
    row = parse_row(RECORDED)
    assert row.workers_given
    prefill, decode = disagg_layouts(row)
    assert (prefill.workers, decode.workers, decode.batch) == (1, 9, 64)


def test_without_deployments_drops_what_a_row_records_but_its_client_count() -> None:
    given = RECORDED
    derived = {**given, "id": "r2", "silicon_data_source": "db-dump"}  # C = 64 · 9 from them
    agg = {**ROW, "id": "r3", "mode": "agg", "tp_size": "8", "batch_size": "64"}
    stripped, kept, untouched = without_deployments([parse_row(d) for d in (given, derived, agg)])
    assert not stripped.workers_given
    assert stripped.concurrency == 576
    assert stripped.decode is not None
    assert stripped.prefill is not None
    assert (stripped.decode.workers, stripped.decode.batch, stripped.prefill.workers) == (
        1,
        None,
        1,
    )
    assert (stripped.decode.tp, stripped.decode.moe_ep) == (8, 8)  # the layout stays
    # Inferred again, the 576 clients get the nine workers of 64 the row recorded.
    _, decode = disagg_layouts(stripped)
    assert (decode.workers, decode.batch) == (9, 64)
    assert kept.workers_given
    assert kept.decode is not None
    assert kept.decode.workers == 9
    assert untouched == parse_row(agg)


def test_bench_silicon_infer_deployments_grades_the_inference_on_recorded_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The recorded run's workers are dropped with ``--infer-deployments`` and inferred
    again; as the inference recovers them, the prediction is the same one."""
    import csv

    from loadtests import bench_silicon

    given = RECORDED
    rows = tmp_path / "rows.csv"
    with rows.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(given))
        w.writeheader()
        w.writerow(given)
    preds = {}
    for flag in ([], ["--infer-deployments"]):
        out = tmp_path / f"pred{len(flag)}.csv"
        args = [str(rows), "--jobs", "1", "--quiet", "--out", str(out), *flag]
        assert bench_silicon.main(args) == 0
        with out.open() as f:
            preds[bool(flag)] = next(csv.DictReader(f))
        summary = capsys.readouterr().out
        label = "deployment=inferred" if flag else "deployment=given"
        assert any(line.startswith(label) for line in summary.splitlines())
    assert preds[True]["pred_tpot_ms"] == preds[False]["pred_tpot_ms"]
    assert preds[True]["pred_ttft_ms"] == preds[False]["pred_ttft_ms"]


def test_explain_says_where_a_disaggregated_deployment_comes_from() -> None:
    recorded = parse_row(RECORDED)
    text = explain(recorded)
    assert "profile dynamo-trtllm-0.8" in text
    assert "deployment: recorded" in text
    assert "decode: 9 × 8 GPUs (tp 8, experts 1×8, 64 a rank); KV over ib_ndr" in text
    p = predict(recorded)
    assert p.ttft_ms is not None
    assert p.tpot_ms is not None
    assert f"TTFT {p.ttft_ms:.1f} ms (measured 1659.0)" in text
    assert f"TPOT {p.tpot_ms:.2f} ms (measured 31.00)" in text
    # Without its workers, the 576 clients are read as the sweep's nine workers of 64.
    inferred = explain(parse_row(ROW))
    assert (
        "deployment: inferred: the sweep's decode pool (576 = 9 workers · 1 rank · 64)" in inferred
    )
    # 768 = 3 · 256, but 256 sequences of 8,192 + 1,024 tokens overflow a worker's KV cache:
    # the fewest workers that hold them instead.
    long = explain(
        parse_row({**ROW, "isl": "8192", "silicon_data_source": "silicon_concurrency=768"})
    )
    assert "deployment: inferred: the fewest decode workers of" in long


def test_concurrency_of_a_disagg_row_counts_decode_dp_ranks() -> None:
    d = {
        **ROW,
        "silicon_data_source": "db-dump",
        "decode_batch_size": "16",
        "decode_num_workers": "9",
        "decode_attention_dp_size": "8",
    }
    assert concurrency_of(d) == 16 * 8 * 9


def test_experts_without_a_recorded_split_shard_over_all_attention_ranks() -> None:
    d = {
        **ROW,
        "model_path": "Qwen/Qwen3-235B-A22B-FP8",
        "prefill_tp_size": "1",
        "prefill_attention_dp_size": "4",
        "prefill_moe_tp_size": "0",
        "prefill_moe_ep_size": "0",
    }
    row = parse_row(d)
    assert row.prefill == Layout(tp=1, pp=1, dp=4, moe_tp=4, moe_ep=1, batch=None, workers=1)
    assert row.prefill.gpus == 4
    assert math.isclose(row.concurrency, 576)


def _rec(ttft: float, tpot: float, out: int = 11, error: str | None = None) -> RequestRecord:
    return RequestRecord(
        arrival=0.0,
        prompt_tokens=100,
        output_tokens=out,
        first_at=ttft,
        end_at=ttft + tpot * (out - 1),
        error=error,
    )


def test_wave_means_weight_the_burst_wave_as_one_of_aiperfs_rounds() -> None:
    """The counted phase starts every client at once; that wave is 1 of 20, the later
    (repeating) waves the other 19: TTFT (2.0 + 19 × 0.2) / 20 = 0.29 s."""
    first = [_rec(2.0, 0.010), _rec(2.0, 0.010)]
    later = [_rec(0.2, 0.020), _rec(0.2, 0.020), _rec(9.9, 9.9, error="boom")]
    ttft, tpot = wave_means(first, later, 20)
    assert ttft == pytest.approx(0.29)
    assert tpot == pytest.approx((0.010 + 19 * 0.020) / 20)
    assert wave_means(first, [], 20) == pytest.approx((2.0, 0.010))
    with pytest.raises(RowError, match="no request"):
        wave_means([], [_rec(1.0, 1.0, error="x")], 20)


@pytest.mark.parametrize(
    ("tp", "moe_tp", "dp"),
    [
        (1, 4, 4),  # tp 1 with experts split four ways: four DP ranks, one per GPU
        (2, 4, 2),  # tp 2 over four expert GPUs: two DP ranks of two
    ],
)
def test_attention_fills_an_expert_group_larger_than_its_recorded_ranks(
    tp: int, moe_tp: int, dp: int
) -> None:
    row = parse_row(
        {
            **ROW,
            "mode": "agg",
            "model_path": "Qwen/Qwen3-235B-A22B-FP8",
            "tp_size": str(tp),
            "attention_dp_size": "",
            "moe_tp_size": str(moe_tp),
            "moe_ep_size": "1",
            "batch_size": "8",
        }
    )
    assert row.agg is not None
    lay = parallel_layout(row, row.agg)
    assert (lay.tp, lay.dp, lay.moe_tp, lay.ep, lay.devices) == (tp, dp, moe_tp, 1, moe_tp)


@pytest.mark.parametrize(("tp", "dp"), [(4, 1), (8, 1), (2, 4)])
def test_experts_with_no_recorded_split_are_sharded_over_every_gpu(tp: int, dp: int) -> None:
    """``moe_tp`` and ``moe_ep`` both 1 on a multi-GPU MoE worker: the engines' default, each
    expert sharded over all ``tp × dp`` GPUs, not one GPU holding every expert."""
    row = parse_row(
        {
            **ROW,
            "mode": "agg",
            "model_path": "Qwen/Qwen3-235B-A22B-FP8",
            "tp_size": str(tp),
            "attention_dp_size": str(dp),
            "moe_tp_size": "1",
            "moe_ep_size": "1",
            "batch_size": "8",
        }
    )
    assert row.agg is not None
    lay = parallel_layout(row, row.agg)
    assert (lay.tp, lay.dp, lay.moe_tp, lay.ep, lay.devices) == (tp, dp, tp * dp, 1, tp * dp)


@pytest.mark.parametrize(
    ("system", "prefill", "decode", "link"),
    [
        # Two TP2 prefill workers and a TP4 decode worker: one 8-GPU node.
        ("h100_sxm", Layout(tp=2, workers=2), Layout(tp=4), "nvlink"),
        # A TP8 node of each kind: 16 GPUs over the nodes' InfiniBand NICs.
        ("h200_sxm", Layout(tp=8), Layout(tp=8), "ib_ndr"),
        # Four DEP4 prefill workers and a DEP32 decode worker, 48 GPUs of one NVL72 rack.
        ("gb200", Layout(dp=4, moe_ep=4, workers=4), Layout(dp=32, moe_ep=32), "nvlink"),
        # Nine 8-GPU decode workers and a prefill worker: 80 GPUs, more than one rack.
        ("gb200", Layout(tp=8), Layout(tp=8, workers=9), "ib_ndr"),
    ],
)
def test_kv_moves_over_nvlink_only_inside_one_nvlink_domain(
    system: str, prefill: Layout, decode: Layout, link: str
) -> None:
    from gateway.sim.silicon_run import disagg_link

    row = parse_row({**ROW, "system": system})
    assert disagg_link(row, prefill, decode) == link


def test_each_attention_rank_schedules_its_own_token_budget() -> None:
    from gateway.sim.silicon_run import knobs_for

    # A TensorRT-LLM prefill worker of 8 attention ranks (DEP8): 8,192-token prompts under
    # the default 8,192 budget, one prompt per rank per step, eight per worker.
    row = parse_row({**ROW, "isl": "8192"})
    tp8 = knobs_for(row, Layout(tp=8, moe_ep=8), role="prefill")
    dep8 = knobs_for(row, Layout(dp=8, moe_ep=8), role="prefill")
    assert dep8.max_num_batched_tokens == 8 * tp8.max_num_batched_tokens
    # SGLang divides its chunked-prefill size among the ranks: the worker's stays one budget.
    sgl = parse_row({**ROW, "isl": "8192", "backend": "sglang", "backend_version": "0.5.9"})
    assert knobs_for(sgl, Layout(dp=8, moe_ep=8), role="prefill").max_num_batched_tokens == (
        knobs_for(sgl, Layout(tp=8, moe_ep=8), role="prefill").max_num_batched_tokens
    )


def test_each_attention_rank_takes_the_default_batch_cap() -> None:
    from gateway.sim.silicon_run import knobs_for

    # TensorRT-LLM's max_batch_size (2,048) applies to each of the 8 attention ranks.
    row = parse_row(ROW)
    tp8 = knobs_for(row, Layout(tp=8, moe_ep=8), role="decode")
    dep8 = knobs_for(row, Layout(dp=8, moe_ep=8), role="decode")
    assert tp8.max_num_seqs == 2048
    assert dep8.max_num_seqs == 8 * 2048
    # A recorded batch of 16 a rank is 128 for the worker, not scaled again.
    assert knobs_for(row, Layout(dp=8, moe_ep=8, batch=16), role="decode").max_num_seqs == 128
    # SGLang's ranks split one cap.
    sgl = parse_row({**ROW, "backend": "sglang", "backend_version": "0.5.9"})
    one = knobs_for(sgl, Layout(tp=8, moe_ep=8), role="decode").max_num_seqs
    assert knobs_for(sgl, Layout(dp=8, moe_ep=8), role="decode").max_num_seqs == one
