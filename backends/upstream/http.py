"""Real upstreams as :class:`~backends.base.Backend`: vLLM (NIXL), SGLang (bootstrap), OpenAI.

One :class:`HttpBackend` is one upstream server. Its ``protocol`` says how a disaggregated
request's two legs talk to it (design.md §4):

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
concurrency (encode/httpx#3215); figures in the README. Its errors never leave this module:
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
from collections.abc import AsyncGenerator, Callable, Mapping
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
from backends.errors import BackendUnavailable, LegFailed
from backends.upstream.httpclient import ConnectError, HttpPool, Response, UpstreamError

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
            body = _body(params, stream=True, continuous=self._continuous, **kv.params["bootstrap"])
            task: asyncio.Task[dict[str, Any]] = kv.params["prefill"]
            stream = self._stream(params, body, prompt_usage=lambda: _task_usage(task))
            return _fail_with(task, stream, self.name)
        ktp = kv.params.get("ktp")
        body = _body(params, stream=True, continuous=self._continuous, kv_transfer_params=ktp)
        prior = kv.params.get("usage")
        counted = prior if isinstance(prior, ReportedUsage) else None

        def pulled() -> None:
            """The decode server has pulled the KV (its first chunk came) and releases it on
            the prefill server itself: the handle has nothing left to release."""
            kv.release = nothing_to_release

        return self._stream(params, body, prompt_usage=lambda: counted, on_first=pulled)

    def generate(self, params: GenerationParams) -> AsyncGenerator[TokenChunk, None]:
        return self._stream(params, _body(params, stream=True, continuous=self._continuous))

    async def _vllm_prefill(self, params: GenerationParams) -> PrefillResult:
        started = time.monotonic()
        if params.max_tokens <= 1:  # nothing to decode: one ordinary request
            data = await self._post(params, _body(params, stream=False))
            text, finish = _message(data)
            stats = LegStats(compute_s=time.monotonic() - started)
            usage = _usage(data)
            chunk = TokenChunk(text, 1, finish or "length", stats, usage)
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
        body = _body(params, stream=False, max_tokens=1, kv_transfer_params=ktp)
        data = await self._post(params, body)
        answered = data.get("kv_transfer_params")
        usage = _usage(data)
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
        headers = (("Content-Type", "application/json"),)
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
        body = _body(params, stream=False, **fields)
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
                raise LegFailed(f"{self.name}: upstream answered {resp.status}: {_text(raw)}")
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
                    raw = await resp.read()
                    raise LegFailed(f"{self.name}: upstream answered {resp.status}: {_text(raw)}")
                parser = _StreamState(self.name)
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


class _StreamState:
    """Turns SSE bytes into chunks, counting tokens from running or final usage.

    :meth:`feed` takes whatever was read and returns one chunk with the text of every complete
    ``data:`` line in it (None if none had text). An error event or an unreadable one ends
    the stream: the text before it is still returned, and :attr:`failure` is set to raise
    next, so tokens already produced are delivered (and a leg that produced some is never
    retried)."""

    __slots__ = ("counted", "done", "failure", "finish", "name", "partial", "usage")

    def __init__(self, name: str) -> None:
        self.name = name
        self.partial = b""  # an incomplete last line, waiting for the next read
        self.counted = 0
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False  # [DONE] seen
        self.failure: LegFailed | None = None

    def feed(self, data: bytes) -> TokenChunk | None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        text: list[str] = []
        tokens = 0
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                break
            try:
                part, n = self._event(payload)
            except LegFailed as exc:
                self.failure = exc
                break
            if part:
                text.append(part)
                tokens += n
        return TokenChunk("".join(text), tokens) if text else None

    def _event(self, payload: bytes) -> tuple[str, int]:
        """One event's text and the tokens it carries."""
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise LegFailed(f"{self.name}: invalid SSE event: {_text(payload)}") from exc
        if not isinstance(obj, dict):
            return "", 0
        if "error" in obj:
            error = _text(orjson.dumps(obj["error"]))
            raise LegFailed(f"{self.name}: upstream stream failed: {error}")
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        text = ""
        for choice in obj.get("choices") or ():
            delta = choice.get("delta")
            part = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            text += part or ""
            self.finish = choice.get("finish_reason") or self.finish
        if not text:
            return "", 0
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            tokens = usage["completion_tokens"] - self.counted
        else:
            tokens = 1
        self.counted += tokens
        return text, tokens

    def last(self, stats: LegStats) -> TokenChunk:
        usage = self.usage or {}
        total = usage.get("completion_tokens")
        extra = total - self.counted if isinstance(total, int) and total > self.counted else 0
        prompt = usage.get("prompt_tokens")
        reported = None
        if isinstance(prompt, int):
            details = usage.get("prompt_tokens_details")
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            reported = ReportedUsage(prompt, cached if isinstance(cached, int) else None)
        return TokenChunk("", extra, self.finish or "length", stats, reported)


def _body(
    params: GenerationParams, *, stream: bool, continuous: bool = False, **fields: Any
) -> dict[str, Any]:
    """The client's body for an upstream leg: explicit ``max_tokens``, our stream options."""
    body = dict(params.body)
    body.pop("max_completion_tokens", None)
    body["max_tokens"] = params.max_tokens
    body["stream"] = stream
    if stream:
        options: dict[str, Any] = {"include_usage": True}
        if continuous:
            options["continuous_usage_stats"] = True
        body["stream_options"] = options
    else:
        body.pop("stream_options", None)
    body.update(fields)
    return body


def _message(data: Mapping[str, Any]) -> tuple[str, str | None]:
    choices = data.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return (text or ""), choice.get("finish_reason")


def _usage(data: Mapping[str, Any]) -> ReportedUsage | None:
    usage = data.get("usage")
    if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return ReportedUsage(usage["prompt_tokens"], cached if isinstance(cached, int) else None)


def _with_usage(chunk: TokenChunk, prompt: ReportedUsage) -> TokenChunk:
    return TokenChunk(chunk.text, chunk.tokens, chunk.finish_reason, chunk.stats, prompt)


def _task_usage(task: asyncio.Task[dict[str, Any]]) -> ReportedUsage | None:
    if task.done() and not task.cancelled() and task.exception() is None:
        return _usage(task.result())
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
                cause = None if task.cancelled() else task.exception()
                raise LegFailed(f"{name}: the prefill leg failed: {cause}") from cause
            try:
                chunk = await step
            except StopAsyncIteration:
                return
            yield chunk
        if task.cancelled() or task.exception() is not None:
            cause = None if task.cancelled() else task.exception()
            raise LegFailed(f"{name}: the prefill leg failed: {cause}") from cause
        async for chunk in stream:
            yield chunk


def _text(raw: bytes, limit: int = 300) -> str:
    return raw[:limit].decode("utf-8", "replace")
