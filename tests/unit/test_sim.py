"""The simulation driver (gateway/sim/run.py): the gateway's dispatch in virtual time."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import pytest

from backends.clock import LoopClock
from backends.emulator.catalog import Catalog, EngineKnobs
from backends.emulator.timing import StepShape, kv_transfer_time
from gateway.settings import EmulatedWorker, parse_settings
from gateway.sim.run import SimulationSpec, Slo, device_settings, simulate
from gateway.sim.simulate import spanning
from gateway.sim.workload import RequestSpec, load_trace, make_workload, parse_length
from tests.helpers import config, pool

TRACE = Path(__file__).resolve().parents[2] / "loadtests" / "traces" / "mooncake_sample.jsonl"


def test_device_settings_split_count_into_instances_of_tp(catalog: Catalog) -> None:
    s = device_settings(
        catalog, device="h100-sxm", model="llama-3.1-70b", dtype="fp8", tp=2, count=8
    )
    (m,) = s.models
    assert m.mode == "aggregated"
    pool_cfg = m.pools["aggregated"]
    assert pool_cfg.policy == "least_loaded"
    (w,) = pool_cfg.workers
    assert isinstance(w, EmulatedWorker)
    assert (w.count, w.tp, w.replicas) == (2, 2, 4)
    with pytest.raises(ValueError, match="multiple of the instance size 2"):
        device_settings(catalog, device="h100-sxm", model="llama-3.1-70b", tp=2, count=3)


def test_device_settings_derive_pipeline_instances_from_memory(catalog: Catalog) -> None:
    one = device_settings(catalog, device="cerebras-wse-3", model="llama-3.1-70b")
    (w,) = one.models[0].pools["aggregated"].workers
    assert isinstance(w, EmulatedWorker)
    assert (w.count, w.replicas) == (4, 1)  # 70B at 16-bit needs four wafers
    two = device_settings(catalog, device="cerebras-wse-3", model="llama-3.1-70b", count=8)
    (w2,) = two.models[0].pools["aggregated"].workers
    assert isinstance(w2, EmulatedWorker)
    assert w2.replicas == 2


def test_device_settings_size_in_memory_cards_from_memory_too(catalog: Catalog) -> None:
    """An in-memory card (d-Matrix Corsair) holds a 70B model only as a group of cards: one
    instance is as many as its SRAM needs, as the deployment planner derives it."""
    planned = catalog.deployment("corsair", "llama-3.1-70b", dtype="fp8")
    assert planned.count > 1
    s = device_settings(catalog, device="corsair", model="llama-3.1-70b", dtype="fp8")
    (w,) = s.models[0].pools["aggregated"].workers
    assert isinstance(w, EmulatedWorker)
    assert (w.count, w.tp, w.replicas) == (planned.count, 1, 1)


def _single(catalog: Catalog, isl: int, osl: int) -> SimulationSpec:
    settings = device_settings(catalog, device="h100-sxm", model="llama-3.1-8b")
    return SimulationSpec(
        settings, "llama-3.1-8b", [RequestSpec(isl, osl)] * 3, concurrency=1, catalog=catalog
    )


def test_single_stream_latencies_are_the_physics(catalog: Catalog) -> None:
    result = simulate(_single(catalog, 1000, 50))
    m = result.metrics()
    dep = catalog.deployment("h100-sxm", "llama-3.1-8b")
    assert m["requests"] == 3
    assert m["ttft_s"]["mean"] == pytest.approx(dep.step_time(StepShape.of([(1000, 0)])), rel=1e-9)
    steps = [dep.step_time(StepShape.of([(1, 1000 + k)])) for k in range(49)]
    assert m["tpot_s"]["mean"] == pytest.approx(sum(steps) / 49, rel=1e-9)
    assert m["itl_s"]["mean"] == pytest.approx(sum(steps) / 49, rel=1e-9)
    assert m["itl_s"]["p50"] == pytest.approx(sorted(steps)[24], rel=1e-9)
    e2e = dep.step_time(StepShape.of([(1000, 0)])) + sum(steps)
    assert m["e2e_s"]["p50"] == pytest.approx(e2e, rel=1e-9)
    assert m["output_tokens_per_s"] == pytest.approx(50 / e2e, rel=1e-6)
    assert m["kv_usage_peak"] > 0
    assert m["preemptions"] == 0
    # One H100 for 3 · e2e seconds, divided over 150 tokens.
    assert m["usd_per_million_output_tokens"] == pytest.approx(
        2.95 * 3 * e2e / 3600 / 150e-6, rel=1e-6
    )
    assert m["joules_per_output_token"] == pytest.approx(700 * 3 * e2e / 150, rel=1e-6)


def test_disaggregated_h100_prefill_lpu_decode(catalog: Catalog) -> None:
    data = config(
        prefill={**pool("h100-sxm", 1), "kv_link": "roce_200g"},
        decode=pool("groq-lpu-v1", 1, dtype="fp8"),
    )
    settings = parse_settings(data, catalog=catalog)
    spec = SimulationSpec(
        settings, "llama-3.1-8b", [RequestSpec(2000, 100)], concurrency=1, catalog=catalog
    )
    result = simulate(spec)
    m = result.metrics()
    h100 = catalog.deployment("h100-sxm", "llama-3.1-8b")
    lpu = catalog.deployment("groq-lpu-v1", "llama-3.1-8b", dtype="fp8")
    assert m["ttft_s"]["mean"] == pytest.approx(h100.step_time(StepShape.of([(2000, 0)])))
    transfer = kv_transfer_time(catalog.link("roce_200g"), 2000 * h100.kv_bytes_per_token, 125)
    lpu_step = lpu.step_time(StepShape.of([(1, 2050)]))
    # Token 2 waits for the KV; tokens 3..100 come at the LPU's pace.
    assert m["itl_s"]["p99"] == pytest.approx(transfer + lpu.step_time(StepShape.of([(1, 2000)])))
    assert m["itl_s"]["p50"] == pytest.approx(lpu_step, rel=0.01)
    devices = {d["device"]: d["count"] for d in m["devices"]}
    assert devices == {"h100-sxm": 1, "groq-lpu-v1": lpu.count}
    assert m["usd_per_million_output_tokens"] is None  # no LPU price is published


def test_first_token_from_the_decode_worker_waits_for_its_kv(catalog: Catalog) -> None:
    """``first_token: decode`` (SGLang PD, Dynamo): the client's first token leaves with the
    decode worker's first chunk, so the KV transfer and the first decode step are in TTFT
    (and out of TPOT); the request ends at the same time."""
    runs = {}
    for first_token in ("prefill", "decode"):
        data = config(
            prefill={**pool("h100-sxm", 1), "kv_link": "roce_200g"},
            decode=pool("groq-lpu-v1", 1, dtype="fp8"),
            first_token=first_token,
        )
        settings = parse_settings(data, catalog=catalog)
        spec = SimulationSpec(
            settings, "llama-3.1-8b", [RequestSpec(2000, 100)], concurrency=1, catalog=catalog
        )
        runs[first_token] = simulate(spec).records[0]
    h100 = catalog.deployment("h100-sxm", "llama-3.1-8b")
    lpu = catalog.deployment("groq-lpu-v1", "llama-3.1-8b", dtype="fp8")
    prefill = h100.step_time(StepShape.of([(2000, 0)]))
    transfer = kv_transfer_time(catalog.link("roce_200g"), 2000 * h100.kv_bytes_per_token, 125)
    first_decode = lpu.step_time(StepShape.of([(1, 2000)]))
    assert runs["prefill"].ttft == pytest.approx(prefill)
    assert runs["decode"].ttft == pytest.approx(prefill + transfer + first_decode)
    assert runs["decode"].end_at == pytest.approx(runs["prefill"].end_at)
    tpot = runs["decode"].tpot
    assert tpot is not None
    assert runs["prefill"].tpot is not None
    assert tpot < runs["prefill"].tpot


def test_open_loop_traffic_simulates_far_faster_than_real_time(catalog: Catalog) -> None:
    settings = device_settings(catalog, device="h100-sxm", model="llama-3.1-8b", count=2)
    w = make_workload(
        isl=parse_length("lognormal:800,400"), osl=parse_length("32"), rate=0.5, duration=1200.0
    )
    spec = SimulationSpec(settings, "llama-3.1-8b", w.requests, catalog=catalog)
    wall = time.perf_counter()
    result = simulate(spec)
    wall = time.perf_counter() - wall
    m = result.metrics()
    assert m["requests"] == pytest.approx(600, rel=0.15)
    assert m["simulated_s"] > 1190
    # One engine step per token at this load (about 20,000 steps), still 100x real time.
    assert wall < m["simulated_s"] / 100
    assert m["failed"] == 0


def test_a_finished_request_is_not_kept_for_the_collector(catalog: Catalog) -> None:
    """Each simulated request's task is let go when the request ends: none of them is left
    behind a reference cycle for the garbage collector (which would walk them all, again
    and again, during a long run)."""
    settings = device_settings(catalog, device="h100-sxm", model="llama-3.1-8b", count=2)
    w = make_workload(isl=parse_length("300"), osl=parse_length("20"), rate=20.0, requests=300)
    spec = SimulationSpec(settings, "llama-3.1-8b", w.requests, catalog=catalog)
    gc.collect()
    before = [o for o in gc.get_objects() if isinstance(o, asyncio.Task)]  # (other tests')
    known = {id(t) for t in before}
    gc.disable()
    try:
        result = simulate(spec)
        tasks = [o for o in gc.get_objects() if isinstance(o, asyncio.Task)]
        # new tasks on a virtual loop (not a server's that another test left running)
        left = sum(1 for t in tasks if id(t) not in known and LoopClock(t.get_loop()).virtual_loop)
    finally:
        gc.enable()
    assert result.metrics()["requests"] == 300
    assert left == 0


def test_closed_loop_for_a_duration_keeps_concurrency_clients_busy(catalog: Catalog) -> None:
    settings = device_settings(catalog, device="h100-sxm", model="llama-3.1-8b")
    w = make_workload(isl=parse_length("500"), osl=parse_length("100"), concurrency=8, duration=30)
    spec = SimulationSpec(
        settings,
        "llama-3.1-8b",
        w.requests,
        concurrency=w.concurrency,
        stop_after_s=w.stop_after_s,
        catalog=catalog,
    )
    m = simulate(spec).metrics()
    assert m["requests"] > 8
    assert m["simulated_s"] >= 30
    # Eight sequences decode together: throughput near eight times one stream's.
    single = simulate(_single(catalog, 500, 100)).metrics()
    assert m["output_tokens_per_s"] > 6 * single["output_tokens_per_s"]


def test_trace_replay_with_prefix_caching_hits_the_shared_prefixes(catalog: Catalog) -> None:
    trace = load_trace(TRACE, limit=60)
    settings = device_settings(
        catalog,
        device="h100-sxm",
        model="llama-3.1-8b",
        count=2,
        engine=EngineKnobs(enable_prefix_caching=True),
    )
    spec = SimulationSpec(settings, "llama-3.1-8b", trace, catalog=catalog, hash_block_tokens=512)
    m = simulate(spec).metrics()
    assert m["requests"] + m["failed"] == 60
    # Up to 8% of these prompt tokens can hit (a shared system prompt, follow-up turns), split
    # over two instances by a balancer that does not look at prefixes.
    assert m["prefix_cache_hit_rate"] > 0.02


def test_goodput_counts_requests_within_both_slos(catalog: Catalog) -> None:
    spec = _single(catalog, 1000, 50)
    tight = simulate(
        SimulationSpec(spec.settings, spec.model, spec.requests, concurrency=1, slo=Slo(0.001, 1))
    )
    loose = simulate(
        SimulationSpec(spec.settings, spec.model, spec.requests, concurrency=1, slo=Slo(10, 1))
    )
    assert tight.metrics()["goodput_requests_per_s"] == 0.0
    assert loose.metrics()["goodput_requests_per_s"] == pytest.approx(
        loose.metrics()["requests_per_s"]
    )


def test_requests_beyond_the_context_are_rejected_not_run(catalog: Catalog) -> None:
    settings = device_settings(catalog, device="h100-sxm", model="llama-2-70b", dtype="fp8", tp=2)
    spec = SimulationSpec(
        settings,
        "llama-2-70b",
        [RequestSpec(4000, 500), RequestSpec(100, 10)],
        concurrency=1,
        catalog=catalog,
    )
    m = simulate(spec).metrics()
    assert m["requests"] == 1
    assert m["errors"] == {"context_length_exceeded": 1}


def test_simulate_report_and_the_gateway_judge_goodput_by_one_slo() -> None:
    from gateway.settings import SloConfig
    from gateway.sim.report import DEFAULT_SLO

    gateway = SloConfig()
    assert (Slo().ttft_s, Slo().tpot_s) == (gateway.ttft_s, gateway.tpot_s) == DEFAULT_SLO


def test_the_simulate_title_says_when_an_instance_spans_scale_up_domains(catalog: Catalog) -> None:
    # An H100 node joins 8 GPUs over NVLink: 16 span two nodes, 8 or fewer fit in one.
    assert spanning(catalog, "h100-sxm", 16) == " spanning 2 scale-up domains of 8"
    assert spanning(catalog, "h100-sxm", 12) == " spanning 2 scale-up domains of 8"
    assert spanning(catalog, "h100-sxm", 8) == ""
    # GB200 (NVL72) sets no domain bound; a torus fabric (Trainium2) has no switched domain.
    assert spanning(catalog, "gb200", 16) == ""
    assert spanning(catalog, "trainium2", 32) == ""
