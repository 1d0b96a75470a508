"""A small HTTP/1.1 client for the gateway's upstream legs: one keep-alive connection pool per
upstream, requests with a body, responses read whole or as they arrive.

It exists for CPU, the gateway's scarcest resource: every client request costs two upstream
requests, and aiohttp's client spends about 300 µs of CPU on each on the reference 2-core
machine (request and response objects, header multidicts, a writer task, timer handles,
stream readers) where this one spends under 100 µs, so the gateway's whole CPU per request
dropped by about a quarter (docs/performance.md). It does only what the legs need:

* ``http://`` and ``https://`` to one host, HTTP/1.1 keep-alive, request bodies in one write;
* responses framed by ``Content-Length``, chunked, or (HTTP/1.0 style) by the connection's
  end, parsed by httptools (the C parser uvicorn uses);
* a pool of at most ``max_connections``, last used first; idle connections are dropped after
  ``idle_timeout_s`` (shorter than the 5 s keep-alive of uvicorn-based servers such as vLLM
  and SGLang, so a request rarely meets a connection the server is closing);
* timeouts as one timer per connection, re-armed lazily: connect, whole request
  (``timeout_s``) and silence between reads (``read_timeout_s``);
* a response not read to its end, or abandoned by a cancelled caller, closes its connection
  (the upstream sees the disconnect and aborts its work); a streamed body buffers at most
  :data:`HIGH_WATER` bytes before reading from the socket pauses.

Errors are :class:`ConnectError` (nothing was sent: refused, unreachable, connect timeout) and
:class:`ResponseError` (the connection failed or timed out after the request went out).

Example::

    pool = HttpPool("http://10.0.0.5:8000", max_connections=512)
    async with await pool.request("POST", "/v1/completions", body, headers) as resp:
        if resp.status == 200:
            async for data in resp:      # or: await resp.read()
                ...
    await pool.close()
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

from httptools import HttpParserError, HttpResponseParser

HIGH_WATER = 256 * 1024  # streamed bytes buffered before the socket is paused


class UpstreamError(Exception):
    """An upstream request failed."""


class ConnectError(UpstreamError):
    """No connection could be made; the request was not sent."""


class ResponseError(UpstreamError):
    """The connection failed, or timed out, after the request was sent."""


class _Connection(asyncio.Protocol):
    """One TCP connection and the response it is reading (httptools calls the ``on_*``)."""

    def __init__(self, pool: HttpPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = True  # in the pool's count of open connections
        self.idle_since = 0.0
        self._parser = HttpResponseParser(self)
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.complete = False  # the whole response arrived
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self._framed = False  # Content-Length or chunked: the body's end is known
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._headers: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: float | None = None
        self._read_timeout: float | None = None
        self._last_read = 0.0

    # -- a request on this connection ----------------------------------------------------------

    def send(self, data: bytes, deadline: float | None, read_timeout_s: float | None) -> None:
        self._reset()
        self._deadline = deadline
        self._read_timeout = read_timeout_s
        self._last_read = self._loop.time()
        self._arm()
        self._headers = self._loop.create_future()
        assert self.transport is not None
        self.transport.write(data)

    async def wait_headers(self) -> int:
        assert self._headers is not None
        await self._headers
        return self.status

    async def readany(self) -> bytes:
        """What arrived since the last call; ``b""`` once the body has ended."""
        while not self._buffer:
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self._last_read = self._loop.time()
            self.transport.resume_reading()
        return data

    def bound(self, seconds: float) -> None:
        """From now, the rest of the response must arrive within ``seconds``."""
        deadline = self._loop.time() + seconds
        if self._deadline is None or deadline < self._deadline:
            self._deadline = deadline
            self._arm()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._disarm()
            if self.transport is not None:
                self.transport.close()

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except HttpParserError as exc:
            self._fail(ResponseError(f"malformed response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed, self.closed = self.closed, True
        self._disarm()
        self._pool.forget(self)
        try:
            if self.complete or self._headers is None:
                return  # between requests: nothing to tell anyone
            if self.status and not self._framed and exc is None:
                self.on_message_complete()  # a body framed by the connection's end has ended
                return
            by = "this side" if was_closed else f"the server ({exc or 'EOF'})"
            reason = f"closed by {by}"
            self._fail(ResponseError(f"connection {reason} before the response ended"))
        finally:
            # Nothing reads this connection again. The transport and the parser each refer back
            # to it: dropping them lets reference counting free all three at once, instead of
            # leaving a cycle per closed connection to the cycle collector.
            self.transport = None
            del self._parser

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self._headers is not None and not self._headers.done():
            self._headers.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._buffer.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True  # resumed by readany(); the silence is ours, not the server's
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive() and self._framed
        self._disarm()
        self._wake()

    # -- timeouts and wake-ups -----------------------------------------------------------------

    def _arm(self) -> None:
        """One timer per connection: it fires at the earliest limit and, on firing, checks
        the limits against the time of the last read (re-arming if data arrived since), so
        reads never touch it."""
        self._disarm()
        due = self._deadline
        if self._read_timeout is not None:
            idle_due = self._last_read + self._read_timeout
            due = idle_due if due is None else min(due, idle_due)
        if due is not None:
            self._timer = self._loop.call_at(due, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.complete or self.closed:
            return
        now = self._loop.time()
        if self._paused:  # not reading: the server's silence is not its fault
            self._last_read = now
        if self._deadline is not None and now >= self._deadline:
            what = "the request's time limit passed"
        elif self._read_timeout is not None and now - self._last_read >= self._read_timeout:
            what = f"nothing arrived for {self._read_timeout:g} s"
        else:
            self._arm()
            return
        self._fail(ResponseError(f"timed out: {what}"))
        self.close()

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if self._headers is not None and not self._headers.done():
            self._headers.set_exception(error)
            self._headers.exception()  # retrieved: the caller may be gone
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Response:
    """A response whose status has arrived; its body is read with :meth:`read`, by iterating,
    or not at all. Leaving ``async with`` returns the connection to the pool if the body was
    read to its end, and closes it otherwise."""

    __slots__ = ("_conn", "_pool", "status")

    def __init__(self, pool: HttpPool, conn: _Connection, status: int) -> None:
        self._pool = pool
        self._conn = conn
        self.status = status

    async def read(self) -> bytes:
        parts = []
        while data := await self._conn.readany():
            parts.append(data)
        return b"".join(parts)

    async def readany(self) -> bytes:
        return await self._conn.readany()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while data := await self._conn.readany():
            yield data

    async def finish(self, limit_s: float) -> None:
        """Read what remains of the body (discarding it) for at most ``limit_s``, so the
        connection can be reused; a body still open after that only costs its connection."""
        if self._conn.complete:
            return  # already whole (the usual case): nothing to wait for
        self._conn.bound(limit_s)
        try:
            while await self._conn.readany():
                pass
        except UpstreamError:
            pass

    def release(self) -> None:
        self._pool.release(self._conn)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class HttpPool:
    """Keep-alive connections to one upstream (``url``'s scheme, host and port)."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 512,
        connect_timeout_s: float = 5.0,
        idle_timeout_s: float = 4.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")  # a base path, prepended to request paths
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = host if default_port else f"{host}:{self.port}"
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.loop = asyncio.get_running_loop()
        self._idle: dict[_Connection, None] = {}  # insertion-ordered: the last is the freshest
        self._open = 0  # connections open or opening
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._heads: dict[tuple[str, str], bytes] = {}
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
        *,
        timeout_s: float | None = None,
        read_timeout_s: float | None = None,
    ) -> Response:
        """Send a request; return once the response's status line and headers have arrived.

        ``timeout_s`` bounds the whole exchange, from waiting for a connection to the body's
        end (``connect_timeout_s`` also bounds opening one); ``read_timeout_s`` each silence
        while waiting for the response."""
        deadline = None if timeout_s is None else self.loop.time() + timeout_s
        data = self._head(method, path) + _encode_headers(headers, len(body)) + body
        conn = await self._acquire(deadline)
        try:
            conn.send(data, deadline, read_timeout_s)
            status = await conn.wait_headers()
        except BaseException:
            conn.close()
            self.release(conn)
            raise
        return Response(self, conn, status)

    def release(self, conn: _Connection) -> None:
        """Back to the pool if its response ended cleanly and may be followed by another,
        else closed."""
        if conn.closed or not (conn.complete and conn.keep_alive) or self._closed:
            conn.close()
            self.forget(conn)
            return
        conn.idle_since = self.loop.time()
        self._idle[conn] = None
        self._wake_one()

    def forget(self, conn: _Connection) -> None:
        """A connection closed (or never opened): out of the pool and of the count."""
        self._idle.pop(conn, None)
        if conn.counted:
            conn.counted = False
            self._open -= 1
            self._wake_one()

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectError("the pool is closed"))
                waiter.exception()

    # -- connections ---------------------------------------------------------------------------

    async def _acquire(self, deadline: float | None) -> _Connection:
        while True:
            if self._closed:
                raise ConnectError("the pool is closed")
            conn = self._pop_idle()
            if conn is not None:
                return conn
            if self._open < self.max_connections:
                return await self._connect(deadline)
            await self._wait_turn(deadline)

    async def _wait_turn(self, deadline: float | None) -> None:
        """Until a connection comes back or a slot frees (all ``max_connections`` are busy)."""
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as exc:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken and abandoned at once: pass the turn on
            if isinstance(exc, TimeoutError):
                raise UpstreamError("timed out waiting for a free connection") from exc
            raise

    def _pop_idle(self) -> _Connection | None:
        oldest_ok = self.loop.time() - self.idle_timeout_s
        while self._idle:
            conn, _ = self._idle.popitem()  # the most recently used
            if conn.closed or (conn.transport is not None and conn.transport.is_closing()):
                continue
            if conn.idle_since < oldest_ok:  # this one and every older one: too old
                conn.close()
                for stale in list(self._idle):
                    stale.close()
                self._idle.clear()
                return None
            return conn
        return None

    async def _connect(self, deadline: float | None) -> _Connection:
        self._open += 1
        conn = _Connection(self)
        limit = self.loop.time() + self.connect_timeout_s
        try:
            async with asyncio.timeout_at(limit if deadline is None else min(limit, deadline)):
                await self.loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except BaseException as exc:
            self.forget(conn)
            if isinstance(exc, TimeoutError):
                raise ConnectError("connect timed out") from exc
            if isinstance(exc, OSError):
                raise ConnectError(str(exc) or type(exc).__name__) from exc
            raise
        return conn

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _head(self, method: str, path: str) -> bytes:
        key = (method, path)
        head = self._heads.get(key)
        if head is None:
            line = f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            head = self._heads[key] = line.encode("latin-1")
        return head


def _encode_headers(headers: Sequence[tuple[str, str]], length: int) -> bytes:
    lines = [f"{name}: {_value(value)}\r\n" for name, value in headers]
    lines.append(f"Content-Length: {length}\r\n\r\n")
    return "".join(lines).encode("latin-1", "replace")


def _value(value: str) -> str:
    """A header value that cannot end its line early."""
    if "\r" in value or "\n" in value:
        return value.replace("\r", " ").replace("\n", " ")
    return value
