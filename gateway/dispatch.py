"""One request's life: admit, pick workers, run the legs, hand KV across, stream tokens back.

A :class:`Route` binds a served model to its mode's :class:`Flow`:

* ``disaggregated`` — policy P picks a prefill worker; it prefills and returns the first token
  and a KV handle; the first token goes to the client at once (or, with the model's
  ``first_token: decode``, with the decode worker's first chunk, as SGLang and Dynamo serve
  it); policy D picks a decode worker, which pulls the KV (charged at the link's modelled
  transfer time) and streams the rest.
* ``aggregated`` — one worker does both (the baseline every comparison needs).
* ``conditional`` — per request, prefill remotely (as disaggregated) or locally on the decode
  worker, whichever pays: see :class:`ConditionalFlow`.

Failing fast, the rules every flow follows:

* Each leg runs under its own timeout (seconds, from config) inside the request's deadline.
* A leg that fails before producing anything is retried on another worker of its pool
  (bounded attempts, jittered exponential backoff). A decode retry re-transfers the KV the
  prefill still holds. After the first byte of a leg, a failure ends the request.
* A client's error is not a worker's failure: an upstream that refuses the request (a 4xx)
  answers the client with its own status and envelope, at once, without a retry, and the
  worker's circuit does not hear of it. A busy worker (429, ``overloaded``) is retried
  elsewhere and not held against it either; with every worker busy the client gets 429.
* Busy is not broken: a leg's timeout (``prefill_s``, ``decode_first_token_s``,
  ``decode_idle_s``) fails it only when its worker has produced nothing for *any* leg within
  that time (stalled, stopped, partitioned: a :class:`LegTimeout`, 504 once no other worker
  is left). A leg queued on a worker that is still producing for others keeps waiting, inside
  the request's deadline; admission limits (429 with ``Retry-After``) are the answer to overload.
* Every worker failure feeds the worker's circuit breaker; an open breaker takes the worker
  out of the candidates.
* Closing the stream (client gone, deadline, error) closes the legs, which aborts them on their
  devices and frees their slots and KV; in-flight counts live in guards every exit path passes.

Example::

    async with dispatcher.open(request) as chunks:
        async for chunk in chunks:
            send(chunk.text)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Protocol, TypeVar

from backends.base import BackendLoad, GenerationParams, KVHandle, PrefillResult, TokenChunk
from backends.clock import Clock
from backends.errors import (
    BackendError,
    BackendOverloaded,
    BackendUnavailable,
    LegFailed,
    LegTimeout,
)
from backends.errors import UpstreamRejected as BackendRejected
from gateway.admission import Limiter
from gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    NoHealthyWorker,
    Overloaded,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
)
from gateway.metrics import GatewayMetrics
from gateway.policies import RouteRequest
from gateway.registry import InFlight, Pool, Worker, WorkerRegistry
from gateway.settings import ModelConfig
from gateway.watchdog import IdleTimeout

T = TypeVar("T")
log = logging.getLogger("pdgate.dispatch")


@dataclass(slots=True)
class DispatchRequest:
    params: GenerationParams
    route: Route
    received_at: float
    deadline: float
    ttft_target_s: float | None = None
    on_complete: Callable[[int], None] | None = None  # told the completion tokens, at the end
    pools: list[str] = field(default_factory=list)  # pools whose legs finished, for goodput

    @property
    def routing(self) -> RouteRequest:
        p = self.params
        return RouteRequest(
            p.request_id, p.prompt_tokens, p.max_tokens, p.block_hashes, self.ttft_target_s
        )


class Flow(Protocol):
    """How one mode runs a request's legs."""

    def run(self, req: DispatchRequest) -> AsyncGenerator[TokenChunk, None]: ...


@dataclass(frozen=True)
class FlowDeps:
    registry: WorkerRegistry
    metrics: GatewayMetrics
    clock: Clock


@dataclass
class Route:
    model: str
    mode: str
    flow: Flow
    config: ModelConfig | None = None


class Leg:
    """One leg on one worker: in-flight guard, circuit-breaker verdict, routing metric.

    A worker's failure (:class:`LegFailed`, :class:`BackendUnavailable`) marks a failure; a
    clean exit a success; a cancellation, the client's error (a 4xx) or a busy worker neither
    (the worker did nothing wrong)."""

    __slots__ = ("_guard", "_worker")

    def __init__(self, worker: Worker, tokens: int, deps: FlowDeps) -> None:
        self._worker = worker
        self._guard = InFlight(worker, tokens, deps.registry.store)

    def __enter__(self) -> Worker:
        self._worker.breaker.begin()
        return self._guard.__enter__()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._guard.__exit__(et, e, tb)
        breaker = self._worker.breaker
        if et is None:
            breaker.record(ok=True)
        elif issubclass(et, LegFailed | BackendUnavailable):
            breaker.record(ok=False)
        else:
            breaker.abandon()


class _Legs:
    """What every flow shares: picking with retries, timeouts and metrics."""

    def __init__(self, model: ModelConfig, deps: FlowDeps) -> None:
        self.model = model
        self.deps = deps

    def pick(
        self,
        pool: Pool,
        request: RouteRequest,
        avoid: set[str],
        failure: BackendError | None = None,
    ) -> Worker:
        """A worker for a leg, not one of ``avoid`` while others are available. After a
        timeout (``failure``) never the same one again: once none is left, the request ends
        with that failure rather than a 503."""
        candidates = pool.candidates(avoid)
        if isinstance(failure, LegTimeout):
            candidates = [w for w in candidates if w.id not in avoid]
        if not candidates:
            if failure is not None:
                raise failure
            raise NoHealthyWorker(f"no healthy {pool.role} worker for model '{pool.model}'")
        worker = pool.policy.choose(candidates, request)
        metrics = self.deps.metrics
        if metrics.recording:
            metrics.count_route(pool.model, pool.role, pool.policy_name, worker.name)
        return worker

    async def backoff(self, attempt: int) -> None:
        base = self.model.retries.backoff_s * (2**attempt)
        await self.deps.clock.sleep(base * random.uniform(0.5, 1.5))

    def retrying(self, pool: Pool, attempt: int, attempts: int, exc: BackendError) -> None:
        """Count a retry, or re-raise when the budget is spent."""
        if attempt + 1 >= attempts:
            raise exc
        self.deps.metrics.count_retry(pool.model, pool.role, type(exc).__name__)
        log.warning("%s leg failed, retrying on another worker: %s", pool.role, exc)

    async def prefill(self, pool: Pool, req: DispatchRequest) -> PrefillResult:
        """Prefill on one worker of ``pool``, retried on others while nothing was produced."""
        routing, params = req.routing, req.params
        attempts = self.model.retries.prefill + 1
        tried: set[str] = set()
        failure: BackendError | None = None
        clock = self.deps.clock
        for attempt in range(attempts):
            async with pool.limiter:
                worker = self.pick(pool, routing, tried, failure)
                tried.add(worker.id)
                try:
                    with Leg(worker, params.prompt_tokens, self.deps):
                        result = await _timed(
                            worker.backend.prefill(params),
                            self.model.timeouts.prefill_s,
                            partial(_busy, worker, clock),
                            f"prefill on {worker.name}",
                        )
                        worker.last_progress = clock.now()
                        return result
                except BackendRejected:
                    raise  # the client's error: no other worker would answer differently
                except BackendError as exc:
                    failure = exc
                    self.retrying(pool, attempt, attempts, exc)
                finally:
                    pool.policy.on_request_done(worker.id, routing)
            await self.backoff(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def decode(
        self,
        pool: Pool,
        req: DispatchRequest,
        kv: KVHandle,
        worker: Worker | None = None,
        admitted: bool = False,
    ) -> AsyncGenerator[TokenChunk, None]:
        """Decode on one worker of ``pool`` (``worker`` first, when already chosen); retried
        elsewhere until its first chunk."""
        return self._stream(
            pool,
            req,
            lambda w: w.backend.decode(req.params, kv),
            self.model.retries.decode,
            self.model.timeouts.decode_first_token_s,
            first=worker,
            admitted=admitted,
        )

    def generate(
        self, pool: Pool, req: DispatchRequest, worker: Worker | None = None, observe: str = ""
    ) -> AsyncGenerator[TokenChunk, None]:
        """Prefill and decode on one worker (aggregated, or a conditional local prefill on
        ``worker``); retried elsewhere until its first chunk. ``observe``: the pool name its
        per-phase metrics go under (none if empty)."""
        return self._stream(
            pool,
            req,
            lambda w: w.backend.generate(req.params),
            self.model.retries.prefill,
            self.model.timeouts.prefill_s,
            first=worker,
            observe=observe,
        )

    async def _stream(
        self,
        pool: Pool,
        req: DispatchRequest,
        open_leg: Callable[[Worker], AsyncGenerator[TokenChunk, None]],
        retries: int,
        first_chunk_s: float,
        first: Worker | None = None,
        admitted: bool = False,
        observe: str = "",
    ) -> AsyncGenerator[TokenChunk, None]:
        """A streaming leg: ``first_chunk_s`` to its first chunk, ``decode_idle_s`` between
        chunks; a failure before the first chunk moves it to another worker. ``admitted``: the
        caller already holds the pool's admission slot; ``observe``: see :meth:`generate`."""
        routing, params = req.routing, req.params
        idle_s = self.model.timeouts.decode_idle_s
        timed = first_chunk_s < math.inf or idle_s < math.inf  # else no idle timer at all
        attempts = retries + 1
        tried: set[str] = set()
        failure: BackendError | None = None
        clock = self.deps.clock
        for attempt in range(attempts):
            started = False
            async with contextlib.nullcontext() if admitted else pool.limiter:
                worker = first if first is not None and attempt == 0 else None
                worker = worker or self.pick(pool, routing, tried, failure)
                tried.add(worker.id)
                try:
                    with Leg(worker, params.prompt_tokens + params.max_tokens, self.deps):
                        stream = open_leg(worker)
                        idle = IdleTimeout(partial(_busy, worker, clock)) if timed else None
                        try:
                            limit = first_chunk_s
                            while (
                                chunk := await (
                                    anext(stream, None)
                                    if idle is None
                                    else _next(stream, idle, limit, worker)
                                )
                            ) is not None:
                                started, limit = True, idle_s
                                worker.last_progress = clock.now()
                                if observe and chunk.stats is not None:
                                    _observe_leg(self.deps.metrics, req, observe, chunk)
                                yield chunk
                        finally:
                            if idle is not None:
                                idle.close()
                            await stream.aclose()
                    return
                except BackendRejected:
                    raise  # the client's error: no other worker would answer differently
                except BackendError as exc:
                    if started:
                        raise
                    failure = exc
                    self.retrying(pool, attempt, attempts, exc)
                finally:
                    pool.policy.on_request_done(worker.id, routing)
            await self.backoff(attempt)


def _busy(worker: Worker, clock: Clock, limit_s: float) -> bool:
    return worker.progressing(clock.now(), limit_s)


async def _timed(
    awaitable: Awaitable[T], seconds: float, busy: Callable[[float], bool], what: str
) -> T:
    """Await under a per-leg timeout: each time ``seconds`` pass with no answer, the leg fails
    (:class:`LegTimeout`, retryable) unless its worker is ``busy(seconds)`` — still producing
    for other legs, so this one is queued, not lost. An infinite timeout arms no timer."""
    if seconds == math.inf:
        return await awaitable
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait((task,), timeout=seconds)
            if done:
                return task.result()
            if not busy(seconds):
                raise LegTimeout(f"{what} timed out after {seconds:g} s")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _next(
    stream: AsyncGenerator[TokenChunk, None], idle: IdleTimeout, seconds: float, worker: Worker
) -> TokenChunk | None:
    """The stream's next chunk within ``seconds``, or None at its end.

    The timeout covers only the wait, never a ``yield``: it must not fire while the consumer
    holds the chunk."""
    idle.waiting(seconds)
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None
    except asyncio.CancelledError:
        if idle.expired():
            raise LegTimeout(f"{worker.name} produced nothing for {seconds:g} s") from None
        raise
    finally:
        idle.done()


class AggregatedFlow:
    """One pool prefills and decodes."""

    def __init__(self, model: ModelConfig, deps: FlowDeps) -> None:
        self._pool = deps.registry.pool(model.name, "aggregated")
        self._legs = _Legs(model, deps)

    def run(self, req: DispatchRequest) -> AsyncGenerator[TokenChunk, None]:
        return self._legs.generate(self._pool, req, observe="aggregated")


class DisaggregatedFlow:
    """Prefill pool → KV handoff → decode pool."""

    def __init__(self, model: ModelConfig, deps: FlowDeps) -> None:
        self._prefill = deps.registry.pool(model.name, "prefill")
        self._decode = deps.registry.pool(model.name, "decode")
        self._legs = _Legs(model, deps)
        self._first_token = model.first_token

    def run(self, req: DispatchRequest) -> AsyncGenerator[TokenChunk, None]:
        if not self._decode.candidates():  # fail before spending a prefill
            raise NoHealthyWorker(f"no healthy decode worker for model '{self._decode.model}'")
        return self._remote(req)

    async def _remote(
        self, req: DispatchRequest, decoder: Worker | None = None
    ) -> AsyncGenerator[TokenChunk, None]:
        """Prefill remotely, then decode (on ``decoder`` first, when already chosen).

        The decode pool's admission slot is taken before the prefill: a full decode pool
        refuses (429) or queues the request before any prefill is spent on it."""
        metrics = self._legs.deps.metrics
        async with self._decode.limiter:
            result = await self._legs.prefill(self._prefill, req)
            try:
                _observe_leg(metrics, req, "prefill", result.first)
                held: TokenChunk | None = None
                if self._first_token == "decode" and result.first.finish_reason is None:
                    held = result.first  # goes out with the decode worker's first chunk
                else:
                    yield result.first
                if result.first.finish_reason is not None:
                    return
                decode = self._legs.decode(self._decode, req, result.kv, decoder, admitted=True)
                async with aclosing(decode) as stream:
                    async for chunk in stream:
                        if chunk.stats is not None:
                            _observe_leg(metrics, req, "decode", chunk)
                            metrics.observe_kv_transfer(
                                req.route.model, req.route.mode, result.kv.kv_bytes
                            )
                        if held is not None:
                            yield held
                            held = None
                        yield chunk
            finally:
                result.kv.release()


class ConditionalFlow(DisaggregatedFlow):
    """Disaggregate only when it pays.

    Per request, prefill on the decode worker itself ("local") when:

    * the prompt is short (``conditional.local_max_prompt_tokens``): the KV handoff and the
      second hop cost more than the prefill saves;
    * the chosen decode worker already holds at least ``local_min_prefix_hit`` of the prompt's
      blocks: most of the prefill is a cache hit there;
    * the prefill pool is saturated: its best predicted wait exceeds ``prefill_busy_wait_s``.

    Otherwise prefill remotely, as ``disaggregated``. Each decision is counted with its reason.
    Two guards come first: the decode worker must finish the prefill no later than the best
    prefill worker, and must have room for it — a seat in its batch (``max_num_seqs``) and KV
    under ``local_max_kv_usage``: the decode pool holds every request's KV while it decodes, so
    local prefills that overfill it evict (preempt) decodes, which then recompute, and a local
    request queued behind a full batch waits for its first token, where a remote one has it.

    When the decode pool itself is full (no seat in the chosen decode worker's batch) and a
    prefill worker has room, that prefill worker runs the whole request ("decode_full"), so
    decode-bound load spreads over every GPU as in aggregated serving.
    """

    def __init__(self, model: ModelConfig, deps: FlowDeps) -> None:
        super().__init__(model, deps)
        self._rules = model.conditional
        self._store = deps.registry.store

    async def run(self, req: DispatchRequest) -> AsyncGenerator[TokenChunk, None]:
        legs = self._legs
        hashes = req.params.block_hashes
        # What the decode workers held *before* this request (a prefix-aware pick records it).
        held = self._store.match_prefix(hashes) if hashes else {}
        decoder = legs.pick(self._decode, req.routing, set())
        reason = self._local_reason(req, decoder, held.get(decoder.id, 0))
        runner = self._whole_on_prefill(req, decoder) if reason is None else None
        if runner is not None:
            reason = "decode_full"
        legs.deps.metrics.count_disaggregation(self._decode.model, reason or "remote")
        if runner is not None:
            pool, stream = "prefill", legs.generate(self._prefill, req, runner)
        elif reason is not None:
            pool, stream = "decode", legs.generate(self._decode, req, decoder)
        else:
            pool, stream = "", self._remote(req, decoder)
        if hashes:  # the worker that decodes ends up holding this prompt's KV
            self._store.record_prefix(hashes, (runner or decoder).id)
        async with aclosing(stream) as chunks:
            async for chunk in chunks:
                if chunk.stats is not None and pool:
                    _observe_leg(legs.deps.metrics, req, pool, chunk)
                yield chunk

    def _whole_on_prefill(self, req: DispatchRequest, decoder: Worker) -> Worker | None:
        """A prefill worker to run the whole request when the decode pool is full (the chosen
        decode worker has no seat in its batch) and a prefill worker has room (a seat, and KV
        under ``local_max_kv_usage``, as for a local prefill): decode-bound load then spreads
        over every GPU, as aggregated serving would, instead of queueing for the decode pool.
        None otherwise."""
        if self._has_seat(decoder.backend.load()):
            return None
        tokens = req.params.prompt_tokens + req.params.max_tokens
        candidates = self._prefill.candidates()
        full = {w.id for w in candidates if not self._has_room(w, tokens)}
        if len(full) == len(candidates):
            return None
        return self._legs.pick(self._prefill, req.routing, full)

    def _local_reason(self, req: DispatchRequest, decoder: Worker, held_blocks: int) -> str | None:
        """Why to prefill on the chosen decode worker, which holds ``held_blocks`` of the
        prompt's blocks; None to prefill remotely.

        Every local reason holds only while the decode worker would finish the prefill no later
        than the best prefill worker: otherwise local prefills pile onto the decode pool (while
        the prefill pool idles, or on top of its backlog)."""
        rules, params = self._rules, req.params
        tokens = params.prompt_tokens
        waits = [
            w
            for worker in self._prefill.candidates()
            if (w := worker.estimate_prefill_s(tokens)) is not None
        ]
        if not self._prefill.candidates():
            return "prefill_busy"
        local = decoder.estimate_prefill_s(tokens)
        if local is not None and waits and local > min(waits):
            return None
        if not self._has_room(decoder, tokens + params.max_tokens):
            return None
        if waits and min(waits) > rules.prefill_busy_wait_s:
            return "prefill_busy"
        if tokens <= rules.local_max_prompt_tokens:
            return "short_prompt"
        hashes = params.block_hashes
        if hashes and held_blocks >= rules.local_min_prefix_hit * len(hashes):
            return "prefix_hit"
        return None

    @staticmethod
    def _has_seat(load: BackendLoad) -> bool:
        """Whether a worker with this load would take one more sequence into its batch at once
        (always, when it cannot say)."""
        return load.max_running is None or load.running + load.waiting < load.max_running

    def _has_room(self, worker: Worker, tokens: int) -> bool:
        """Whether the worker has room for ``tokens`` more: a seat in its batch beside the
        sequences running and queued there, and KV under ``local_max_kv_usage`` with the queued
        prompts and these tokens (always, when it cannot say)."""
        load = worker.backend.load()
        if not self._has_seat(load):
            return False
        capacity = worker.backend.capacity_tokens()
        if not capacity:
            return True
        share = load.kv_usage + (load.waiting_tokens + tokens) / capacity
        return share <= self._rules.local_max_kv_usage


def _observe_leg(metrics: GatewayMetrics, req: DispatchRequest, pool: str, c: TokenChunk) -> None:
    s = c.stats
    if s is None or not metrics.recording:
        return
    model, mode = req.route.model, req.route.mode
    metrics.observe_phase(model, mode, pool, "queue", s.queue_s)
    if pool == "decode":
        metrics.observe_phase(model, mode, pool, "kv_transfer", s.transfer_s)
    phase = "prefill" if pool == "prefill" else "compute"
    metrics.observe_phase(model, mode, pool, phase, s.compute_s)
    remote_decode = pool == "decode" and "prefill" in req.pools
    req.pools.append(pool)
    if not remote_decode:  # a remote decode never prefills: no cache to hit
        metrics.count_cached_tokens(model, pool, _cached_tokens(c))


def _cached_tokens(c: TokenChunk) -> int:
    """Prompt tokens a prefix cache served: as the backend measured them (emulated), or as
    the upstream reported them in its usage (HTTP)."""
    reported = c.usage.cached_tokens if c.usage is not None else None
    stats = c.stats.cached_tokens if c.stats is not None else 0
    return stats or reported or 0


def _pool_met(pool: str, pools: list[str], *, ttft_ok: bool, tpot_ok: bool) -> bool:
    """The target a pool answers for: in a two-leg request the prefill pool the TTFT and the
    decode pool the TPOT; a pool that ran both phases (aggregated, conditional on either pool)
    both."""
    if len(set(pools)) > 1:
        return ttft_ok if pool == "prefill" else tpot_ok
    return ttft_ok and tpot_ok


FLOWS: dict[str, Callable[[ModelConfig, FlowDeps], Flow]] = {
    "disaggregated": DisaggregatedFlow,
    "aggregated": AggregatedFlow,
    "conditional": ConditionalFlow,
}


class Dispatcher:
    """Runs requests through their model's flow under one deadline and the global limiter."""

    def __init__(self, deps: FlowDeps, limiter: Limiter | None = None) -> None:
        self._deps = deps
        self.limiter = limiter or Limiter("gateway", max_active=None)

    def open(self, req: DispatchRequest) -> Opened:
        """The request's token stream (``async with dispatcher.open(req) as chunks``), under
        the request's deadline; leaving the block closes every leg."""
        return Opened(self, req)

    async def _observed(self, req: DispatchRequest) -> AsyncGenerator[TokenChunk, None]:
        """The flow's chunks, with metrics, and backend errors translated to gateway errors."""
        metrics, clock = self._deps.metrics, self._deps.clock
        recording = metrics.recording  # (a sink that keeps nothing: nothing to work out)
        model, mode = req.route.model, req.route.mode
        outcome = "cancelled"
        first: float | None = None
        last = 0.0
        completion = 0
        try:
            # The global slot is taken here, inside the accounting: refusals and deadlines
            # while queued are finished requests too.
            async with self.limiter:
                stream = req.route.flow.run(req)
                try:
                    async for chunk in stream:
                        tokens = chunk.tokens
                        if tokens:  # a real upstream's prefill leg may yield no token
                            completion += tokens
                            if recording:
                                now = clock.now()
                                if first is None:
                                    first = now
                                    metrics.observe_ttft(model, mode, now - req.received_at)
                                else:
                                    metrics.observe_itl(model, mode, (now - last) / tokens)
                                last = now
                        yield chunk
                finally:
                    await stream.aclose()
            outcome = "ok"
            if recording:
                metrics.observe_e2e(model, mode, clock.now() - req.received_at)
                self._observe_slo(req, first, last, completion)
        except GatewayError as exc:
            outcome = exc.code or exc.type
            raise
        except BackendError as exc:
            level = logging.INFO if isinstance(exc, BackendRejected) else logging.WARNING
            log.log(level, "request failed: %s", exc)
            error = _translate(exc)
            outcome = error.code or error.type
            raise error from exc
        finally:
            if recording:
                if outcome == "cancelled" and clock.now() >= req.deadline:
                    outcome = DeadlineExceeded.code or "deadline"
                metrics.count_request(model, mode, outcome)
                prompt = req.params.prompt_tokens if first is not None else 0
                metrics.count_tokens(model, prompt, completion)
            if req.on_complete is not None:
                req.on_complete(completion)

    def _observe_slo(
        self, req: DispatchRequest, first: float | None, last: float, completion: int
    ) -> None:
        cfg = req.route.config
        if cfg is None or first is None:
            return
        ttft = first - req.received_at
        tpot = (last - first) / (completion - 1) if completion > 1 else 0.0
        if completion > 1:
            self._deps.metrics.observe_tpot(req.route.model, req.route.mode, tpot)
        ttft_ok = ttft <= (req.ttft_target_s or cfg.slo.ttft_s)
        tpot_ok = tpot <= cfg.slo.tpot_s
        metrics = self._deps.metrics
        metrics.observe_slo(req.route.model, req.route.mode, ttft_ok=ttft_ok, tpot_ok=tpot_ok)
        for pool in dict.fromkeys(req.pools):
            met = _pool_met(pool, req.pools, ttft_ok=ttft_ok, tpot_ok=tpot_ok)
            metrics.observe_pool_slo(req.route.model, req.route.mode, pool, met=met)


class Opened:
    """:meth:`Dispatcher.open`'s context: the deadline around the block, the stream closed on
    the way out, a deadline that fired raised as :class:`DeadlineExceeded` and a refusal
    counted. (A class rather than an ``asynccontextmanager``: one generator fewer on every
    request's path.)"""

    __slots__ = ("_chunks", "_dispatcher", "_req", "_timeout")

    def __init__(self, dispatcher: Dispatcher, req: DispatchRequest) -> None:
        self._dispatcher = dispatcher
        self._req = req
        self._timeout: asyncio.Timeout | None = None
        self._chunks: AsyncGenerator[TokenChunk, None] | None = None

    async def __aenter__(self) -> AsyncGenerator[TokenChunk, None]:
        # An infinite deadline (a simulation without timeouts) arms no timer at all.
        if self._req.deadline < math.inf:
            self._timeout = asyncio.timeout_at(self._req.deadline)
            await self._timeout.__aenter__()
        self._chunks = self._dispatcher._observed(self._req)
        return self._chunks

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            try:
                if self._chunks is not None:
                    await self._chunks.aclose()
            finally:
                if self._timeout is not None:
                    await self._timeout.__aexit__(et, e, tb)  # raises TimeoutError if it fired
        except TimeoutError as exc:
            raise DeadlineExceeded("request deadline exceeded") from exc
        except Overloaded as exc:
            self._refused(exc)
            raise
        if isinstance(e, TimeoutError):
            raise DeadlineExceeded("request deadline exceeded") from e
        if isinstance(e, Overloaded):
            self._refused(e)

    def _refused(self, exc: Overloaded) -> None:
        self._dispatcher._deps.metrics.count_rejection(self._req.route.model, exc.reason)


def _translate(exc: BackendError) -> GatewayError:
    """The client's error for a backend's: the upstream's own 4xx as it was; for the rest a
    status and a message that name no worker (the details are in the log)."""
    if isinstance(exc, BackendRejected):
        return UpstreamRejected(
            exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code
        )
    if isinstance(exc, LegTimeout):
        return UpstreamTimeout("the worker serving the request stopped responding")
    if isinstance(exc, BackendOverloaded):
        return Overloaded(
            "every worker is busy; retry later", retry_after_s=1.0, reason="workers_busy"
        )
    if isinstance(exc, BackendUnavailable):
        return NoHealthyWorker("no worker could take the request")
    return UpstreamFailed("the worker serving the request failed")
