"""The backend server's HTTP surface: OpenAI, the P/D side channels, and what routers probe.

``create_backend_app(config)`` is a Starlette app; the instance starts in its lifespan. Request
bodies are validated with the gateway's OpenAI models (``backends.wire.schemas``; unknown
fields are kept, since routers add their own), responses use the shared wire format.

A response commits to its status only once the first token exists, so anything that fails
before it (bad handshake, rendezvous timeout, injected failure) is an ordinary HTTP error in
OpenAI's envelope; a stream that fails after it ends with one SSE error event. A client that
disconnects cancels its leg, which aborts the sequence on the engine.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from functools import partial
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from backends.base import GenerationParams, TokenChunk
from backends.emulator.catalog import Catalog
from backends.errors import BackendError, BackendOverloaded, BackendUnavailable
from backends.server.config import InstanceConfig
from backends.server.instance import Instance, Leg, ServerError
from backends.server.metrics import CONTENT_TYPE
from backends.wire.render import DONE, WireFormat, error_envelope
from backends.wire.requests import ContextLengthExceeded, generation_params
from backends.wire.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("pdgate.backend")

JSON = "application/json"
MAX_BODY = 16 * 1024 * 1024


def create_backend_app(config: InstanceConfig, catalog: Catalog | None = None) -> Starlette:
    """The server of one emulated instance (see the package docstring)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        instance = Instance(config, catalog)
        await instance.start()
        app.state.instance = instance
        try:
            yield
        finally:
            await instance.close()

    routes = [
        Route("/v1/chat/completions", _chat, methods=["POST"]),
        Route("/v1/completions", _completions, methods=["POST"]),
        Route("/v1/chat/completions/render", _render_chat, methods=["POST"]),
        Route("/v1/completions/render", _render_completions, methods=["POST"]),
        Route("/v1/models", _models, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
        Route("/admin/faults", _control(_faults), methods=["GET", "POST"]),
        Route("/pdgate/kv/pull", _control(_kv_pull), methods=["POST"]),
        Route("/pdgate/kv/release", _control(_kv_release), methods=["POST"]),
        Route("/get_server_info", _server_info, methods=["GET"]),
        Route("/server_info", _server_info, methods=["GET"]),
        Route("/get_model_info", _model_info, methods=["GET"]),
        Route("/model_info", _model_info, methods=["GET"]),
        Route("/get_load", _load, methods=["GET"]),
        Route("/get_loads", _loads, methods=["GET"]),
        Route("/version", _version, methods=["GET"]),
        Route("/flush_cache", _control(_ok), methods=["GET", "POST"]),
        Route("/reset_prefix_cache", _control(_ok), methods=["POST"]),
    ]
    for path in ("/health", "/health_generate", "/liveness", "/readiness", "/ping"):
        routes.append(Route(path, _health, methods=["GET", "POST"]))
    return Starlette(routes=routes, lifespan=lifespan)


Handler = Callable[[Request], Awaitable[Response]]


def _control(handler: Handler) -> Handler:
    """A control-plane route: the shared token, or 403 (see ``InstanceConfig``)."""

    async def guarded(request: Request) -> Response:
        if not _instance(request).control_allowed(request.headers.get("authorization")):
            return _error(
                ServerError(
                    403,
                    "the control plane needs the shared token (Authorization: Bearer ...)",
                    "permission_error",
                    "control_token_required",
                )
            )
        return await handler(request)

    return guarded


def _instance(request: Request) -> Instance:
    inst: Instance = request.app.state.instance
    return inst


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=JSON)


def _error(exc: ServerError) -> Response:
    body = error_envelope(exc.message, exc.type, None, exc.code)
    return Response(body, status_code=exc.status, media_type=JSON)


# -- OpenAI ----------------------------------------------------------------------------------


async def _chat(request: Request) -> Response:
    return await _generate(request, "chat")


async def _completions(request: Request) -> Response:
    return await _generate(request, "completions")


async def _generate(request: Request, api: str) -> Response:
    inst = _instance(request)
    arrival = inst.clock.now()
    try:
        data = await _read_json(request)
        params = _params(inst, request, api, data)
        if inst.faults.fail_rate and inst.rng.random() < inst.faults.fail_rate:
            raise ServerError(500, "injected failure (--fail-rate)", code="injected_failure")
        leg = inst.open_leg(params, data)
    except ServerError as exc:
        return _error(exc)
    log.debug("request %s: %s leg", params.request_id, leg.kind)
    options = data.get("stream_options") or {}
    include_usage = bool(options.get("include_usage"))
    continuous = bool(options.get("continuous_usage_stats"))
    fmt = WireFormat(api, params.request_id, str(data["model"]), int(time.time()), include_usage)
    run = _Run(inst, params, leg, arrival)
    headers = [(b"x-request-id", params.request_id.encode("latin-1", "replace"))]
    if data.get("stream"):
        return LegResponse(run.sse(fmt, continuous), b"text/event-stream", headers)
    return LegResponse(run.whole(fmt), JSON.encode(), headers)


async def _read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ServerError(413, "request body too large", "invalid_request_error")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ServerError(
            400, f"request body is not valid JSON: {exc}", "invalid_request_error"
        ) from exc
    if not isinstance(data, dict):
        raise ServerError(400, "request body must be a JSON object", "invalid_request_error")
    return data


def _validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        msg = first.get("msg", "invalid request")
        raise ServerError(
            400, f"{where}: {msg}" if where else msg, "invalid_request_error"
        ) from exc


def _params(inst: Instance, request: Request, api: str, data: dict[str, Any]) -> GenerationParams:
    body: ChatCompletionRequest | CompletionRequest
    if api == "chat":
        body = _validate(ChatCompletionRequest, data)
        prompt = inst.counter.chat(data["messages"])
    else:
        completion: CompletionRequest = _validate(CompletionRequest, data)
        prompt = inst.counter.prompt(completion.single_prompt())
        body = completion
    c = inst.config
    if body.model not in (c.name, c.model):
        raise ServerError(
            404, f"The model `{body.model}` does not exist.", "NotFoundError", "model_not_found"
        )
    request_id = request.headers.get("x-request-id") or secrets.token_hex(12)
    try:
        return generation_params(
            body,
            data,
            prompt_tokens=prompt,
            request_id=request_id,
            model=c.model,
            default_max_tokens=c.default_max_tokens,
            max_context=inst.max_context,
            seed=partial(inst.rng.getrandbits, 63),
        )
    except ContextLengthExceeded as exc:
        raise ServerError(
            400,
            f"This model's maximum context length is {exc.limit} tokens. However, you "
            f"requested {exc.prompt_tokens + exc.max_tokens} tokens ({exc.prompt_tokens} in the "
            f"messages, {exc.max_tokens} in the completion).",
            "BadRequestError",
        ) from exc


class _Run:
    """One request's chunks turned into response bytes, with faults and vLLM metrics."""

    def __init__(self, inst: Instance, params: GenerationParams, leg: Leg, arrival: float):
        self.inst = inst
        self.params = params
        self.leg = leg
        self.arrival = arrival
        self.completion = 0
        self.finish = "length"

    async def chunks(self) -> AsyncGenerator[TokenChunk, None]:
        inst, faults = self.inst, self.inst.faults
        m = inst.metrics
        last: float | None = None
        ok = False
        try:
            async with aclosing(self.leg.chunks) as chunks:
                async for chunk in chunks:
                    limit = _fault_limit(faults.hang_after_tokens, faults.fail_after_tokens)
                    if limit is not None and self.completion + chunk.tokens > limit:
                        chunk = _first_tokens(chunk, limit - self.completion)
                        if not chunk.tokens:
                            await self._fault()
                    now = inst.clock.now()
                    if last is None:
                        m.ttft.observe(now - self.arrival)
                    elif chunk.tokens:
                        gap = (now - last) / chunk.tokens
                        for _ in range(chunk.tokens):
                            m.itl.observe(gap)
                    last = now
                    self.completion += chunk.tokens
                    self.finish = chunk.finish_reason or self.finish
                    yield chunk
                    if limit is not None and self.completion >= limit and not chunk.finish_reason:
                        await self._fault()
            ok = True
        except BackendError as exc:
            raise _translate(exc) from exc
        finally:
            m.prompt_tokens.inc(self.params.prompt_tokens)
            m.generation_tokens.inc(self.completion)
            if ok:
                m.e2e.observe(inst.clock.now() - self.arrival)
                m.finished(self.finish)
            else:
                m.finished("abort")

    async def _fault(self) -> None:
        faults = self.inst.faults
        hang = faults.hang_after_tokens
        if hang is not None and self.completion >= hang:
            await asyncio.Event().wait()  # until the client leaves
        raise ServerError(
            500, f"injected failure after {self.completion} tokens", code="injected_failure"
        )

    async def sse(self, fmt: WireFormat, continuous: bool) -> AsyncGenerator[bytes, None]:
        opening = fmt.opening()
        prompt = self.params.prompt_tokens
        async with aclosing(self.chunks()) as chunks:
            async for chunk in chunks:
                out = b""
                if chunk.text:
                    out = (
                        fmt.text_with_usage(chunk.text, prompt, self.completion)
                        if continuous
                        else fmt.text(chunk.text)
                    )
                if opening:
                    out, opening = opening + out, b""
                if out:
                    yield out
        tail = fmt.finish(self.finish)
        if fmt.include_usage:
            tail += fmt.usage(prompt, self.completion)
        yield tail + DONE

    async def whole(self, fmt: WireFormat) -> AsyncGenerator[bytes, None]:
        parts: list[str] = []
        async with aclosing(self.chunks()) as chunks:
            async for chunk in chunks:
                parts.append(chunk.text)
        text = "".join(parts)
        prompt = self.params.prompt_tokens
        yield fmt.body(text, self.finish, prompt, self.completion, extra=self.leg.extra)


def _fault_limit(hang: int | None, fail: int | None) -> int | None:
    limits = [n for n in (hang, fail) if n is not None]
    return min(limits) if limits else None


def _first_tokens(chunk: TokenChunk, n: int) -> TokenChunk:
    """The first ``n`` tokens of a coalesced chunk (synthetic text: one word per token)."""
    words = re.findall(r"\s*\S+", chunk.text)
    return TokenChunk("".join(words[: max(n, 0)]), max(n, 0))


def _translate(exc: BackendError) -> ServerError:
    if isinstance(exc, BackendOverloaded):
        return ServerError(503, str(exc), "ServiceUnavailableError", "overloaded")
    if isinstance(exc, BackendUnavailable):
        return ServerError(503, str(exc), "ServiceUnavailableError", "unavailable")
    return ServerError(500, str(exc))


class LegResponse(Response):
    """Sends a leg's bytes; the status waits for the first piece; a disconnect cancels it."""

    def __init__(
        self, events: AsyncGenerator[bytes, None], content_type: bytes, headers: list[Any]
    ) -> None:
        super().__init__()
        self._events = events
        self._type = content_type
        self._extra = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        disconnected = False

        async def watch() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            if task is not None:
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            async with aclosing(self._events) as events:
                await self._send(events, send)
        except asyncio.CancelledError:
            if not disconnected or task is None:
                raise
            task.uncancel()
        finally:
            watcher.cancel()

    async def _send(self, events: AsyncGenerator[bytes, None], send: Send) -> None:
        try:
            first = await anext(events)
        except ServerError as exc:
            await self._start(send, exc.status, JSON.encode())
            body = error_envelope(exc.message, exc.type, None, exc.code)
            await send({"type": "http.response.body", "body": body})
            return
        await self._start(send, 200, self._type)
        await send({"type": "http.response.body", "body": first, "more_body": True})
        try:
            async for piece in events:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        except ServerError as exc:
            event = b"data: " + error_envelope(exc.message, exc.type, None, exc.code) + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _start(self, send: Send, status: int, content_type: bytes) -> None:
        headers = [(b"content-type", content_type), *self._extra]
        if content_type == b"text/event-stream":
            headers.append((b"cache-control", b"no-cache"))
        await send({"type": "http.response.start", "status": status, "headers": headers})


# -- what vLLM's and SGLang's routers probe ---------------------------------------------------


async def _render(request: Request, api: str) -> Response:
    """vLLM's ``/render``: the prompt as token ids (synthetic ids, the right count)."""
    inst = _instance(request)
    try:
        data = await _read_json(request)
        params = _params(inst, request, api, data)
    except ServerError as exc:
        return _error(exc)
    ids = [(params.seed + i) % 32000 for i in range(params.prompt_tokens)]
    return _json({"token_ids": ids, "prompt_token_ids": ids, "model": data.get("model")})


async def _render_chat(request: Request) -> Response:
    return await _render(request, "chat")


async def _render_completions(request: Request) -> Response:
    return await _render(request, "completions")


async def _models(request: Request) -> Response:
    inst = _instance(request)
    c = inst.config
    model = {
        "id": c.name,
        "object": "model",
        "created": 0,
        "owned_by": "pdgate",
        "root": c.model,
        "parent": None,
        "max_model_len": inst.max_context,
    }
    return _json({"object": "list", "data": [model]})


async def _health(request: Request) -> Response:
    if not _instance(request).backend.healthy():
        return _json({"status": "unhealthy"}, 503)
    return Response(b"", status_code=200)


async def _metrics(request: Request) -> Response:
    return Response(_instance(request).metrics.render(), media_type=CONTENT_TYPE)


async def _server_info(request: Request) -> Response:
    return _json(_instance(request).server_info())


async def _model_info(request: Request) -> Response:
    return _json(_instance(request).model_info())


async def _load(request: Request) -> Response:
    return _json(_instance(request).load_info())


async def _loads(request: Request) -> Response:
    return _json([_instance(request).load_info()])


async def _version(request: Request) -> Response:
    return _json({"version": "pdgate-backend"})


async def _ok(request: Request) -> Response:
    return _json({"status": "ok"})


async def _faults(request: Request) -> Response:
    """``GET`` the injected faults; ``POST {"fail_rate": 0.1, ...}`` changes them. Off (403)
    unless the instance was started with ``--enable-faults`` or a fault flag."""
    inst = _instance(request)
    if not inst.config.enable_faults:
        return _error(
            ServerError(
                403,
                "fault injection is off: start pdgate backend with --enable-faults",
                "permission_error",
                "faults_disabled",
            )
        )
    if request.method == "POST":
        try:
            data = await _read_json(request)
            inst.faults.update(data)
        except ServerError as exc:
            return _error(exc)
        except (ValueError, TypeError) as exc:
            return _error(ServerError(400, str(exc), "invalid_request_error"))
        inst.apply_faults()
        log.warning("faults changed: %s", inst.faults.as_dict())
    return _json(inst.faults.as_dict())


# -- NIXL side channel ------------------------------------------------------------------------


async def _kv_side(request: Request, act: Callable[[Instance, str], Response]) -> Response:
    try:
        data = await _read_json(request)
    except ServerError as exc:
        return _error(exc)
    rid = data.get("remote_request_id")
    if not isinstance(rid, str):
        return _error(ServerError(400, "remote_request_id is required", "invalid_request_error"))
    return act(_instance(request), rid)


async def _kv_pull(request: Request) -> Response:
    def pull(inst: Instance, rid: str) -> Response:
        meta = inst.held.pull(rid)
        if meta is None:
            return _json({"error": f"no KV held for {rid}"}, 404)
        return _json(meta.as_dict())

    return await _kv_side(request, pull)


async def _kv_release(request: Request) -> Response:
    def release(inst: Instance, rid: str) -> Response:
        found = inst.held.release(rid)
        return _json({"released": found}, 200 if found else 404)

    return await _kv_side(request, release)
