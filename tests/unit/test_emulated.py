"""EmulatedBackend (backends/emulator/emulated.py): prefill/decode/generate legs in virtual time."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import pytest

from backends.base import GenerationParams, PrefillResult, TokenChunk
from backends.clock import LoopClock
from backends.emulator import synth
from backends.emulator.catalog import Catalog
from backends.emulator.emulated import EmulatedBackend
from backends.emulator.timing import StepShape, kv_transfer_time
from backends.errors import BackendUnavailable
from tests.unit.conftest import RunVirtual

MODEL = "llama-3.1-8b"


def params(**kw: Any) -> GenerationParams:
    base: dict[str, Any] = {
        "request_id": "req-1",
        "model": MODEL,
        "api": "completions",
        "prompt_tokens": 300,
        "max_tokens": 12,
        "seed": 42,
    }
    base.update(kw)
    return GenerationParams(**base)


@dataclass
class Pair:
    prefill: EmulatedBackend
    decode: EmulatedBackend

    async def close(self) -> None:
        await self.prefill.close()
        await self.decode.close()

    def idle(self) -> bool:
        return all(
            not b.engine.running
            and not b.engine.waiting
            and b.engine.free_blocks == b.engine.total_blocks
            for b in (self.prefill, self.decode)
        )


async def make_pair(catalog: Catalog, link: str | None = "roce_200g") -> Pair:
    clock = LoopClock()
    pre = EmulatedBackend(
        "prefill-0",
        catalog.deployment("h100-sxm", MODEL),
        clock,
        link=catalog.link(link) if link else None,
    )
    dec = EmulatedBackend("decode-0", catalog.deployment("groq-lpu-v1", MODEL), clock)
    await pre.start()
    await dec.start()
    return Pair(pre, dec)


async def collect(stream: AsyncGenerator[TokenChunk, None]) -> list[TokenChunk]:
    async with aclosing(stream) as s:
        return [c async for c in s]


async def disaggregated(pair: Pair, p: GenerationParams) -> tuple[PrefillResult, list[TokenChunk]]:
    result = await pair.prefill.prefill(p)
    if result.first.finish_reason is not None:
        return result, []
    return result, await collect(pair.decode.decode(p, result.kv))


def test_prefill_returns_first_token_and_kv_handle(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    p = params(prompt_tokens=300)

    async def main() -> None:
        pair = await make_pair(catalog)
        t0 = LoopClock().now()
        result = await pair.prefill.prefill(p)
        dep = pair.prefill.deployment
        assert LoopClock().now() == pytest.approx(
            t0 + dep.step_time(StepShape.of([(300, 0)])), abs=1e-9
        )
        assert result.first.text == synth.token_text(p.seed, 0)
        assert result.first.tokens == 1
        assert result.first.finish_reason is None
        kv = result.kv
        assert kv.source == "prefill-0"
        assert kv.prompt_tokens == 300
        assert kv.kv_bytes == 300 * catalog.model(MODEL).kv_bytes_per_token("bf16")
        assert kv.kv_bytes == 300 * 131072
        assert kv.descriptors == math.ceil(300 / pair.prefill.engine.block_size)
        assert kv.link == catalog.link("roce_200g")
        # The prefill side holds the KV until the decode side has pulled it.
        assert pair.prefill.engine.used_blocks == math.ceil(300 / 16)
        assert not pair.prefill.engine.running
        assert result.stats.compute_s == pytest.approx(dep.step_time(StepShape.of([(300, 0)])))
        kv.release()
        assert pair.prefill.engine.free_blocks == pair.prefill.engine.total_blocks
        await pair.close()

    run_virtual(main)


def test_decode_streams_the_rest_and_frees_prefill_blocks(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    p = params(prompt_tokens=700, max_tokens=12)

    async def main() -> None:
        pair = await make_pair(catalog)
        result, chunks = await disaggregated(pair, p)
        assert sum(c.tokens for c in chunks) == p.max_tokens - 1
        assert chunks[-1].finish_reason == "length"
        assert all(c.finish_reason is None for c in chunks[:-1])
        text = result.first.text + "".join(c.text for c in chunks)
        assert text == synth.text(p.seed, 0, p.max_tokens)
        stats = chunks[-1].stats
        assert stats is not None
        link = catalog.link("roce_200g")
        expected = kv_transfer_time(link, result.kv.kv_bytes, result.kv.descriptors)
        assert stats.transfer_s == pytest.approx(expected, abs=1e-9)
        assert pair.idle()
        await pair.close()

    run_virtual(main)


def test_decode_without_link_has_no_transfer(run_virtual: RunVirtual, catalog: Catalog) -> None:
    async def main() -> None:
        pair = await make_pair(catalog, link=None)
        _, chunks = await disaggregated(pair, params())
        stats = chunks[-1].stats
        assert stats is not None
        assert stats.transfer_s == 0.0
        assert pair.idle()
        await pair.close()

    run_virtual(main)


def test_max_tokens_one_finishes_at_prefill_and_frees_blocks(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    async def main() -> None:
        pair = await make_pair(catalog)
        result = await pair.prefill.prefill(params(max_tokens=1))
        assert result.first.finish_reason == "length"
        assert pair.idle()
        await pair.close()

    run_virtual(main)


def test_same_seed_same_text_different_seed_different_text(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    async def one(seed: int) -> str:
        pair = await make_pair(catalog)
        result, chunks = await disaggregated(pair, params(seed=seed, max_tokens=20))
        await pair.close()
        return result.first.text + "".join(c.text for c in chunks)

    async def main() -> tuple[str, str, str, str]:
        clock = LoopClock()
        agg = EmulatedBackend("agg-0", catalog.deployment("h100-sxm", MODEL), clock)
        await agg.start()
        generated = "".join(c.text for c in await collect(agg.generate(params(max_tokens=20))))
        await agg.close()
        return await one(42), await one(42), await one(43), generated

    a, b, c, aggregated = run_virtual(main)
    assert a == b
    assert a != c
    assert aggregated == a  # aggregated and disaggregated serving agree
    assert len(a.split()) == 20


def _stop_at(seed: int, index: int) -> tuple[str, str]:
    """A stop string (token ``index``'s word) that first occurs at that token; expected text."""
    word = synth.token_text(seed, index)
    prefix = synth.text(seed, 0, index)
    assert word not in prefix + word[:-1]  # first occurrence really is at ``index``
    return word, prefix


def _seed_with_fresh_word(index: int) -> int:
    for seed in range(1000):
        prefix = synth.text(seed, 0, index)
        if synth.token_text(seed, index) not in prefix + synth.token_text(seed, index)[:-1]:
            return seed
    raise AssertionError("no seed found")


def test_stop_string_in_decode_ends_stream_with_stop(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    seed = _seed_with_fresh_word(6)
    stop, expected = _stop_at(seed, 6)

    async def main() -> None:
        pair = await make_pair(catalog)
        p = params(seed=seed, max_tokens=30, stop=(stop,))
        result, chunks = await disaggregated(pair, p)
        text = result.first.text + "".join(c.text for c in chunks)
        assert chunks[-1].finish_reason == "stop"
        assert stop not in text
        assert text == expected
        assert sum(c.tokens for c in chunks) < p.max_tokens - 1
        assert pair.idle()
        await pair.close()

    run_virtual(main)


def test_stop_string_in_generate_ends_stream_with_stop(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    seed = _seed_with_fresh_word(4)
    stop, expected = _stop_at(seed, 4)

    async def main() -> None:
        agg = EmulatedBackend("agg-0", catalog.deployment("h100-sxm", MODEL), LoopClock())
        await agg.start()
        chunks = await collect(agg.generate(params(seed=seed, max_tokens=30, stop=(stop,))))
        text = "".join(c.text for c in chunks)
        assert chunks[-1].finish_reason == "stop"
        assert text == expected
        assert not agg.engine.running
        assert agg.engine.free_blocks == agg.engine.total_blocks
        await agg.close()

    run_virtual(main)


def test_stop_string_spanning_first_two_tokens_aggregated(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    stop = synth.text(7, 0, 2)

    async def main() -> None:
        agg = EmulatedBackend("agg-0", catalog.deployment("h100-sxm", MODEL), LoopClock())
        await agg.start()
        chunks = await collect(agg.generate(params(seed=7, max_tokens=10, stop=(stop,))))
        assert chunks[-1].finish_reason == "stop"
        assert "".join(c.text for c in chunks) == ""
        await agg.close()

    run_virtual(main)


def test_stop_string_spanning_prefill_and_decode(run_virtual: RunVirtual, catalog: Catalog) -> None:
    stop = synth.text(7, 0, 2)  # token 0 + token 1

    async def main() -> tuple[str, str | None]:
        pair = await make_pair(catalog)
        result, chunks = await disaggregated(pair, params(seed=7, max_tokens=10, stop=(stop,)))
        await pair.close()
        last = chunks[-1].finish_reason if chunks else result.first.finish_reason
        return result.first.text + "".join(c.text for c in chunks), last

    text, finish = run_virtual(main)
    assert stop not in text
    assert text == ""
    assert finish == "stop"


def _stop_cases() -> list[tuple[int, tuple[str, ...], int]]:
    seed = 11
    t = [synth.token_text(seed, i) for i in range(12)]
    return [
        (seed, (t[0] + t[1],), 0),  # spans the prefill/decode boundary
        (seed, (t[0][-2:] + t[1][:3],), 0),  # partial words across the boundary
        (seed, (t[1] + t[2],), 0),
        (seed, (t[5][1:],), 0),
        (seed, ("zzz-not-there", t[7]), 0),
        (seed, (t[0] + t[1],), 3),  # min_tokens: the early stop is not checked
        (seed, (t[2],), 2),
        (seed, (t[6],), 2),
        (seed, (), 0),
    ]


@pytest.mark.parametrize(("seed", "stop", "min_tokens"), _stop_cases())
def test_disaggregated_and_aggregated_agree_on_stop_strings(
    run_virtual: RunVirtual,
    catalog: Catalog,
    seed: int,
    stop: tuple[str, ...],
    min_tokens: int,
) -> None:
    p = params(seed=seed, max_tokens=12, stop=stop, min_tokens=min_tokens)

    async def main() -> tuple[tuple[str, str | None], tuple[str, str | None]]:
        pair = await make_pair(catalog)
        result, chunks = await disaggregated(pair, p)
        assert pair.idle()
        last = chunks[-1].finish_reason if chunks else result.first.finish_reason
        disagg = (result.first.text + "".join(c.text for c in chunks), last)
        agg_chunks = await collect(pair.prefill.generate(p))
        assert pair.idle()
        await pair.close()
        return disagg, ("".join(c.text for c in agg_chunks), agg_chunks[-1].finish_reason)

    disagg, agg = run_virtual(main)
    assert disagg == agg
    text, finish = agg
    full = synth.text(seed, 0, 12)
    assert full.startswith(text)
    if finish == "length":
        assert text == full
    else:
        assert finish == "stop"
        assert any(s in full for s in stop)


async def _open_and_close_early(pair: Pair, leg: str) -> Pair:
    """Start a long stream, read one chunk, close it; return the pair to inspect."""
    p = params(prompt_tokens=2000, max_tokens=500)
    if leg == "decode":
        result = await pair.prefill.prefill(p)
        stream = pair.decode.decode(p, result.kv)
    else:
        stream = pair.decode.generate(p)
    first = await anext(stream)
    assert first.tokens >= 1
    assert len(pair.decode.engine.running) == 1
    await stream.aclose()
    return pair


@pytest.mark.parametrize("leg", ["decode", "generate"])
def test_closing_a_stream_early_frees_both_engines(
    run_virtual: RunVirtual, catalog: Catalog, leg: str
) -> None:
    async def main() -> None:
        pair = await _open_and_close_early(await make_pair(catalog), leg)
        await asyncio.sleep(1e-3)  # let the loop run finalizers
        assert pair.idle()
        assert pair.decode.load().running == 0
        await pair.close()

    run_virtual(main)


@pytest.mark.parametrize("leg", ["decode", "generate"])
def test_closing_a_stream_aborts_its_sequence_at_once(
    run_virtual: RunVirtual, catalog: Catalog, leg: str
) -> None:
    async def main() -> None:
        pair = await _open_and_close_early(await make_pair(catalog), leg)
        idle = pair.idle()  # no await between aclose() and this check
        await pair.close()
        assert idle

    run_virtual(main)


def test_closing_decode_before_the_transfer_lands_frees_both_engines(
    run_virtual: RunVirtual, catalog: Catalog
) -> None:
    """A decode leg closed before its transfer lands frees its own blocks at once; the prefill
    side's stay held (a retry may re-transfer them) until the caller releases the handle."""

    async def main() -> None:
        pair = await make_pair(catalog)
        p = params(prompt_tokens=2000, max_tokens=500)
        result = await pair.prefill.prefill(p)
        held = pair.prefill.engine.used_blocks
        stream = pair.decode.decode(p, result.kv)
        task = asyncio.ensure_future(anext(stream))
        await LoopClock().sleep(1e-4)  # the KV transfer takes milliseconds
        assert pair.decode.engine.used_blocks > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()
        assert pair.decode.engine.used_blocks == 0
        assert pair.prefill.engine.used_blocks == held > 0
        result.kv.release()
        assert pair.idle()
        await pair.close()

    run_virtual(main)


def test_load_reports_engine_state(run_virtual: RunVirtual, catalog: Catalog) -> None:
    async def main() -> None:
        pair = await make_pair(catalog)
        assert pair.decode.load().running == 0
        p = params(prompt_tokens=1000, max_tokens=100)
        result = await pair.prefill.prefill(p)
        stream = pair.decode.decode(p, result.kv)
        await anext(stream)
        load = pair.decode.load()
        assert load.running == 1
        e = pair.decode.engine
        assert load.kv_usage == pytest.approx(e.used_blocks / e.total_blocks)
        assert load.kv_usage > 0
        await stream.aclose()
        await pair.close()

    run_virtual(main)


def test_closed_backend_refuses_work(run_virtual: RunVirtual, catalog: Catalog) -> None:
    async def main() -> None:
        pair = await make_pair(catalog)
        await pair.close()
        assert not pair.prefill.healthy()
        with pytest.raises(BackendUnavailable, match="prefill-0 is not running"):
            await pair.prefill.prefill(params())

    run_virtual(main)
