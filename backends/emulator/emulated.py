"""An emulated instance as a :class:`~backends.base.Backend`: an engine plus synthetic text.

Example::

    dep = Catalog.load().deployment("h100-sxm", "llama-3.1-8b")
    backend = EmulatedBackend("prefill-0", dep, LoopClock(), link=catalog.link("roce_200g"))
    await backend.start()
    result = await backend.prefill(params)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from functools import partial
from typing import Any

from backends.base import (
    BackendLoad,
    GenerationParams,
    KVHandle,
    LegStats,
    PrefillResult,
    TokenChunk,
)
from backends.clock import Clock
from backends.emulator import synth
from backends.emulator.catalog import Deployment
from backends.emulator.engine import Engine, GapRecorder, Sequence
from backends.emulator.timing import Link, StepShape, exposed_kv_transfer_time
from backends.errors import BackendOverloaded, BackendUnavailable


class EmulatedBackend:
    """One emulated device deployment serving prefill, decode and aggregated legs.

    For simulation (:mod:`gateway.sim.run`): ``coalesce`` delivers a leg's first chunk as soon as
    it exists and everything after it in one chunk at the end, and ``synthesize_text=False``
    sends token counts without text (no stop strings then), so a simulated request costs a
    few wake-ups instead of one per token; per-token timing then comes from ``recorder``.
    """

    def __init__(
        self,
        name: str,
        deployment: Deployment,
        clock: Clock,
        *,
        link: Link | None = None,
        time_scale: float = 1.0,
        coalesce: bool = False,
        synthesize_text: bool = True,
        recorder: GapRecorder | None = None,
        seed: int = 0,
    ) -> None:
        self.name = name
        self.deployment = deployment
        self.link = link
        self._clock = clock
        self._coalesce = coalesce
        self._text = synthesize_text
        self.engine = Engine.from_knobs(
            deployment,
            clock,
            deployment.engine,
            time_scale=time_scale,
            seed=seed,
            recorder=recorder,
        )
        self._open = False
        self._time_scale_or_one = time_scale or 1.0
        # The serving path's latency, on this backend's clock: every chunk reaches the client
        # this long after the step that produced its latest token.
        latency = deployment.engine.serving_latency_s
        self._latency = latency / time_scale if time_scale > 0 else 0.0

    async def start(self) -> None:
        self.engine.start()
        self._open = True

    async def close(self) -> None:
        self._open = False
        await self.engine.stop()

    def healthy(self) -> bool:
        return self._open and not self.engine.failed

    def load(self) -> BackendLoad:
        e = self.engine
        usage = e.active_blocks / e.total_blocks if e.total_blocks else 0.0
        return BackendLoad(
            running=len(e.running),
            waiting=len(e.waiting),
            kv_usage=usage,
            waiting_tokens=sum(s.missing for s in e.waiting),
            max_running=e.max_num_seqs,
        )

    def describe(self) -> dict[str, Any]:
        d = self.deployment
        return {"type": "emulated", "device": d.device.name, "count": d.count, "tp": d.tp}

    def capacity_tokens(self) -> int:
        return self.engine.total_blocks * self.engine.block_size

    def estimate_prefill_s(self, prompt_tokens: int) -> float:
        """Steps to get through the queued prompt tokens plus this prompt, each step carrying a
        full prefill chunk beside the running decodes (see :meth:`Engine.pending_prefill`)."""
        e = self.engine
        queued, decodes, decode_context = e.pending_prefill()
        tokens = queued + prompt_tokens
        budget = max(1, e.max_batched_tokens - decodes)
        steps, rest = divmod(tokens, budget)
        t = 0.0
        for chunk, count in ((budget, steps), (rest, 1 if rest else 0)):
            if count:
                shape = StepShape(
                    new_tokens=chunk + decodes,
                    attn_pairs=chunk * (chunk + 1) / 2 + decode_context,
                    kv_read_tokens=decode_context,
                    seqs=1 + decodes,
                    prompt_tokens=chunk,
                    prompts=1,
                )
                t += count * self.deployment.step_time(shape) / self._time_scale_or_one
        return t

    # -- legs ------------------------------------------------------------------------------

    async def prefill(self, params: GenerationParams) -> PrefillResult:
        seq = self._submit(
            params.prompt_tokens,
            1 if params.max_tokens <= 1 else 2,
            hold=params.max_tokens > 1,
            params=params,
        )
        try:
            await seq.wait_beyond(0)
        except BaseException:
            self.engine.abort(seq)
            raise
        if seq.finish_reason == "abort":
            raise BackendUnavailable(f"{self.name}: prefill aborted (instance stopping)")
        matcher = synth.StopMatcher(params.stop)
        token = synth.token_text(params.seed, 0) if self._text else ""
        first, stopped = matcher.feed(token, check=params.min_tokens < 1)
        finish = "stop" if stopped else ("length" if params.max_tokens <= 1 else None)
        if finish == "length":
            first += matcher.flush()
        if finish is not None:
            self.engine.release(seq)
        dep = self.deployment
        stats = _stats(seq)
        kv = KVHandle(
            source=self.name,
            prompt_tokens=params.prompt_tokens,
            kv_bytes=params.prompt_tokens * dep.kv_bytes_per_token,
            descriptors=-(-params.prompt_tokens // self.engine.block_size),
            link=self.link,
            first_token=first,
            release=lambda: self.engine.release(seq),
            pending_text=matcher.flush(),
            first_token_at=seq.first_token_at,
            prefill_compute_s=stats.compute_s,
        )
        return PrefillResult(TokenChunk(first, 1, finish, stats), kv, stats)

    def decode(self, params: GenerationParams, kv: KVHandle) -> AsyncGenerator[TokenChunk, None]:
        # The prefill side's blocks are freed once the transfer has landed (first chunk). If
        # this leg fails before that, they stay held so the caller can retry the transfer on
        # another decode instance; the caller releases the handle in the end either way.
        return self._stream(params, partial(self._submit_decode, params, kv), kv)

    def generate(self, params: GenerationParams) -> AsyncGenerator[TokenChunk, None]:
        submit = partial(self._submit, params.prompt_tokens, params.max_tokens, params=params)
        return self._stream(params, submit)

    # -- helpers ---------------------------------------------------------------------------

    def _submit_decode(self, params: GenerationParams, kv: KVHandle) -> Sequence:
        transfer = 0.0
        if kv.link is not None:
            layers = self.deployment.model.layers
            transfer = exposed_kv_transfer_time(
                kv.link, kv.kv_bytes, kv.descriptors, layers, kv.prefill_compute_s
            )
        return self._submit(
            kv.prompt_tokens,
            params.max_tokens,
            prefilled=True,
            transfer_s=transfer,
            last_token_at=kv.first_token_at,
        )

    def _submit(
        self,
        prompt: int,
        max_new: int,
        *,
        hold: bool = False,
        prefilled: bool = False,
        transfer_s: float = 0.0,
        params: GenerationParams | None = None,
        last_token_at: float | None = None,
    ) -> Sequence:
        if not self._open:
            raise BackendUnavailable(f"{self.name} is not running")
        try:
            return self.engine.submit(
                prompt,
                max_new,
                hold_after_prefill=hold,
                prefilled=prefilled,
                transfer_s=transfer_s,
                block_hashes=params.block_hashes if params is not None else (),
                hash_block_tokens=params.hash_block_tokens if params is not None else 0,
                last_token_at=last_token_at,
            )
        except ValueError as exc:
            raise BackendOverloaded(f"{self.name}: {exc}") from exc

    async def _stream(
        self, params: GenerationParams, submit: Callable[[], Sequence], kv: KVHandle | None = None
    ) -> AsyncGenerator[TokenChunk, None]:
        """Submit a leg when first asked for a chunk, then yield its tokens as they are
        produced, coalesced. A decode leg (``kv``) starts after the first token, with the text
        its prefill held back (it may begin a stop string), and releases the prefill side's KV
        with each chunk. One generator per leg: each chunk's trip up to the client passes
        through as few frames as possible.
        """
        seq = submit()
        start = 0 if kv is None else 1
        held = "" if kv is None else kv.pending_text
        # Without text (and none held back by the prefill) no stop string can match.
        matcher = synth.StopMatcher(params.stop, held) if self._text or held else None
        seen = start
        try:
            while True:
                if self._coalesce and seen > start:
                    await seq.wait_finished()
                else:
                    await seq.wait_beyond(seen)
                if seq.finish_reason == "abort":
                    raise BackendUnavailable(f"{self.name}: request aborted (instance stopping)")
                new = seq.generated - seen
                if new <= 0 and seq.finished:
                    break
                text = synth.text(params.seed, seen, new) if self._text else ""
                seen += new
                stopped = False
                if matcher is not None:
                    text, stopped = matcher.feed(text, check=seen > params.min_tokens)
                if stopped:
                    self.engine.abort(seq)
                    chunk = TokenChunk(text, new, "stop", _stats(seq))
                elif seq.finished:
                    rest = matcher.flush() if matcher is not None else ""
                    chunk = TokenChunk(text + rest, new, "length", _stats(seq))
                else:
                    chunk = TokenChunk(text, new)
                if kv is not None:
                    kv.release()
                if self._latency and (produced := seq.last_token_at) is not None:
                    await self._clock.sleep_until(produced + self._latency)
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            self.engine.abort(seq)


def _stats(seq: Sequence) -> LegStats:
    scheduled = seq.first_scheduled if seq.first_scheduled is not None else seq.arrival
    first = seq.first_token_at if seq.first_token_at is not None else scheduled
    transfer = seq.ready_at - scheduled if seq.ready_at > scheduled else 0.0
    return LegStats(
        queue_s=scheduled - seq.arrival, compute_s=first - scheduled - transfer, transfer_s=transfer
    )
