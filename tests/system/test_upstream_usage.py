"""``usage_per_chunk``: what a decode leg asks a real upstream for, and how its tokens are
counted. Here every upstream event carries two tokens (as with speculative decoding): with
running usage each chunk counts exactly; without it an event with text counts one and the
final usage settles the rest, so the total is exact either way.

A real HTTP upstream (uvicorn, in this process) records the bodies it receives.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from backends.base import GenerationParams, KVHandle
from backends.upstream.http import HttpBackend, HttpOptions
from backends.wire.render import DONE, WireFormat
from gateway.service import http_backend
from gateway.settings import HttpWorker
from tests.helpers import MODEL, uvicorn_in_process

pytestmark = pytest.mark.system

EVENTS = 3  # of two tokens each
PROMPT = 5


def _upstream(bodies: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        bodies.append(body)
        running = body.get("stream_options", {}).get("continuous_usage_stats", False)
        fmt = WireFormat("completions", "up-1", MODEL, 0, include_usage=True)

        async def events() -> AsyncGenerator[bytes, None]:
            for i in range(EVENTS):
                text = f"w{2 * i} w{2 * i + 1} "
                yield fmt.text_with_usage(text, PROMPT, 2 * (i + 1)) if running else fmt.text(text)
            yield fmt.finish("length") + fmt.usage(PROMPT, 2 * EVENTS) + DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.mark.parametrize("per_chunk", [True, False], ids=["per-chunk", "final-only"])
async def test_decode_leg_counts_every_token(per_chunk: bool) -> None:
    bodies: list[dict[str, Any]] = []
    async with uvicorn_in_process(_upstream(bodies)) as url:
        backend = HttpBackend(
            "decode-0", url, "vllm-nixl", options=HttpOptions(usage_per_chunk=per_chunk)
        )
        await backend.start()
        try:
            params = GenerationParams(
                "r1", MODEL, "completions", PROMPT, 2 * EVENTS, seed=1,
                body={"model": MODEL, "prompt": "hi", "max_tokens": 2 * EVENTS},
            )  # fmt: skip
            kv = KVHandle("prefill-0", PROMPT, 0.0, 0, None, "", params={"ktp": {"a": 1}})
            chunks = [c async for c in backend.decode(params, kv)]
        finally:
            await backend.close()

    options = bodies[0]["stream_options"]
    assert options == ({"include_usage": True, "continuous_usage_stats": True} if per_chunk
                       else {"include_usage": True})  # fmt: skip
    assert bodies[0]["kv_transfer_params"] == {"a": 1}
    assert "".join(c.text for c in chunks) == "w0 w1 w2 w3 w4 w5 "
    assert sum(c.tokens for c in chunks) == 2 * EVENTS
    last = chunks[-1]
    assert last.finish_reason == "length"
    # Counted as they came, or one per event with the rest settled by the final usage.
    assert last.tokens == (0 if per_chunk else EVENTS)


def test_the_worker_setting_reaches_the_backend() -> None:
    spec = HttpWorker(type="http", url="http://127.0.0.1:1", protocol="vllm-nixl")
    assert http_backend("d", spec).options.usage_per_chunk is True
    off = HttpWorker(
        type="http", url="http://127.0.0.1:1", protocol="vllm-nixl", usage_per_chunk=False
    )
    assert http_backend("d", off).options.usage_per_chunk is False
