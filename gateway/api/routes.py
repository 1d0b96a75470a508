"""HTTP endpoints: OpenAI's completions APIs, models, health, readiness and metrics.

Request bodies are read and parsed here (size limit, ``orjson``, one pydantic validation),
turned into a :class:`~gateway.dispatch.DispatchRequest`, and answered by the responses in
:mod:`gateway.api.responses`. No routing decisions are made in this layer.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from functools import partial
from typing import Any, NamedTuple, TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from backends.base import ReportedUsage
from backends.wire.relay import Accumulator
from backends.wire.render import DONE, WireFormat
from backends.wire.requests import ContextLengthExceeded, generation_params
from backends.wire.schemas import ChatCompletionRequest, CompletionRequest
from gateway.api.errors import invalid_request
from gateway.api.responses import (
    DeferredJSONResponse,
    EventStreamResponse,
    LastEvents,
    header_list,
)
from gateway.auth import ApiKey
from gateway.dispatch import DispatchRequest
from gateway.errors import (
    InvalidRequest,
    ModelNotFound,
    NoHealthyWorker,
    Overloaded,
    PayloadTooLarge,
)
from gateway.logs import REQUEST_ID
from gateway.metrics import CONTENT_TYPE
from gateway.prefix import chat_block_hashes, prompt_block_hashes
from gateway.service import Gateway, ServedModel

TIMEOUT_HEADER = "x-pdgate-timeout"  # the request's deadline, seconds
TTFT_TARGET_HEADER = "x-pdgate-ttft-target"  # the request's TTFT target, seconds
M = TypeVar("M", bound=BaseModel)


Endpoint = Callable[[Request], Coroutine[Any, Any, Response]]


class _PlainRoute(APIRoute):
    """A route whose endpoint takes the :class:`Request` and returns a :class:`Response`.

    Every endpoint here reads what it needs from the request itself (bodies are parsed and
    validated by hand, below), so FastAPI's request handler — dependency solving, query-string
    parsing, response-model checks — has nothing to do; calling the endpoint directly saves
    about 5 % of the gateway's CPU per completion. Routing, the OpenAPI document and the
    app's exception handlers are FastAPI's as usual."""

    def get_route_handler(self) -> Endpoint:
        endpoint: Endpoint = self.endpoint
        return endpoint


router = APIRouter(route_class=_PlainRoute)


def _gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


# Request-body schemas are declared by hand (bodies are parsed here, not by FastAPI); the
# models they reference go to the document's components, where "#/components/..." resolves.
BODY_COMPONENTS: dict[str, Any] = {}


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    BODY_COMPONENTS.update(schema.pop("$defs", {}))
    BODY_COMPONENTS[model.__name__] = schema
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


@router.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    gw = _gateway(request)
    headers = _header_map(request)
    key = gw.auth.authenticate(headers.get("authorization"))
    data = await _read_json(request, headers, gw.settings.server.max_body_bytes)
    body = _validate(ChatCompletionRequest, data)
    served = _served(gw, body.model)
    messages = data["messages"]
    prompt = _Prompt(served.counter.chat(messages), chat_block_hashes(messages), key)
    return await _generate(headers, gw, served, body, "chat", prompt, data)


@router.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
async def completions(request: Request) -> Response:
    gw = _gateway(request)
    headers = _header_map(request)
    key = gw.auth.authenticate(headers.get("authorization"))
    data = await _read_json(request, headers, gw.settings.server.max_body_bytes)
    body = _validate(CompletionRequest, data)
    served = _served(gw, body.model)
    text = body.single_prompt()
    prompt = _Prompt(served.counter.prompt(text), prompt_block_hashes(text), key)
    return await _generate(headers, gw, served, body, "completions", prompt, data)


# POSTs the app answers without FastAPI's routing (see gateway.app.GatewayApp).
HOT_ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": chat_completions,
    "/v1/completions": completions,
}


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    gw = _gateway(request)
    data = [
        {"id": m.name, "object": "model", "created": gw.started, "owned_by": "pdgate"}
        for m in gw.settings.models
    ]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


@router.get("/health")
async def health(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/ready")
async def ready(request: Request) -> Response:
    missing = _gateway(request).unready_pools()
    if missing:
        raise NoHealthyWorker("no healthy worker in " + ", ".join(missing))
    return Response(b'{"status":"ready"}', media_type="application/json")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics; with API keys on, only for a valid key unless
    ``server.public_metrics`` opens them."""
    gw = _gateway(request)
    if not gw.settings.metrics_public:
        gw.auth.authenticate(request.headers.get("authorization"))
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE)


# -- request handling ------------------------------------------------------------------------


def _header_map(request: Request) -> dict[str, str]:
    """The request's headers as a plain dict, the first of repeated ones winning (as with
    Starlette's ``Headers.get``, which raises and catches a KeyError for each absent header
    asked for: most of the ones read here usually are)."""
    raw: list[tuple[bytes, bytes]] = request.scope["headers"]
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(raw)}


async def _read_json(request: Request, headers: dict[str, str], limit: int) -> dict[str, Any]:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {limit}-byte limit")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def _validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(exc) from exc


def _served(gw: Gateway, model: str) -> ServedModel:
    served = gw.models.get(model)
    if served is None:
        raise ModelNotFound(f"The model '{model}' does not exist", param="model")
    return served


class _Prompt(NamedTuple):
    tokens: int
    block_hashes: tuple[int, ...]
    key: ApiKey | None  # the caller's API key (None: auth is off)


async def _generate(
    headers_in: dict[str, str],
    gw: Gateway,
    served: ServedModel,
    body: ChatCompletionRequest | CompletionRequest,
    api: str,
    prompt: _Prompt,
    raw: dict[str, Any],
) -> Response:
    received = gw.clock.now()
    prompt_tokens = prompt.tokens
    request_id = headers_in.get("x-request-id") or secrets.token_hex(12)
    REQUEST_ID.set(request_id)  # logs while this request is served carry its id
    try:
        params = generation_params(
            body,
            _without_handshake(raw),
            prompt_tokens=prompt_tokens,
            request_id=request_id,
            model=served.config.profile_name,
            default_max_tokens=served.config.default_max_tokens,
            max_context=served.max_context,
            seed=partial(secrets.randbits, 63),
            block_hashes=prompt.block_hashes,
        )
    except ContextLengthExceeded as exc:
        raise InvalidRequest(str(exc), param="messages" if api == "chat" else "prompt") from exc
    try:
        await gw.auth.admit(prompt.key, prompt_tokens, params.max_tokens)
    except Overloaded as exc:
        gw.metrics.count_rejection(body.model, exc.reason)
        raise
    dreq = DispatchRequest(
        params,
        served.route,
        received,
        received + _seconds(headers_in, TIMEOUT_HEADER, gw.settings.server.request_timeout_s),
        _seconds(headers_in, TTFT_TARGET_HEADER, served.config.slo.ttft_s),
        None if prompt.key is None else partial(gw.auth.charge_later, prompt.key),
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    fmt = WireFormat(api, request_id, body.model, int(time.time()), include_usage)
    headers = header_list(x_request_id=request_id)
    if body.stream:
        return EventStreamResponse(_sse(gw, dreq, fmt), headers)
    return DeferredJSONResponse(_complete(gw, dreq, fmt), headers)


# The P/D handshake belongs to the gateway (design.md §4): a client's copy of these fields would
# reach the prefill server, which acts on them (vLLM's kv_transfer_params name a host to pull
# KV from: a server-side request forgery).
HANDSHAKE_FIELDS = ("kv_transfer_params", "bootstrap_host", "bootstrap_port", "bootstrap_room")


def _without_handshake(raw: dict[str, Any]) -> dict[str, Any]:
    for name in HANDSHAKE_FIELDS:
        raw.pop(name, None)
    return raw


def _seconds(headers: dict[str, str], name: str, default: float) -> float:
    value = headers.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 86400:
        raise InvalidRequest(f"{name} must be seconds in (0, 86400]", param=name)
    return seconds


async def _sse(gw: Gateway, dreq: DispatchRequest, fmt: WireFormat) -> AsyncGenerator[bytes, None]:
    """The stream's events; the last chunk's go out as :class:`LastEvents`, ending the response
    before the request's remaining work (see :mod:`gateway.api.responses`)."""
    completion = 0
    reported: ReportedUsage | None = None
    ended = False
    async with gw.dispatcher.open(dreq) as chunks:
        opening = fmt.opening()
        async for chunk in chunks:
            if ended:
                continue  # nothing follows a last chunk
            completion += chunk.tokens
            reported = chunk.usage or reported
            if chunk.choices:  # more than text: each upstream event relayed as it was
                out = b"".join(fmt.relayed(choice) for choice in chunk.choices)
            else:
                out = fmt.text(chunk.text) if chunk.text else b""
            if opening and (out or chunk.finish_reason is not None):
                # The role goes out with the first content, not with a real upstream's empty
                # prefill chunk: until then the status is not committed, so an error of the
                # decode leg (the upstream refusing the request) is still a plain HTTP error.
                out, opening = opening + out, b""
            if chunk.finish_reason is not None:
                ended = True
                yield LastEvents(out + _tail(dreq, fmt, chunk.finish_reason, completion, reported))
            elif out:
                yield out
    if not ended:
        yield LastEvents(opening + _tail(dreq, fmt, "length", completion, reported))


def _tail(
    dreq: DispatchRequest,
    fmt: WireFormat,
    finish: str,
    completion: int,
    reported: ReportedUsage | None,
) -> bytes:
    tail = fmt.finish(finish)
    if fmt.include_usage:
        prompt, cached = _prompt_usage(dreq, reported)
        tail += fmt.usage(prompt, completion, cached, reported.details if reported else None)
    return tail + DONE


async def _complete(
    gw: Gateway, dreq: DispatchRequest, fmt: WireFormat
) -> AsyncGenerator[bytes, None]:
    """The response body, once (see :class:`DeferredJSONResponse`)."""
    parts: list[str] = []
    completion = 0
    reported: ReportedUsage | None = None
    relayed: Accumulator | None = None  # what upstream events carried beyond text
    ended = False
    async with gw.dispatcher.open(dreq) as chunks:
        async for chunk in chunks:
            if ended:
                continue  # nothing follows a last chunk
            parts.append(chunk.text)
            completion += chunk.tokens
            reported = chunk.usage or reported
            if chunk.choices:
                relayed = relayed or Accumulator()
                relayed.add(chunk.choices)
            if chunk.finish_reason is not None:
                ended = True
                yield _body(dreq, fmt, parts, chunk.finish_reason, completion, reported, relayed)
    if not ended:
        yield _body(dreq, fmt, parts, "length", completion, reported, relayed)


def _body(
    dreq: DispatchRequest,
    fmt: WireFormat,
    parts: list[str],
    finish: str,
    completion: int,
    reported: ReportedUsage | None,
    relayed: Accumulator | None = None,
) -> bytes:
    prompt, cached = _prompt_usage(dreq, reported)
    details = reported.details if reported is not None else None
    text = "".join(parts)
    return fmt.body(text, finish, prompt, completion, cached, relayed=relayed, details=details)


def _prompt_usage(dreq: DispatchRequest, reported: ReportedUsage | None) -> tuple[int, int | None]:
    """Prompt tokens (and cached ones) as the upstream counted them, else as charged here."""
    if reported is None:
        return dreq.params.prompt_tokens, None
    return reported.prompt_tokens, reported.cached_tokens


__all__ = ["router"]
