"""One request's life: pick workers, run the legs, hand KV across, stream tokens back.

A :class:`Route` binds a served model to its mode's :class:`Flow`:

* ``disaggregated`` — policy P picks a prefill worker; it prefills and returns the first token
  and a KV handle; the first token goes to the client at once; policy D picks a decode worker,
  which pulls the KV (charged at the link's modelled transfer time) and streams the rest.
* ``aggregated`` — one worker does both (the baseline every comparison needs).

The dispatcher owns the request's single deadline and translates backend errors into gateway
errors. Closing the stream (client gone, deadline, error) closes the legs, which aborts them on
their devices and frees their slots and KV; in-flight counts are held by
:meth:`WorkerRegistry.in_flight` guards, so no exit path leaks them.

Example::

    async with dispatcher.open(request) as chunks:
        async for chunk in chunks:
            send(chunk.text)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from backends.base import GenerationParams, TokenChunk
from backends.clock import Clock
from backends.errors import BackendError, BackendOverloaded, BackendUnavailable
from gateway.errors import DeadlineExceeded, GatewayError, NoHealthyWorker, UpstreamFailed
from gateway.metrics import GatewayMetrics
from gateway.policies import RouteRequest
from gateway.registry import Pool, Worker, WorkerRegistry


@dataclass(slots=True)
class DispatchRequest:
    params: GenerationParams
    route: Route
    received_at: float
    deadline: float

    @property
    def routing(self) -> RouteRequest:
        p = self.params
        return RouteRequest(p.request_id, p.prompt_tokens, p.max_tokens)


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


def pick(pool: Pool, request: RouteRequest) -> Worker:
    candidates = pool.candidates()
    if not candidates:
        raise NoHealthyWorker(f"no healthy {pool.role} worker for model '{pool.model}'")
    return pool.policy.choose(candidates, request)


class AggregatedFlow:
    """One pool prefills and decodes."""

    def __init__(self, model: str, deps: FlowDeps) -> None:
        self._pool = deps.registry.pool(model, "aggregated")
        self._deps = deps

    async def run(self, req: DispatchRequest) -> AsyncGenerator[TokenChunk, None]:
        routing = req.routing
        worker = pick(self._pool, routing)
        tokens = req.params.prompt_tokens + req.params.max_tokens
        try:
            with self._deps.registry.in_flight(worker, tokens):
                async with aclosing(worker.backend.generate(req.params)) as stream:
                    async for chunk in stream:
                        if chunk.stats is not None:
                            _observe_leg(self._deps.metrics, req, "aggregated", chunk)
                        yield chunk
        finally:
            self._pool.policy.on_request_done(worker.id, routing)


class DisaggregatedFlow:
    """Prefill pool → KV handoff → decode pool."""

    def __init__(self, model: str, deps: FlowDeps) -> None:
        self._prefill = deps.registry.pool(model, "prefill")
        self._decode = deps.registry.pool(model, "decode")
        self._deps = deps

    async def run(self, req: DispatchRequest) -> AsyncGenerator[TokenChunk, None]:
        registry, metrics = self._deps.registry, self._deps.metrics
        routing = req.routing
        params = req.params
        if not self._decode.candidates():  # fail before spending a prefill
            raise NoHealthyWorker(f"no healthy decode worker for model '{self._decode.model}'")
        prefiller = pick(self._prefill, routing)
        try:
            with registry.in_flight(prefiller, params.prompt_tokens):
                result = await prefiller.backend.prefill(params)
        finally:
            self._prefill.policy.on_request_done(prefiller.id, routing)
        try:
            _observe_leg(metrics, req, "prefill", result.first)
            yield result.first
            if result.first.finish_reason is not None:
                return
            decoder = pick(self._decode, routing)
            try:
                with registry.in_flight(decoder, params.prompt_tokens + params.max_tokens):
                    stream = decoder.backend.decode(params, result.kv)
                    async with aclosing(stream):
                        async for chunk in stream:
                            if chunk.stats is not None:
                                _observe_leg(metrics, req, "decode", chunk)
                            yield chunk
            finally:
                self._decode.policy.on_request_done(decoder.id, routing)
        finally:
            result.kv.release()


def _observe_leg(metrics: GatewayMetrics, req: DispatchRequest, pool: str, c: TokenChunk) -> None:
    s = c.stats
    if s is None:
        return
    model, mode = req.route.model, req.route.mode
    metrics.observe_phase(model, mode, pool, "queue", s.queue_s)
    if pool == "decode":
        metrics.observe_phase(model, mode, pool, "kv_transfer", s.transfer_s)
    metrics.observe_phase(
        model, mode, pool, "prefill" if pool == "prefill" else "compute", s.compute_s
    )


FLOWS: dict[str, Callable[[str, FlowDeps], Flow]] = {
    "disaggregated": DisaggregatedFlow,
    "aggregated": AggregatedFlow,
}


class Dispatcher:
    """Runs requests through their model's flow under one deadline, with metrics."""

    def __init__(self, deps: FlowDeps) -> None:
        self._deps = deps

    @asynccontextmanager
    async def open(self, req: DispatchRequest) -> AsyncIterator[AsyncGenerator[TokenChunk, None]]:
        """The request's token stream; leaving the block closes every leg."""
        try:
            async with asyncio.timeout_at(req.deadline), aclosing(self._observed(req)) as chunks:
                yield chunks
        except TimeoutError as exc:
            raise DeadlineExceeded("request deadline exceeded") from exc

    async def _observed(self, req: DispatchRequest) -> AsyncGenerator[TokenChunk, None]:
        """The flow's chunks, with metrics, and backend errors translated to gateway errors."""
        metrics, clock = self._deps.metrics, self._deps.clock
        model, mode = req.route.model, req.route.mode
        outcome = "cancelled"
        last: float | None = None
        completion = 0
        try:
            async for chunk in req.route.flow.run(req):
                now = clock.now()
                if last is None:
                    metrics.observe_ttft(model, mode, now - req.received_at)
                elif chunk.tokens:
                    metrics.observe_itl(model, mode, (now - last) / chunk.tokens)
                last = now
                completion += chunk.tokens
                yield chunk
            outcome = "ok"
            metrics.observe_e2e(model, mode, clock.now() - req.received_at)
        except GatewayError as exc:
            outcome = exc.code or exc.type
            raise
        except BackendError as exc:
            error = _translate(exc)
            outcome = error.code or error.type
            raise error from exc
        finally:
            if outcome == "cancelled" and clock.now() >= req.deadline:
                outcome = DeadlineExceeded.code or "deadline"
            metrics.count_request(model, mode, outcome)
            prompt = req.params.prompt_tokens if last is not None else 0
            metrics.count_tokens(model, prompt, completion)


def _translate(exc: BackendError) -> GatewayError:
    if isinstance(exc, BackendUnavailable | BackendOverloaded):
        return NoHealthyWorker(str(exc))
    return UpstreamFailed(str(exc))
