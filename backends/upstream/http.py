"""Real upstreams as :class:`~backends.base.Backend`: vLLM (NIXL), SGLang (bootstrap), OpenAI.

One :class:`HttpBackend` is one upstream server. Its ``protocol`` says how a disaggregated
request's two legs talk to it (see docs/architecture.md, "P/D protocols"):

* ``vllm-nixl`` — sequential. The prefill leg is the request with ``max_tokens=1``,
  ``stream=false`` and ``kv_transfer_params={"do_remote_decode": true}``; the
  ``kv_transfer_params`` it answers go into the decode leg, which streams every output token.
* ``sglang-bootstrap`` — concurrent. ``bootstrap_host``/``bootstrap_port`` (the prefill
  server's) and a random 63-bit ``bootstrap_room`` go into one body, sent to the prefill and
  the decode server at once; the decode server streams. If the prefill leg fails, the decode
  leg is cancelled at once rather than left waiting for KV that will never come.
* ``openai`` — any OpenAI-compatible server, aggregated only.

With real engines the decode server produces every token, the first included, so the prefill
leg yields an empty first chunk (no tokens) and all text comes from the decode leg. Both legs
carry the same ``X-Request-Id``. Usage is merged: prompt (and cached) tokens as the prefill
server counted them, completion tokens as the decode server produced them (per chunk, from
vLLM's ``continuous_usage_stats``, reconciled with the final ``usage``).

The client is :mod:`backends.upstream.httpclient`: keep-alive pools over asyncio protocols and
httptools, with TCP_NODELAY (asyncio and uvloop set it on every TCP transport). It costs less
than half the CPU of aiohttp per request, and httpx's default transport collapses under
concurrency (encode/httpx#3215); figures in docs/performance.md. Its errors never leave this module:
they become :mod:`backends.errors`.

Example::

    up = HttpBackend("prefill-0", "http://10.0.0.5:8000", "vllm-nixl")
    await up.start()
    result = await up.prefill(params)
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

from backends.base import (
    BackendLoad,
    GenerationParams,
    KVHandle,
    LegStats,
    PrefillResult,
    ReportedUsage,
    TokenChunk,
    nothing_to_release,
)
from backends.errors import (
    BackendError,
    BackendOverloaded,
    BackendUnavailable,
    LegFailed,
    UpstreamRejected,
)
from backends.upstream.httpclient import ConnectError, HttpPool, Response, UpstreamError
from backends.wire.parse import (
    StreamParser,
    body_usage,
    message,
    relayed_choice,
    snippet,
    upstream_body,
)

Protocol = Literal["vllm-nixl", "sglang-bootstrap", "openai"]
PROTOCOLS: tuple[Protocol, ...] = ("vllm-nixl", "sglang-bootstrap", "openai")
DRAIN_S = 1.0  # longest wait for a stream's body to end after [DONE]


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """Connection pool and per-leg timeouts of one upstream."""

    max_connections: int = 512
    connect_timeout_s: float = 5.0
    prefill_timeout_s: float = 300.0  # a whole prefill leg, queueing included
    read_timeout_s: float = 120.0  # longest silence within a streamed leg
    served_model_name: str | None = (
        None  # the upstream's name for the model (default: the client's)
    )
    # Ask streams for usage on every event (vLLM's and SGLang's continuous_usage_stats): exact
    # tokens per chunk when an event carries several (speculative decoding, a stream interval
    # above 1). Off, an event with text counts one token and the final usage settles the total.
    usage_per_chunk: bool = True
    control_token: str | None = None  # pdgate backend's control plane (KV release)


class HttpBackend:
    """One upstream server speaking ``protocol`` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        url: str,
        protocol: Protocol,
        *,
        bootstrap_port: int | None = None,
        options: HttpOptions | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol '{protocol}'; known: {', '.join(PROTOCOLS)}")
        self.name = name
        self.url = url.rstrip("/")
        self.protocol = protocol
        self.bootstrap_port = bootstrap_port
        self.options = options or HttpOptions()
        self.host = urlsplit(self.url).hostname or "127.0.0.1"
        self._pool: HttpPool | None = None
        self._releases: set[asyncio.Task[None]] = set()  # KV releases under way
        self._healthy = True
        # vLLM and SGLang report usage per chunk when asked; an OpenAI server does not.
        self._continuous = protocol != "openai" and self.options.usage_per_chunk

    # -- lifecycle and health ----------------------------------------------------------------

    async def start(self) -> None:
        o = self.options
        self._pool = HttpPool(
            self.url, max_connections=o.max_connections, connect_timeout_s=o.connect_timeout_s
        )

    async def close(self) -> None:
        if self._releases:
            await asyncio.wait(self._releases, timeout=1.0)
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def healthy(self) -> bool:
        return self._pool is not None and self._healthy

    def set_healthy(self, value: bool) -> None:
        self._healthy = value

    async def probe(self, limit_s: float) -> bool:
        """``GET /health`` answered 2xx within ``limit_s``."""
        try:
            async with asyncio.timeout(limit_s):  # connecting included
                async with await self._http().request("GET", "/health", timeout_s=limit_s) as r:
                    await r.read()
                    return 200 <= r.status < 300
        except (UpstreamError, TimeoutError, BackendUnavailable):
            return False

    def describe(self) -> dict[str, Any]:
        return {"type": "http", "url": self.url, "protocol": self.protocol}

    def load(self) -> BackendLoad:
        return BackendLoad()

    def capacity_tokens(self) -> int | None:
        return None

    def estimate_prefill_s(self, prompt_tokens: int) -> float | None:
        return None

    # -- legs ----------------------------------------------------------------------------------

    async def prefill(self, params: GenerationParams) -> PrefillResult:
        if self.protocol == "openai":
            raise BackendUnavailable(f"{self.name}: protocol 'openai' is aggregated only")
        if self.protocol == "sglang-bootstrap":
            return self._sglang_prefill(params)
        return await self._vllm_prefill(params)

    def decode(self, params: GenerationParams, kv: KVHandle) -> AsyncGenerator[TokenChunk, None]:
        if self.protocol == "openai":
            raise BackendUnavailable(f"{self.name}: protocol 'openai' is aggregated only")
        if self.protocol == "sglang-bootstrap":
            body = upstream_body(
                params, stream=True, continuous=self._continuous, **kv.params["bootstrap"]
            )
            task: asyncio.Task[dict[str, Any]] = kv.params["prefill"]
            stream = self._stream(params, body, prompt_usage=lambda: _task_usage(task))
            return _fail_with(task, stream, self.name)
        ktp = kv.params.get("ktp")
        body = upstream_body(
            params, stream=True, continuous=self._continuous, kv_transfer_params=ktp
        )
        prior = kv.params.get("usage")
        counted = prior if isinstance(prior, ReportedUsage) else None

        def pulled() -> None:
            """The decode server has pulled the KV (its first chunk came) and releases it on
            the prefill server itself: the handle has nothing left to release."""
            kv.release = nothing_to_release

        return self._stream(params, body, prompt_usage=lambda: counted, on_first=pulled)

    def generate(self, params: GenerationParams) -> AsyncGenerator[TokenChunk, None]:
        return self._stream(params, upstream_body(params, stream=True, continuous=self._continuous))

    async def _vllm_prefill(self, params: GenerationParams) -> PrefillResult:
        started = time.monotonic()
        if params.max_tokens <= 1:  # nothing to decode: one ordinary request
            data = await self._post(params, upstream_body(params, stream=False))
            text, finish = message(data)
            stats = LegStats(compute_s=time.monotonic() - started)
            usage = body_usage(data)
            chunk = TokenChunk(text, 1, finish or "length", stats, usage, relayed_choice(data))
            kv = KVHandle(self.name, params.prompt_tokens, 0.0, 0, None, text)
            return PrefillResult(chunk, kv, stats)
        ktp = {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        }
        body = upstream_body(params, stream=False, max_tokens=1, kv_transfer_params=ktp)
        data = await self._post(params, body)
        answered = data.get("kv_transfer_params")
        usage = body_usage(data)
        stats = LegStats(compute_s=time.monotonic() - started)
        blocks = answered.get("remote_block_ids") if isinstance(answered, dict) else None
        held = answered.get("remote_request_id") if isinstance(answered, dict) else None
        kv = KVHandle(
            source=self.name,
            prompt_tokens=usage.prompt_tokens if usage else params.prompt_tokens,
            kv_bytes=0.0,
            descriptors=len(blocks) if isinstance(blocks, list) else 0,
            link=None,
            first_token="",
            params={"ktp": answered if isinstance(answered, dict) else None, "usage": usage},
        )
        if isinstance(held, str):
            kv.release = lambda: self._release_kv(held)
        return PrefillResult(TokenChunk("", 0, None, stats), kv, stats)

    def _release_kv(self, remote_request_id: str) -> None:
        """Ask the prefill server to drop the KV it holds for a request no decode will pull
        (the handoff was abandoned). ``pdgate backend`` answers ``POST /pdgate/kv/release``;
        vLLM has no such call and frees the blocks when its own timeout ends
        (``VLLM_NIXL_ABORT_REQUEST_TIMEOUT``), so its 404 is ignored. Best effort, in the
        background: the request that abandoned the KV is already over."""
        if self._pool is None:
            return
        body = orjson.dumps({"remote_request_id": remote_request_id})
        task = asyncio.get_running_loop().create_task(self._post_release(body))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _post_release(self, body: bytes) -> None:
        headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
        if self.options.control_token:
            headers += (("Authorization", f"Bearer {self.options.control_token}"),)
        try:
            async with await self._http().request(
                "POST", "/pdgate/kv/release", body, headers, timeout_s=5.0
            ) as resp:
                await resp.read()
        except (UpstreamError, BackendUnavailable, TimeoutError):
            pass  # the prefill server's lease frees it

    def _sglang_prefill(self, params: GenerationParams) -> PrefillResult:
        if self.bootstrap_port is None:
            raise BackendUnavailable(f"{self.name}: sglang-bootstrap needs a bootstrap_port")
        fields: dict[str, Any] = {
            "bootstrap_host": self.host,
            "bootstrap_port": self.bootstrap_port,
            "bootstrap_room": secrets.randbits(63),
        }
        body = upstream_body(params, stream=False, **fields)
        task = asyncio.get_running_loop().create_task(self._post(params, body))
        task.add_done_callback(_consume)

        def release() -> None:
            task.cancel()  # no-op once done: the decode side frees the KV on the server

        kv = KVHandle(
            self.name, params.prompt_tokens, 0.0, 0, None, "", release,
            params={"bootstrap": fields, "prefill": task},
        )  # fmt: skip
        stats = LegStats()
        return PrefillResult(TokenChunk("", 0, None, stats), kv, stats)

    # -- transport -----------------------------------------------------------------------------

    def _http(self) -> HttpPool:
        if self._pool is None:
            raise BackendUnavailable(f"{self.name} is not running")
        return self._pool

    async def _send(
        self, params: GenerationParams, body: dict[str, Any], timeout_s: float | None = None
    ) -> Response:
        """POST ``body`` to the leg's endpoint; the response once its headers arrived."""
        path = "/v1/chat/completions" if params.api == "chat" else "/v1/completions"
        headers = (("Content-Type", "application/json"), ("X-Request-Id", params.request_id))
        if self.options.served_model_name is not None:
            body["model"] = self.options.served_model_name  # each leg's body is its own copy
        try:
            return await self._http().request(
                "POST", path, orjson.dumps(body), headers,
                timeout_s=timeout_s, read_timeout_s=self.options.read_timeout_s,
            )  # fmt: skip
        except UpstreamError as exc:
            raise self._error(exc) from exc

    def _error(self, exc: UpstreamError) -> BackendUnavailable | LegFailed:
        if isinstance(exc, ConnectError):
            return BackendUnavailable(f"{self.name}: cannot connect: {exc}")
        return LegFailed(f"{self.name}: {type(exc).__name__}: {exc}")

    async def _post(self, params: GenerationParams, body: dict[str, Any]) -> dict[str, Any]:
        async with await self._send(params, body, self.options.prefill_timeout_s) as resp:
            try:
                raw = await resp.read()
            except UpstreamError as exc:
                raise self._error(exc) from exc
            if resp.status >= 400:
                raise status_error(self.name, resp.status, raw)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise LegFailed(f"{self.name}: upstream answered invalid JSON") from exc
        if not isinstance(data, dict):
            raise LegFailed(f"{self.name}: upstream answered a non-object")
        return data

    async def _stream(
        self,
        params: GenerationParams,
        body: dict[str, Any],
        prompt_usage: Callable[[], ReportedUsage | None] | None = None,
        on_first: Callable[[], None] | None = None,
    ) -> AsyncGenerator[TokenChunk, None]:
        """The upstream's SSE stream as token chunks; the last carries finish and usage
        (its prompt and cached tokens from ``prompt_usage``, the prefill leg's count, when
        that is known). ``on_first`` is called when the first chunk has arrived.

        Events are parsed per read, not per line: whatever arrived together becomes one chunk
        of several tokens (a burst from a fast upstream, or a backlog while this process was
        busy), so a burst costs one pass through the dispatch layers and one write to the
        client instead of one per token. Tokens that arrive one at a time stay one per chunk.
        """
        started = time.monotonic()
        async with await self._send(params, body) as resp:
            try:
                if resp.status >= 400:
                    raise status_error(self.name, resp.status, await resp.read())
                parser = StreamParser(self.name)
                ended = False
                while not ended:
                    data = await resp.readany()
                    if not data:  # the body ended without [DONE]: its last line may lack a newline
                        data, ended = b"\n", True
                    chunk = parser.feed(data)
                    if chunk is not None:
                        if on_first is not None:
                            on_first()
                            on_first = None
                        yield chunk
                    if parser.failure is not None:
                        raise parser.failure
                    if parser.done:
                        # Read the body's end too, so the connection goes back to the pool.
                        await resp.finish(DRAIN_S)
                        break
            except UpstreamError as exc:
                raise self._error(exc) from exc
            last = parser.last(LegStats(compute_s=time.monotonic() - started))
            if last.usage is not None and prompt_usage is not None:
                last = _with_usage(last, prompt_usage() or last.usage)
            if on_first is not None:
                on_first()
            yield last


def _with_usage(chunk: TokenChunk, prompt: ReportedUsage) -> TokenChunk:
    """The last chunk with the prompt counted as ``prompt`` says (the prefill server's count),
    keeping the decode server's usage details (what it generated)."""
    own = chunk.usage.details if chunk.usage is not None else None
    details = {**(prompt.details or {}), **(own or {})} or None
    usage = ReportedUsage(prompt.prompt_tokens, prompt.cached_tokens, details)
    return TokenChunk(chunk.text, chunk.tokens, chunk.finish_reason, chunk.stats, usage)


def _task_usage(task: asyncio.Task[dict[str, Any]]) -> ReportedUsage | None:
    if task.done() and not task.cancelled() and task.exception() is None:
        return body_usage(task.result())
    return None


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved here; the decode side reports it


async def _fail_with(
    task: asyncio.Task[dict[str, Any]], stream: AsyncGenerator[TokenChunk, None], name: str
) -> AsyncGenerator[TokenChunk, None]:
    """``stream``, cancelled at once if the concurrent prefill leg ``task`` fails."""
    async with aclosing(stream):
        while not task.done():  # race each step against the prefill until it has answered
            step = asyncio.ensure_future(anext(stream))
            await asyncio.wait((step, task), return_when=asyncio.FIRST_COMPLETED)
            if task.done() and (task.cancelled() or task.exception() is not None):
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
                raise _prefill_failure(task, name)
            try:
                chunk = await step
            except StopAsyncIteration:
                return
            yield chunk
        if task.cancelled() or task.exception() is not None:
            raise _prefill_failure(task, name)
        async for chunk in stream:
            yield chunk


def _prefill_failure(task: asyncio.Task[dict[str, Any]], name: str) -> BackendError:
    """Why the concurrent prefill leg failed: a client error as it was, anything else as the
    decode leg's failure."""
    cause = None if task.cancelled() else task.exception()
    if isinstance(cause, UpstreamRejected):
        return cause
    error = LegFailed(f"{name}: the prefill leg failed: {cause}")
    error.__cause__ = cause
    return error


# 4xx an upstream answers that are not about the request: load (408, 429), or the gateway's
# own configuration (401/403: credentials; 404: path or served model name).
_NOT_THE_CLIENTS = frozenset({401, 403, 404, 408, 429})


def status_error(name: str, status: int, raw: bytes) -> BackendError:
    """The backend error for an upstream's error answer.

    A 4xx is the request's fault (:class:`UpstreamRejected`, its envelope kept for the client),
    except those in ``_NOT_THE_CLIENTS``; 429, or a 503 whose envelope says ``overloaded``, is
    a busy worker (:class:`BackendOverloaded`); any other status is the worker's failure
    (:class:`LegFailed`).
    """
    envelope = _envelope(raw)
    if 400 <= status < 500 and status not in _NOT_THE_CLIENTS:
        message = envelope.get("message")
        return UpstreamRejected(
            status,
            message if isinstance(message, str) else f"the upstream refused the request ({status})",
            type=str(envelope.get("type") or "invalid_request_error"),
            param=_str_or_none(envelope.get("param")),
            code=_str_or_none(envelope.get("code")),
        )
    if status == 429 or (status == 503 and envelope.get("code") == "overloaded"):
        return BackendOverloaded(f"{name}: upstream answered {status}: {snippet(raw)}")
    return LegFailed(f"{name}: upstream answered {status}: {snippet(raw)}")


def _envelope(raw: bytes) -> dict[str, Any]:
    """The ``error`` object of an OpenAI error body (empty if the body is not one)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return error
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data  # FastAPI/SGLang style: the fields at the top level
    return {}


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)
