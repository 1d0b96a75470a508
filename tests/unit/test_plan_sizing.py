"""Plan sizing: DistServe's rate matching and per-instance capacity from the step times."""

from __future__ import annotations

import math

import pytest

from backends.emulator.catalog import Catalog
from gateway.sim.plan.evaluate import parse_slo
from gateway.sim.plan.prices import PriceBook, parse_price
from gateway.sim.plan.screen import economics
from gateway.sim.plan.sizing import (
    Demand,
    Targets,
    colocated,
    match_rates,
    prefill_only,
    prefill_time,
    size_pools,
)
from gateway.sim.plan.space import Candidate, Instance, Pool


def test_distserve_rate_matching_example() -> None:
    """DistServe §4: prefill 5.6 req/s, decode 10 req/s per GPU → two prefill per decode,
    3.3 req/s per GPU against 1.6 colocated."""
    m = match_rates(5.6, 10.0)
    assert (m.prefill, m.decode) == (2, 1)
    assert m.rate == pytest.approx(10.0)
    assert m.per_device() == pytest.approx(10 / 3)
    assert m.per_device() > 2 * 1.6  # more than twice the colocated goodput per GPU


def test_rate_matching_when_decode_is_the_slower_phase() -> None:
    m = match_rates(9.0, 4.0)
    assert (m.prefill, m.decode) == (1, 3)
    assert m.rate == pytest.approx(9.0)
    assert size_pools(20.0, 5.6, 10.0) == (4, 2)
    with pytest.raises(ValueError, match="positive"):
        match_rates(0.0, 1.0)


@pytest.fixture(scope="module")
def dep() -> object:
    return Catalog.load().deployment("h100-sxm", "llama-3.1-8b")


def test_prefill_capacity_shrinks_as_the_ttft_target_tightens(dep: object) -> None:
    demand = Demand(isl=2000, osl=200, isl_tail=3000)
    loose = prefill_only(dep, demand, Targets(ttft_s=2.0, tpot_s=1.0))  # type: ignore[arg-type]
    tight = prefill_only(dep, demand, Targets(ttft_s=0.3, tpot_s=1.0))  # type: ignore[arg-type]
    alone = prefill_time(dep, 3000)  # type: ignore[arg-type]
    assert 0 < tight.rate < loose.rate
    never = prefill_only(dep, demand, Targets(ttft_s=alone / 2, tpot_s=1.0))  # type: ignore[arg-type]
    assert never.rate == 0
    assert never.binding == "ttft"


def test_colocated_prefill_costs_decode_capacity(dep: object) -> None:
    """An aggregated instance sustains less than a pure decode instance of the same device,
    and a tighter TPOT target lowers both."""
    demand = Demand(isl=1500, osl=300, isl_tail=2500)
    t = Targets(ttft_s=1.0, tpot_s=0.03)
    decode = colocated(dep, demand, t, 0.0)  # type: ignore[arg-type]
    agg = colocated(dep, demand, t, 1.0)  # type: ignore[arg-type]
    assert 0 < agg.rate < decode.rate
    assert agg.tpot_s <= 0.03
    assert agg.ttft_s <= 1.0
    tighter = colocated(dep, demand, Targets(ttft_s=1.0, tpot_s=0.015), 0.0)  # type: ignore[arg-type]
    assert tighter.rate < decode.rate


def test_slo_and_price_parsing() -> None:
    t = parse_slo("ttft:p90=1.5")
    assert (t.metric, t.pct, t.limit_s, t.name) == ("ttft", 0.9, 1.5, "ttft:p90")
    assert parse_slo("tpot:p99.9=0.05").pct == pytest.approx(0.999)
    for bad in ("ttft=1", "itl:p90=1", "ttft:p90=x", "ttft:p100=1", "ttft:p90=-1"):
        with pytest.raises(ValueError, match="--slo"):
            parse_slo(bad)
    assert parse_price("groq-lpu-v1=0.5") == ("groq-lpu-v1", 0.5)
    for bad in ("groq", "=1", "a=b", "a=0"):
        with pytest.raises(ValueError, match="--price"):
            parse_price(bad)


def test_prices_are_sourced_and_token_clouds_unpriced() -> None:
    book = PriceBook.load()
    catalog = Catalog.load()
    assert set(book.prices) <= set(catalog.devices)
    for name in ("h100-sxm", "h200-sxm", "b200", "mi300x"):
        price = book.prices[name]
        assert price.usd_per_hour > 0
        assert price.source
        assert price.date
        assert price.trust in "ABC"
    for token_only in ("groq-lpu-v1", "cerebras-wse-3", "sn40l"):
        assert book.usd_per_hour(token_only) is None
    assert PriceBook.load(overrides={"groq-lpu-v1": 0.4}).usd_per_hour("groq-lpu-v1") == 0.4
    assert math.isclose(book.usd_per_hour("h100-sxm") or 0, 3.90)


def test_a_device_rented_in_instances_of_several_sizes_pays_the_size_it_needs() -> None:
    """Inferentia2: one chip rents as an inf2.xlarge ($0.7582), more than one needs the
    12-chip inf2.48xlarge ($12.98 an hour: $1.08177 a chip). Before, every Inferentia2
    deployment was priced at the one-chip rate."""
    book = PriceBook.load()
    assert book.usd_per_hour("inferentia2") == pytest.approx(0.7582)
    assert book.usd_per_hour("inferentia2", devices=1) == pytest.approx(0.7582)
    for chips in (2, 6, 12):
        assert book.usd_per_hour("inferentia2", devices=chips) == pytest.approx(1.08177)
    # Beyond the largest instance a deployment spans several of them, at its rate.
    assert book.usd_per_hour("inferentia2", devices=24) == pytest.approx(1.08177)
    # Devices rented in one size keep their one price whatever the deployment.
    assert book.usd_per_hour("h100-sxm", devices=8) == book.usd_per_hour("h100-sxm")
    # An override is one price for every size.
    assert PriceBook.load(overrides={"inferentia2": 0.5}).usd_per_hour("inferentia2", 12) == 0.5


def test_plan_economics_price_each_pool_at_its_instance_size() -> None:
    catalog = Catalog.load()
    book = PriceBook.load()

    def pool(count: int, replicas: int) -> Pool:
        inst = Instance("inferentia2", count, count, "bf16", 256, 8192)
        return Pool("aggregated", inst, replicas)

    one, _ = economics(Candidate("aggregated", (pool(1, 12),)), catalog, book)
    twelve, _ = economics(Candidate("aggregated", (pool(12, 1),)), catalog, book)
    assert one == pytest.approx(12 * 0.7582)  # twelve one-chip instances
    assert twelve == pytest.approx(12 * 1.08177)  # one 12-chip instance
