"""Physics of the non-GPU families with hand-worked numbers (backends/emulator/accelerators.py,
the dataflow, wafer and SRAM-pipeline profiles) and the cross-vendor KV handoff paths."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from backends.emulator.accelerators import (
    dataflow_placement,
    draft_cost_fraction,
    service_ttft,
    speculative_speedup,
    speculative_tokens_per_step,
    wafer_token_latency,
    wafers_for,
)
from backends.emulator.catalog import Catalog
from backends.emulator.timing import StepShape, pipeline_hop_transfer_time
from backends.errors import CatalogError

DECODE_1 = StepShape.of([(1, 1000)])


# -- speculative decoding -------------------------------------------------------------------


def test_expected_tokens_per_verification_step() -> None:
    # 1 + 0.7 + 0.49 + 0.343 + 0.2401 = 2.7731 = (1 - 0.7^5) / 0.3
    assert speculative_tokens_per_step(4, 0.7) == pytest.approx(2.7731)
    assert speculative_tokens_per_step(3, 1.0) == 4.0
    assert speculative_tokens_per_step(0, 0.7) == 1.0
    with pytest.raises(ValueError, match="acceptance"):
        speculative_tokens_per_step(4, 1.5)


def test_speedup_pays_for_the_drafts() -> None:
    # SN2: 4 drafts of an 8B drafter at 0.131 of a 70B step: 2.7731 / (1 + 4 x 0.131) = 1.8196
    assert speculative_speedup(4, 0.7, 0.131) == pytest.approx(1.8196, rel=1e-4)
    # free drafts: the speedup is the expected tokens
    assert speculative_speedup(4, 0.7, 0.0) == pytest.approx(2.7731)
    assert draft_cost_fraction(0.96e-3, 7.33e-3) == pytest.approx(0.13097, rel=1e-4)


def test_draft_cost_fraction_in_the_sn40l_points_follows_from_the_two_step_times(
    catalog: Catalog,
) -> None:
    from gateway.sim.calibrate import load_points

    draft = catalog.deployment("sn40l", "llama-3.1-8b", tp=16).step_time(DECODE_1)
    for pid, model in (("SN2", "llama-3.1-70b"), ("SN3", "llama-3.1-405b")):
        point = next(p for p in load_points() if p.id == pid)
        target = catalog.deployment("sn40l", model, tp=16).step_time(DECODE_1)
        assert point.knobs.draft_cost_fraction == pytest.approx(
            draft_cost_fraction(draft, target), rel=0.02
        )


# -- SambaNova SN40L: what lives where -------------------------------------------------------


def test_placement_of_405b_on_eight_sockets_spills_to_ddr() -> None:
    # HBM 8 x 64 GB x 0.9 = 460.8 GB; 10% kept for KV -> 414.72 GB of weights in HBM,
    # 810 - 414.72 = 395.28 GB streamed from DDR; SRAM 8 x 0.52 = 4.16 GB of working set.
    p = dataflow_placement(810e9, 8, 64e9, 0.52e9, 1536e9, 0.9, 0.1)
    assert p.hbm_weight_bytes == pytest.approx(414.72e9)
    assert p.ddr_weight_bytes == pytest.approx(395.28e9)
    assert p.hbm_kv_bytes == pytest.approx(46.08e9)
    assert p.sram_working_set_bytes == pytest.approx(4.16e9)
    assert p.ddr_free_bytes == pytest.approx(8 * 1536e9 - 395.28e9)


def test_placement_of_70b_on_sixteen_sockets_keeps_everything_in_hbm() -> None:
    # 16 x 64 x 0.9 = 921.6 GB of HBM: 141 GB of weights, 780.6 GB of KV, nothing in DDR.
    p = dataflow_placement(141e9, 16, 64e9, 0.52e9, 1536e9, 0.9, 0.1)
    assert p.hbm_weight_bytes == 141e9
    assert p.ddr_weight_bytes == 0
    assert p.hbm_kv_bytes == pytest.approx(780.6e9)


def test_placement_beyond_hbm_and_ddr_is_refused() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        dataflow_placement(20e12, 1, 64e9, 0.52e9, 1536e9, 0.9, 0.1)


def test_sn40l_405b_on_eight_sockets_streams_its_overflow_from_ddr(catalog: Catalog) -> None:
    dep = catalog.deployment("sn40l", "llama-3.1-405b", tp=8)
    weights = 405.85e9 * 2  # 811.7 GB at 16 bits
    in_hbm = 8 * 64e9 * 0.9 * 0.9
    ddr = weights - in_hbm  # 397.0 GB
    kv = 1001 * dep.kv_bytes_per_token
    # HBM part at 75% of 8 x 1.6 TB/s, DDR part at 8 x 100 GB/s, plus the 0.12 ms step overhead
    expected = (in_hbm + kv) / (0.75 * 8 * 1.6e12) + ddr / (8 * 0.1e12) + 0.00012
    assert dep.step_time(DECODE_1) == pytest.approx(expected, rel=1e-3)
    assert dep.step_time(DECODE_1) > 0.5  # capacity mode: about 2 tokens a second
    # on sixteen sockets the same model fits HBM and runs 13x faster
    full = catalog.deployment("sn40l", "llama-3.1-405b", tp=16)
    assert full.step_time(DECODE_1) < dep.step_time(DECODE_1) / 10


# -- Cerebras: a pipeline over wafers --------------------------------------------------------


def test_wafer_counts_and_per_token_latency_by_hand(catalog: Catalog) -> None:
    # 70B at 16 bits: 141.1 GB / (44 GB x 0.9 x 0.9 = 35.64 GB) = 3.96 -> 4 wafers
    assert wafers_for(141.1e9, 44e9, 0.9, 0.1) == 4
    assert catalog.deployment("cerebras-wse-3", "llama-3.1-70b").count == 4
    # 405B at 16 bits: 811.7 / 35.64 = 22.8 -> 23 wafers, 22 hops
    dep = catalog.deployment("cerebras-wse-3", "llama-3.1-405b")
    assert dep.count == wafers_for(811.7e9, 44e9, 0.9, 0.1) == 23
    # 126 x 17.4 us + 22 x 280 us = 8.352 ms per token (compute ~1 us on top)
    assert wafer_token_latency(126, 17.4e-6, 23, 280e-6) == pytest.approx(8.3524e-3)
    assert dep.step_time(DECODE_1) == pytest.approx(8.3524e-3, rel=1e-3)
    assert wafer_token_latency(80, 17.4e-6, 4, 280e-6) == pytest.approx(2.232e-3)


PROMPT_100 = StepShape.of([(100, 0)])


def test_a_wafer_prompt_streams_through_the_pipeline_by_hand(catalog: Catalog) -> None:
    # 70B on four wafers, a 100-token prompt: the fill is one token's trip, 80 x 17.4 us +
    # 3 x 280 us = 2.232 ms; the body is all four wafers' compute, (2 x 70.55e9 x 100 +
    # 4 x 80 x 8192 x 5,050 pairs = 1.4124e13 FLOPs) / (0.25 x 125e15 x 4) = 0.113 ms
    dep = catalog.deployment("cerebras-wse-3", "llama-3.1-70b")
    assert dep.step_time(PROMPT_100) == pytest.approx(2.232e-3 + 0.113e-3, rel=2e-3)
    # each wafer-to-wafer link carries the 100 tokens' activations, 100 x 8192 x 2 bytes, in
    # 10.9 us at 150 GB/s: ten times faster than the wafers compute them, so it does not bind
    m = dep.model_shape
    assert pipeline_hop_transfer_time(m, 100, 150e9) == pytest.approx(10.92e-6, rel=1e-3)


def test_a_slow_wafer_link_bounds_the_prompt_stream(catalog: Catalog) -> None:
    dep = catalog.deployment("cerebras-wse-3", "llama-3.1-70b")
    slow = dataclasses.replace(
        dep, device=dep.device.model_copy(update={"hop_bandwidth_gb_s": 1.5})
    )
    # at 1.5 GB/s a link needs 100 x 16,384 B / 1.5e9 = 1.092 ms for the prompt, more than the
    # wafers' 0.113 ms of compute: the stream's body is the link's, 2.232 + 1.092 = 3.324 ms
    assert slow.step_time(PROMPT_100) == pytest.approx(3.324e-3, rel=2e-3)
    # one wafer has no link to cross, whatever its bandwidth
    one = catalog.deployment("cerebras-wse-3", "llama-3.1-8b")
    assert one.count == 1
    slow_one = dataclasses.replace(
        one, device=one.device.model_copy(update={"hop_bandwidth_gb_s": 1e-3})
    )
    assert slow_one.step_time(PROMPT_100) == one.step_time(PROMPT_100)


# -- Groq: chips from SRAM, per-token latency --------------------------------------------------


def test_groq_chips_and_per_token_latency_by_hand(catalog: Catalog) -> None:
    # 70.55 GB at 8 bits / (0.23 GB x 0.9 x 0.65 = 0.13455 GB) = 524.3 -> 525 chips
    dep = catalog.deployment("groq-lpu-v1", "llama-3.1-70b", dtype="fp8")
    assert dep.count == 525
    # 0.38 ms + 80 x 44 us = 3.90 ms; FLOPs 1.4e11 / (0.4 x 750 T x 525) adds ~1 us
    assert dep.step_time(DECODE_1) == pytest.approx(3.90e-3, rel=1e-3)
    # one wave until the 525 slots fill: 500 sequences pay one 3.90 ms pass plus their FLOPs,
    # (2 x 70.55e9 x 500 + 4 x 80 x 8192 x 500 x 1000.5) / 1.575e17 = 0.456 ms -> 4.356 ms
    assert dep.step_time(StepShape.of([(1, 1000)] * 500)) == pytest.approx(4.356e-3, rel=1e-3)
    # 600 sequences need a second wave: two passes
    assert dep.step_time(StepShape.of([(1, 1000)] * 600)) > 2 * 3.90e-3


# -- API services ---------------------------------------------------------------------------


def test_service_ttft_by_hand() -> None:
    # Groq 8B: device 1.9 ms + 30 ms + 10 ms + 40 / 2 x 1.79 ms = 77.7 ms
    assert service_ttft(1.9e-3, 1.79e-3, 0.030, 0.010, 40) == pytest.approx(0.0777)


def test_the_service_profiles_reproduce_the_published_ranges_without_touching_the_device(
    catalog: Catalog,
) -> None:
    from gateway.sim.calibrate import load_set, run_point

    cal = load_set()
    for pid in ("Q6", "Q6-70b", "C4"):
        point = next(p for p in cal.points if p.id == pid)
        rows = run_point(point, catalog, cal.services)
        (row,) = rows
        assert row.passed, (pid, row.predicted)
        # the device alone is two orders of magnitude faster than the API figure
        device = next(p for p in cal.points if p.id == pid).model_copy(update={"service": None})
        (bare,) = run_point(device, catalog, cal.services)
        assert bare.predicted is not None
        assert bare.predicted < 0.01


def test_a_service_row_says_what_its_ttft_is_made_of(catalog: Catalog) -> None:
    from gateway.sim.calibrate import load_set, run_point

    cal = load_set()
    point = next(p for p in cal.points if p.id == "C4-70b")
    (row,) = run_point(point, catalog, cal.services)
    parts = dict(row.detail)
    # Cerebras 70B: device 2.232 ms fill + 0.113 ms prompt, then 30 ms + 10 ms, and half a
    # 40-step round at the device's 2.233 ms per token (80 x 17.4 us + 3 x 280 us + 1 us of
    # FLOPs): 44.66 ms; 87.0 ms in all
    assert parts["device_ttft_mean_s"] == pytest.approx(2.345e-3, rel=2e-3)
    assert parts["service_network_rtt_s"] == 0.030
    assert parts["service_frontend_s"] == 0.010
    assert parts["service_rebatch_wait_s"] == pytest.approx(20 * 2.233e-3, rel=2e-3)
    assert row.predicted == pytest.approx(sum(parts.values()))
    assert row.predicted == pytest.approx(0.0870, rel=2e-3)


# -- cross-vendor KV handoff ----------------------------------------------------------------


@pytest.mark.parametrize("decode", ["groq-lpu-v1", "cerebras-wse-3", "sn40l", "corsair"])
def test_a_gpu_prefill_reaches_every_non_gpu_decode_family(catalog: Catalog, decode: str) -> None:
    name = catalog.handoff_link("h100-sxm", decode)
    assert name is not None
    preset = catalog.links[name]
    assert preset.path
    assert "trust" in preset.source
    link = catalog.link(name)
    assert link.bandwidth <= 54e9  # never faster than staging through the GPU host's PCIe


def test_a_pair_naming_an_unknown_device_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "config"
    shutil.copytree(Catalog.default_dir(), root, ignore=shutil.ignore_patterns("__pycache__"))
    links = yaml.safe_load((root / "links.yaml").read_text())
    links["gpu_to_wafer_ethernet"]["pairs"].append(["h100-sxm", "no-such-wafer"])
    (root / "links.yaml").write_text(yaml.safe_dump(links))
    with pytest.raises(CatalogError, match="no-such-wafer"):
        Catalog.load(root)


def test_a_cross_vendor_disaggregated_config_pays_its_handoff_path(catalog: Catalog) -> None:
    """H100 prefill, Groq decode (deploy/configs/h100-prefill-lpu-decode.yaml): one request's
    end-to-end time over the host-and-Ethernet path exceeds the same over NVLink by the
    difference of the two transfers of its KV, worked by hand."""
    from gateway.settings import load_settings
    from gateway.sim.run import SimulationSpec, simulate
    from gateway.sim.workload import RequestSpec

    path = Path(__file__).resolve().parents[2] / "deploy/configs/h100-prefill-lpu-decode.yaml"
    settings = load_settings(path)
    pool = settings.models[0].pools["prefill"]
    assert pool.kv_link == catalog.handoff_link("h100-sxm", "groq-lpu-v1")

    def e2e(link: str) -> float:
        model = settings.models[0]
        pools = {**model.pools, "prefill": pool.model_copy(update={"kv_link": link})}
        s = settings.model_copy(update={"models": [model.model_copy(update={"pools": pools})]})
        spec = SimulationSpec(s, model.name, [RequestSpec(2000, 4)], concurrency=1, catalog=catalog)
        m = simulate(spec).metrics()
        assert m["requests"] == 1, m["errors"]
        return float(m["e2e_s"]["mean"])

    # 2,000 tokens x 163,840 B (80 layers x 2 x 8 heads x 128 x 1 byte) = 327.7 MB:
    # 5 ms + 327.7 MB / 10 GB/s = 37.77 ms against 0.3 ms + 327.7 MB / 600 GB/s = 0.846 ms
    kv = 2000 * 80 * 2 * 8 * 128 * 1.0
    slow = 0.005 + kv / 10e9
    fast = 0.0003 + kv / 600e9
    assert e2e("gpu_to_lpu_host_ethernet") - e2e("nvlink") == pytest.approx(slow - fast, rel=0.05)
