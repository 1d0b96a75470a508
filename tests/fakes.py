"""A scriptable backend for tests of the gateway's logic: knobs instead of physics.

Example::

    fake = FakeBackend("decode-0", token_delay_s=0.001, fail_after_tokens=3)
    fake.healthy_flag = False     # leaves rotation at once
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from backends.base import (
    BackendLoad,
    GenerationParams,
    KVHandle,
    LegStats,
    PrefillResult,
    TokenChunk,
)
from backends.emulator import synth
from backends.errors import LegFailed


class FakeBackend:
    """Serves every leg with fixed delays; can fail, hang or report itself unhealthy."""

    def __init__(
        self,
        name: str,
        *,
        prefill_delay_s: float = 0.0,
        token_delay_s: float = 0.0,
        fail_prefill: bool = False,
        fail_after_tokens: int | None = None,
        hang_after_tokens: int | None = None,
        wind_down: asyncio.Event | None = None,
    ) -> None:
        self.name = name
        self.prefill_delay_s = prefill_delay_s
        self.token_delay_s = token_delay_s
        self.fail_prefill = fail_prefill
        self.fail_after_tokens = fail_after_tokens
        self.hang_after_tokens = hang_after_tokens
        # Set: a leg, after its last token, waits for it before it ends (an upstream's drain).
        self.wind_down = wind_down
        self.healthy_flag = True
        self.running = 0
        self.held_kv = 0
        self.calls: list[str] = []
        # A load picture to report, for tests of load-aware routing: KV capacity in tokens
        # (None: unknown, as for real upstreams), the share held, the prompt tokens queued, and
        # the most sequences its batch runs.
        self.kv_capacity_tokens: int | None = None
        self.kv_usage = 0.0
        self.waiting_tokens = 0
        self.max_running: int | None = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def healthy(self) -> bool:
        return self.healthy_flag

    def load(self) -> BackendLoad:
        return BackendLoad(
            running=self.running,
            kv_usage=self.kv_usage,
            waiting_tokens=self.waiting_tokens,
            max_running=self.max_running,
        )

    def describe(self) -> dict[str, Any]:
        return {"type": "fake"}

    def capacity_tokens(self) -> int | None:
        return self.kv_capacity_tokens

    def estimate_prefill_s(self, prompt_tokens: int) -> float | None:
        return self.prefill_delay_s * (1 + self.running)

    async def prefill(self, params: GenerationParams) -> PrefillResult:
        self.calls.append("prefill")
        self.running += 1
        try:
            await asyncio.sleep(self.prefill_delay_s)
            if self.fail_prefill:
                raise LegFailed(f"{self.name}: injected prefill failure")
        finally:
            self.running -= 1
        self.held_kv += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.held_kv -= 1

        first = synth.token_text(params.seed, 0)
        finish = "length" if params.max_tokens <= 1 else None
        if finish:
            release()
        kv = KVHandle(self.name, params.prompt_tokens, 0.0, 0, None, first, release)
        stats = LegStats(compute_s=self.prefill_delay_s)
        return PrefillResult(TokenChunk(first, 1, finish, stats), kv, stats)

    async def decode(
        self, params: GenerationParams, kv: KVHandle
    ) -> AsyncGenerator[TokenChunk, None]:
        self.calls.append("decode")
        kv.release()
        async for chunk in self._tokens(params, start=1):
            yield chunk

    async def generate(self, params: GenerationParams) -> AsyncGenerator[TokenChunk, None]:
        self.calls.append("generate")
        await asyncio.sleep(self.prefill_delay_s)
        async for chunk in self._tokens(params, start=0):
            yield chunk

    async def _tokens(
        self, params: GenerationParams, start: int
    ) -> AsyncGenerator[TokenChunk, None]:
        self.running += 1
        try:
            for i in range(start, params.max_tokens):
                if self.fail_after_tokens is not None and i >= self.fail_after_tokens:
                    raise LegFailed(f"{self.name}: injected failure after {i} tokens")
                if self.hang_after_tokens is not None and i >= self.hang_after_tokens:
                    await asyncio.Event().wait()
                await asyncio.sleep(self.token_delay_s)
                last = i == params.max_tokens - 1
                yield TokenChunk(
                    synth.token_text(params.seed, i),
                    1,
                    "length" if last else None,
                    LegStats() if last else None,
                )
            if self.wind_down is not None:
                await self.wind_down.wait()
        finally:
            self.running -= 1
