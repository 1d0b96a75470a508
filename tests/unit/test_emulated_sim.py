"""EmulatedBackend's simulation features: coalesced legs, gap recording, prefix hashes,
layer-wise KV-transfer overlap (backends/emulator/emulated.py, backends/emulator/timing.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from backends.base import GenerationParams, TokenChunk
from backends.clock import LoopClock
from backends.emulator.catalog import Catalog, EngineKnobs
from backends.emulator.emulated import EmulatedBackend
from backends.emulator.timing import Link, StepShape, exposed_kv_transfer_time, kv_transfer_time
from gateway.sim.stats import GapRecorder
from tests.unit.conftest import RunVirtual

LINK = Link("test", bandwidth=20e9, efficiency=1.0, setup_s=0.001, per_descriptor_s=3.2e-6)


def params(**kw: Any) -> GenerationParams:
    base: dict[str, Any] = {
        "request_id": "r",
        "model": "llama-3.1-70b",
        "api": "completions",
        "prompt_tokens": 4000,
        "max_tokens": 50,
        "seed": 1,
    }
    base.update(kw)
    return GenerationParams(**base)


async def collect(stream: AsyncGenerator[TokenChunk, None]) -> list[TokenChunk]:
    return [c async for c in stream]


# -- layer-wise overlap: the formula ------------------------------------------------------


def test_without_layerwise_the_whole_transfer_is_exposed() -> None:
    assert exposed_kv_transfer_time(LINK, 1e9, 1000, 80, 5.0) == kv_transfer_time(LINK, 1e9, 1000)


def test_layerwise_exposes_only_the_last_layers_share_when_compute_covers_it() -> None:
    link = dataclasses.replace(LINK, layerwise=True)
    body = 1000 * 3.2e-6 + 1e9 / 20e9
    assert exposed_kv_transfer_time(link, 1e9, 1000, 80, 5.0) == pytest.approx(0.001 + body / 80)


def test_layerwise_exposes_what_the_prefill_compute_cannot_hide() -> None:
    link = dataclasses.replace(LINK, layerwise=True)
    body = 1e9 / 20e9
    short = 0.01  # the prefill hides (79/80) x 10 ms of a 50 ms transfer
    assert exposed_kv_transfer_time(link, 1e9, 0, 80, short) == pytest.approx(
        0.001 + body - short * 79 / 80
    )
    assert exposed_kv_transfer_time(link, 1e9, 0, 80, 0.0) == pytest.approx(0.001 + body)


def test_layerwise_decode_leg_waits_for_less_transfer(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    def transfer(layerwise: bool) -> tuple[float, float]:
        async def main() -> tuple[float, float]:
            clock = LoopClock()
            link = dataclasses.replace(LINK, layerwise=layerwise)
            dep = catalog.deployment("h100-sxm", "llama-3.1-70b", dtype="fp8", tp=2)
            pre = EmulatedBackend("p", dep, clock, link=link)
            dec = EmulatedBackend("d", dep, clock)
            await pre.start()
            await dec.start()
            result = await pre.prefill(params())
            chunks = await collect(dec.decode(params(), result.kv))
            stats = chunks[-1].stats
            assert stats is not None
            await pre.close()
            await dec.close()
            return stats.transfer_s, result.kv.prefill_compute_s

        out: tuple[float, float] = run_virtual(main)
        return out

    whole, compute = transfer(False)
    overlapped, _ = transfer(True)
    kv_bytes = (
        4000 * catalog.deployment("h100-sxm", "llama-3.1-70b", dtype="fp8").kv_bytes_per_token
    )
    assert whole == pytest.approx(kv_transfer_time(LINK, kv_bytes, 250), rel=1e-9)
    assert compute > 0
    expected = exposed_kv_transfer_time(
        dataclasses.replace(LINK, layerwise=True), kv_bytes, 250, 80, compute
    )
    assert overlapped == pytest.approx(expected, rel=1e-9)
    assert overlapped < whole / 2


# -- the serving path's latency -------------------------------------------------------------


def test_the_serving_path_delays_every_chunk_alike(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    # An engine whose serving path takes 80 ms: the client reads the first token and the last
    # 80 ms after the steps that made them, so TTFT grows by 80 ms and the gap between them
    # (what TPOT is made of) does not change.
    def times(latency: float) -> tuple[float, float]:
        async def main() -> tuple[float, float]:
            clock = LoopClock()
            dep = catalog.deployment("h100-sxm", "llama-3.1-8b")
            knobs = dep.engine.model_copy(update={"serving_latency_s": latency})
            backend = EmulatedBackend(
                "a", dataclasses.replace(dep, engine=knobs), clock, coalesce=True
            )
            await backend.start()
            start, seen = clock.now(), []
            async for _ in backend.generate(params(model="llama-3.1-8b", max_tokens=20)):
                seen.append(clock.now() - start)
            await backend.close()
            return seen[0], seen[-1]

        out: tuple[float, float] = run_virtual(main)
        return out

    (first0, last0), (first1, last1) = times(0.0), times(0.08)
    assert first1 == pytest.approx(first0 + 0.08, abs=1e-6)
    assert last1 - first1 == pytest.approx(last0 - first0, abs=1e-6)


# -- coalesced legs and gap recording -----------------------------------------------------------


def test_coalesced_generate_yields_the_first_token_then_the_rest_at_the_end(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    gaps = GapRecorder()

    async def main() -> list[TokenChunk]:
        dep = catalog.deployment("h100-sxm", "llama-3.1-8b")
        backend = EmulatedBackend(
            "a", dep, LoopClock(), coalesce=True, synthesize_text=False, recorder=gaps
        )
        await backend.start()
        chunks = await collect(backend.generate(params(model="llama-3.1-8b", max_tokens=40)))
        await backend.close()
        return chunks

    chunks = run_virtual(main)
    assert [c.tokens for c in chunks] == [1, 39]
    assert [c.text for c in chunks] == ["", ""]
    assert chunks[-1].finish_reason == "length"
    assert gaps.tokens == 39  # every token after the first, recorded per step
    dep = catalog.deployment("h100-sxm", "llama-3.1-8b")
    assert gaps.summary().p50 == pytest.approx(dep.step_time(StepShape.of([(1, 4020)])), rel=0.01)


def test_coalesced_decode_records_the_gap_from_the_prefill_sides_first_token(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    gaps = GapRecorder()

    async def main() -> tuple[list[TokenChunk], float]:
        clock = LoopClock()
        dep = catalog.deployment("h100-sxm", "llama-3.1-70b", dtype="fp8", tp=2)
        pre = EmulatedBackend("p", dep, clock, link=LINK, coalesce=True, recorder=gaps)
        dec = EmulatedBackend("d", dep, clock, link=LINK, coalesce=True, recorder=gaps)
        await pre.start()
        await dec.start()
        result = await pre.prefill(params())
        first_at = clock.now()
        chunks = await collect(dec.decode(params(), result.kv))
        assert pre.engine.free_blocks == pre.engine.total_blocks  # released on landing
        await pre.close()
        await dec.close()
        return chunks, first_at

    chunks, _ = run_virtual(main)
    assert [c.tokens for c in chunks] == [1, 48]  # token 2 (the transfer landed), the rest
    assert gaps.tokens == 49
    assert max(gaps.gaps) > 0.02  # token 2 waited for the KV transfer


def test_block_hashes_reach_the_prefix_cache(run_virtual: RunVirtual, catalog: Catalog) -> None:
    async def main() -> list[float]:
        clock = LoopClock()
        dep = catalog.deployment(
            "h100-sxm", "llama-3.1-8b", engine=EngineKnobs(enable_prefix_caching=True)
        )
        backend = EmulatedBackend("a", dep, clock, coalesce=True)
        await backend.start()
        ttfts = []
        for i in range(2):
            p = params(
                request_id=f"r{i}",
                model="llama-3.1-8b",
                prompt_tokens=4096,
                max_tokens=2,
                block_hashes=tuple(range(8)),
                hash_block_tokens=512,
            )
            start = clock.now()
            chunks = backend.generate(p)
            await chunks.__anext__()
            ttfts.append(clock.now() - start)
            await chunks.aclose()
        assert backend.engine.stats.prefix_hit_tokens == 7 * 512
        await backend.close()
        return ttfts

    first, second = run_virtual(main)
    assert second < first / 4
