"""Served requests leave no reference cycles behind.

At hundreds of requests per second, a cycle per request keeps Python's cycle collector busy;
a request's disconnect watcher once made one (about a fifth of the gateway's CPU). The gateway
runs here under real uvicorn (httptools), in this process so its garbage can be inspected.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.app import YOUNG_GC_THRESHOLD, create_app, settle_heap
from tests.helpers import MODEL, config, pool, settings, uvicorn_in_process

pytestmark = pytest.mark.system

REQUESTS = 30


@pytest.fixture
async def base() -> AsyncIterator[str]:
    app = create_app(settings(config(prefill=pool("h100-sxm"), decode=pool("groq-lpu-v1"))))
    async with uvicorn_in_process(app) as url:
        yield url


def _body(stream: bool, max_tokens: int) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def _garbage_of(requests: AsyncIterator[None]) -> Counter[str]:
    """Type names of what the cycle collector finds after ``requests`` ran."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        async for _ in requests:
            pass
        await asyncio.sleep(0.05)  # let finished requests' tasks end
        gc.collect()
        return Counter(type(o).__qualname__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


# 4 tokens: a few milliseconds; 60: about 0.1 s of LPU decode, in many reads and writes.
@pytest.mark.parametrize("max_tokens", [4, 60], ids=["short", "long"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_completed_requests_leave_no_cycles(base: str, stream: bool, max_tokens: int) -> None:
    body = _body(stream, max_tokens)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        await client.post("/v1/chat/completions", json=body)  # warm: first-use caches

        async def requests() -> AsyncIterator[None]:
            for _ in range(REQUESTS if max_tokens < 10 else REQUESTS // 3):
                resp = await client.post("/v1/chat/completions", json=body)
                assert resp.status_code == 200, resp.text
                yield None

        garbage = await _garbage_of(requests())
    server_side = {
        name: n
        for name, n in garbage.items()
        if name in ("_DisconnectWatcher", "RequestResponseCycle", "Task", "CancelledError")
    }
    assert server_side == {}, garbage.most_common(15)


def test_settle_heap_freezes_what_is_alive_and_collects_young_objects_less_often() -> None:
    threshold = gc.get_threshold()
    try:
        before = gc.get_freeze_count()
        settle_heap()
        assert gc.get_freeze_count() > before + 1000  # the modules' objects, at least
        assert gc.get_threshold()[0] == YOUNG_GC_THRESHOLD > threshold[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
