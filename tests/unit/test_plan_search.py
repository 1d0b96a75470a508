"""Plan search on spaces small enough to simulate every candidate."""

from __future__ import annotations

import itertools

import pytest

from backends.emulator.catalog import Catalog
from gateway.sim.plan.evaluate import PlanWorkload, Slos, parse_slo, run_candidate
from gateway.sim.plan.parallel import parallel_map
from gateway.sim.plan.prices import PriceBook
from gateway.sim.plan.request import PlanError, PlanRequest
from gateway.sim.plan.search import search
from gateway.sim.plan.space import Candidate, Pool, Space
from gateway.sim.workload import parse_length

MODEL = "llama-3.1-8b"


def _request(**kw: object) -> PlanRequest:
    base: dict[str, object] = dict(
        model=MODEL,
        workload=PlanWorkload(parse_length("1000"), parse_length("100")),
        rate=12.0,
        slos=Slos((parse_slo("ttft:p90=0.3"), parse_slo("tpot:p90=0.02")), 0.9),
        devices=["h100-sxm"],
        modes=["aggregated", "disaggregated"],
        max_devices=4,
        prices=PriceBook.load(),
        requests=120,
        tp_degrees=(1,),
        max_num_seqs=(256,),
        chunk_budgets=(8192,),
        robustness=False,
    )
    base.update(kw)
    return PlanRequest(**base)  # type: ignore[arg-type]


def _every_candidate(req: PlanRequest) -> list[Candidate]:
    space = Space(Catalog.load(), MODEL, req.devices or [], dtype=req.dtype,
                  tp_degrees=req.tp_degrees, max_num_seqs=req.max_num_seqs,
                  chunk_budgets=req.chunk_budgets)  # fmt: skip
    out = []
    for inst in space.instances():
        for n in range(1, req.max_devices // inst.count + 1):
            out.append(Candidate("aggregated", (Pool("aggregated", inst, n),)))
        for p, d in itertools.product(range(1, req.max_devices), repeat=2):
            if (p + d) * inst.count <= req.max_devices:
                pools = (Pool("prefill", inst, p), Pool("decode", inst, d))
                out.append(Candidate("disaggregated", pools, req.same_vendor_link))
    return out


@pytest.mark.timeout(300)
def test_the_pick_is_the_cheapest_candidate_that_meets_the_slos() -> None:
    req = _request(
        jobs=2,
        workload=PlanWorkload(parse_length("2000"), parse_length("150")),
        rate=40.0,
        slos=Slos((parse_slo("ttft:p90=0.25"), parse_slo("tpot:p90=0.012")), 0.9),
        max_devices=5,
        tp_degrees=(1, 2),
    )
    plan = search(req)
    assert plan.best is not None, plan.infeasible
    price = PriceBook.load().usd_per_hour("h100-sxm") or 0.0
    meeting = [
        c
        for c in _every_candidate(req)
        if run_candidate(
            c, MODEL, req.workload, req.slos, req.rate, requests=req.requests, seed=req.seed
        ).meets
    ]
    assert meeting, "the space must hold a plan that meets the SLOs"
    assert len(meeting) < len(_every_candidate(req)), "some candidate must miss, or it is no test"
    cheapest = min(c.devices for c in meeting) * price
    assert plan.best.usd_per_hour == pytest.approx(cheapest)
    assert plan.best.meets
    assert plan.best.max_rate >= req.rate
    # The plan's own run at the target rate is a run of the chosen candidate.
    again = run_candidate(plan.best.candidate, MODEL, req.workload, req.slos, req.rate,
                          requests=req.requests, seed=req.seed)  # fmt: skip
    assert again.values == plan.best.outcome.values


@pytest.mark.timeout(300)
def test_replay_with_another_seed_meets_and_keeps_the_goodput() -> None:
    plan = search(_request(requests=200, robustness=True))
    assert plan.best is not None
    assert plan.replay is not None
    assert plan.replay.meets
    assert plan.replay.goodput == pytest.approx(plan.best.outcome.goodput, rel=0.1)
    assert set(plan.robustness) >= {"rate -25%", "rate +25%", "one instance lost"}
    assert plan.robustness["rate -25%"].rate == pytest.approx(0.75 * 12.0)
    assert plan.robustness["rate -25%"].meets
    for e in plan.evaluated:  # every plan that met the SLOs, not only the pick
        if e.meets:
            assert set(e.robustness) == {"rate -25%", "rate +25%", "one instance lost"}
            assert e.robustness["rate +25%"].rate == pytest.approx(1.25 * 12.0)


@pytest.mark.timeout(120)
def test_short_prompts_at_light_load_stay_aggregated() -> None:
    req = _request(
        workload=PlanWorkload(parse_length("64"), parse_length("64")),
        rate=2.0,
        slos=Slos((parse_slo("ttft:p90=1"), parse_slo("tpot:p90=0.05"))),
    )
    plan = search(req)
    assert plan.best is not None
    assert plan.best.candidate.mode == "aggregated"
    assert plan.best.candidate.devices == 1
    assert plan.verdict.startswith("aggregated")


@pytest.mark.timeout(120)
def test_an_unreachable_ttft_names_the_binding_constraint_and_the_best_reachable() -> None:
    req = _request(slos=Slos((parse_slo("ttft:p90=0.001"), parse_slo("tpot:p90=0.05"))))
    plan = search(req)
    assert plan.best is None
    assert plan.infeasible is not None
    assert "TTFT" in plan.infeasible
    assert "best reachable" in plan.infeasible
    assert "ttft:p90 ≤ 0.001 s" in plan.infeasible


@pytest.mark.timeout(120)
def test_too_few_devices_for_the_rate_is_named() -> None:
    plan = search(_request(rate=200.0, max_devices=2))
    assert plan.best is None
    assert plan.infeasible is not None
    assert "--max-devices" in plan.infeasible


def test_ray_absent_is_a_clear_error() -> None:
    try:
        import ray  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with pytest.raises(PlanError, match="pip install"):
            parallel_map(abs, [1, -2], 1, "127.0.0.1:6379", False)
    else:
        pytest.skip("ray is installed here")


def test_only_unpriced_devices_under_the_cost_objective_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="--price"):
        search(_request(devices=["groq-lpu-v1"], modes=["aggregated"]))


def test_bad_inputs_are_plan_errors() -> None:
    with pytest.raises(PlanError, match="unknown model"):
        search(_request(model="gpt-9"))
    with pytest.raises(PlanError, match="mode"):
        search(_request(modes=["sideways"]))
    with pytest.raises(PlanError, match="--slo"):
        search(_request(slos=Slos(())))


def test_a_trace_replays_another_window_at_the_planned_rate() -> None:
    from pathlib import Path

    from gateway.sim.workload import load_trace

    trace = load_trace(
        Path(__file__).resolve().parents[2] / "loadtests/traces/mooncake_sample.jsonl"
    )
    w = PlanWorkload(trace=trace)
    first, again, other = w.requests(2.0, 50, 0), w.requests(2.0, 50, 0), w.requests(2.0, 50, 1, 1)
    assert first == again
    assert [r.prompt_tokens for r in first] == [r.prompt_tokens for r in trace[:50]]
    assert [r.prompt_tokens for r in other] == [r.prompt_tokens for r in trace[50:100]]
    # The trace's own arrival pattern, time-scaled to the rate asked for.
    own = w.trace_rate()
    assert own is not None
    stamps = [r.arrival_s or 0.0 for r in trace[:50]]
    assert [r.arrival_s for r in first] == pytest.approx(
        [(t - stamps[0]) * own / 2.0 for t in stamps]
    )
    whole, shifted = w.requests(2.0, len(trace), 0), w.requests(2.0, len(trace), 0, 1)
    assert [r.prompt_tokens for r in shifted] != [r.prompt_tokens for r in whole]
    long = w.requests(2.0, 2 * len(trace), 0)  # repeats, after one mean gap
    assert [r.arrival_s for r in long] == sorted(r.arrival_s or 0.0 for r in long)
    assert (len(long) - 1) / (long[-1].arrival_s or 1.0) == pytest.approx(2.0, rel=0.05)


def test_the_documented_space_holds_hundreds_of_candidates() -> None:
    """docs/plan.md's search: four GPUs for any pool, the LPU for decode, three modes."""
    from gateway.sim.plan.screen import screen

    req = _request(
        model="llama-3.1-70b",
        workload=PlanWorkload(
            parse_length("lognormal:1000,600"), parse_length("lognormal:250,150")
        ),
        rate=20.0,
        devices=["h100-sxm", "h200-sxm", "b200", "mi300x"],
        decode_only=["groq-lpu-v1"],
        modes=["aggregated", "disaggregated", "conditional"],
        tp_degrees=(1, 2, 4, 8),
        max_num_seqs=(64, 256),
        chunk_budgets=(2048, 8192),
    )
    screened, _ = screen(req, Catalog.load(), PriceBook.load())
    assert len(screened) >= 500
    assert {s.candidate.mode for s in screened} == {"aggregated", "disaggregated", "conditional"}
    lpu = [
        s for s in screened if any(p.instance.device == "groq-lpu-v1" for p in s.candidate.pools)
    ]
    assert lpu
    assert all(s.candidate.pools[-1].instance.device == "groq-lpu-v1" for s in lpu)  # decode only
    assert any(s.candidate.heterogeneous and s.candidate.link == "roce_200g" for s in screened)
    assert all(s.usd_per_hour is None for s in lpu)  # unpriced without --price
