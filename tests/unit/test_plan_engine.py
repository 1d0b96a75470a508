"""``pdgate plan --engine NAME``: every candidate runs that engine profile's knobs, and the
written config names the profile so the gateway applies the same knobs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from backends.emulator.catalog import Catalog, EngineKnobs
from gateway.service import worker_deployment
from gateway.settings import EmulatedWorker, load_settings
from gateway.sim.plan.command import build, configure
from gateway.sim.plan.evaluate import PlanWorkload, Slos, parse_slo
from gateway.sim.plan.output import table, write_config
from gateway.sim.plan.prices import PriceBook
from gateway.sim.plan.request import PlanError, PlanRequest
from gateway.sim.plan.screen import screen
from gateway.sim.plan.search import search
from gateway.sim.plan.space import Space
from gateway.sim.workload import parse_length

MODEL = "llama-3.1-8b"
ENGINE = "sglang-0.5"  # differs from the defaults in step policy, batch cap, memory fraction


def _request(**kw: object) -> PlanRequest:
    base: dict[str, object] = dict(
        model=MODEL,
        workload=PlanWorkload(parse_length("1000"), parse_length("100")),
        rate=8.0,
        slos=Slos((parse_slo("ttft:p90=0.5"), parse_slo("tpot:p90=0.03")), 0.9),
        devices=["h100-sxm", "h200-sxm"],
        modes=["aggregated", "disaggregated"],
        max_devices=4,
        prices=PriceBook.load(),
        requests=80,
        tp_degrees=(1,),
        robustness=False,
        engine=ENGINE,
    )
    base.update(kw)
    return PlanRequest(**base)  # type: ignore[arg-type]


def test_the_engine_profiles_knobs_reach_every_candidate(catalog: Catalog) -> None:
    profile = catalog.engine(ENGINE)
    screened, space = screen(_request(), catalog, PriceBook.load())
    assert screened
    seen = set()
    for s in screened:
        for pool in s.candidate.pools:
            i = pool.instance
            expected = profile.knobs_for(i.device)
            assert i.engine == ENGINE
            assert i.knobs == expected
            assert space.deployment(i).engine == expected  # what the sizing used
            assert ENGINE in i.label
            seen.add(i.device)
    assert seen == {"h100-sxm", "h200-sxm"}
    # The per-device memory fraction and the engine's own step policy and batch cap.
    h100, h200 = (profile.knobs_for(d) for d in ("h100-sxm", "h200-sxm"))
    assert h100.gpu_memory_utilization != h200.gpu_memory_utilization
    assert h100.step_policy == "prefill_first"
    assert h100.max_num_seqs != EngineKnobs().max_num_seqs


def test_without_an_engine_the_space_searches_batch_caps_and_chunk_budgets(
    catalog: Catalog,
) -> None:
    space = Space(catalog, MODEL, ["h100-sxm"], tp_degrees=(1,))
    knobs = {(i.max_num_seqs, i.max_num_batched_tokens) for i in space.instances()}
    assert knobs == {(64, 2048), (64, 8192), (256, 2048), (256, 8192)}
    assert all(i.engine is None and i.knobs.step_policy == "mixed" for i in space.instances())
    engine = Space(catalog, MODEL, ["h100-sxm"], tp_degrees=(1,), engine=ENGINE)
    assert len(engine.instances()) == 1


@pytest.mark.timeout(300)
def test_the_written_config_names_the_engine_and_round_trips(
    catalog: Catalog, tmp_path: Path
) -> None:
    plan = search(_request(devices=["h100-sxm"], modes=["aggregated"]))
    assert plan.best is not None, plan.infeasible
    assert f"engine {ENGINE}" in table(plan)
    path = tmp_path / "plan.yaml"
    write_config(plan, path)
    assert f"engine_profile: {ENGINE}" in path.read_text()
    settings = load_settings(path, catalog=catalog)
    (m,) = settings.models
    chosen = {p.role: p.instance for p in plan.best.candidate.pools}
    for role, pool in m.pools.items():
        (worker,) = pool.workers
        assert isinstance(worker, EmulatedWorker)
        assert worker.engine_profile == ENGINE
        # The gateway runs the knobs the plan sized and simulated.
        assert worker_deployment(catalog, worker, m).engine == chosen[role].knobs


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    base = ["--model", MODEL, "--isl", "1000", "--osl", "100", "--rate", "5"]
    return parser.parse_args([*base, "--slo", "ttft:p90=1", *argv])


def test_an_unknown_engine_is_named_with_the_known_ones(catalog: Catalog) -> None:
    with pytest.raises(PlanError) as err:
        build(_args("--engine", "vllm-9"))
    message = str(err.value)
    assert "'vllm-9'" in message
    for name in ["default", *catalog.engines]:
        assert name in message
    assert build(_args("--engine", ENGINE)).engine == ENGINE
    assert build(_args()).engine is None
