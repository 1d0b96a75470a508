"""ASGI responses that run the generation themselves, watching for the client leaving.

Both responses commit to a status code only once the first chunk exists, so anything that
fails before the first byte (no worker, deadline, bad upstream) is an ordinary HTTP error in
OpenAI's envelope rather than a ``200`` followed by an error. After the first byte, a streaming
failure becomes one SSE error event, then the stream closes.

While the generation runs, a watcher reads the ASGI ``receive`` channel; on
``http.disconnect`` it cancels the request task, which closes the generator chain, which
aborts both legs on their devices and releases every in-flight guard.

Both answer as soon as the last token is in, then run the generator to its end: closing the
legs, releasing slots, metrics and accounting happen after the client has its answer, not
before, so no client waits for them (docs/performance.md). A failure in that tail has been
counted by dispatch already; the client, answered, does not see it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing, suppress
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.api.errors import error_body, sse_error_event
from gateway.errors import GatewayError

Headers = list[tuple[bytes, bytes]]


class _DisconnectWatcher:
    """Cancels the current task when the client disconnects.

    The watch ends without being cancelled: an ASGI server answers ``receive`` with
    ``http.disconnect`` once the response is complete, and :meth:`stop`, called before the
    response's last message, has told the watch to ignore it by then. Cancelling the watch
    instead would leave its CancelledError's traceback in a reference cycle with both tasks
    and the server's request state: garbage for the cycle collector, about a fifth of the
    gateway's CPU per request at high request rates."""

    def __init__(self, receive: Receive) -> None:
        self.disconnected = False
        self._armed = True
        self._receive = receive
        self._task = asyncio.current_task()
        self._watch = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if self._armed and self._task is not None:
                    self.disconnected = True
                    self._task.cancel()
                return

    def stop(self) -> None:
        """From now, a disconnect cancels nothing: the response is ending."""
        self._armed = False

    def absorb(self) -> bool:
        """After a CancelledError: True if it was our disconnect cancel (now undone)."""
        if self.disconnected and self._task is not None:
            self._task.uncancel()
            return True
        return False


async def _start(send: Send, status: int, content_type: bytes, headers: Headers) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), *headers],
        }
    )


async def _send_json(send: Send, status: int, body: bytes, headers: Headers) -> None:
    """A whole JSON response, its length declared (no chunked framing)."""
    length = (b"content-length", b"%d" % len(body))
    await _start(send, status, b"application/json", [length, *headers])
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, exc: GatewayError, headers: Headers) -> None:
    extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
    await _send_json(send, exc.status, error_body(exc), [*headers, *extra])


class LastEvents(bytes):
    """The stream's last bytes: sent with the end of the response, in one write."""


async def _finish(rest: AsyncGenerator[bytes, None]) -> None:
    """The generator's work after the answer went out (it yields nothing more)."""
    with suppress(GatewayError):  # counted where it was raised; the client has its answer
        await anext(rest, None)


class EventStreamResponse(Response):
    """``text/event-stream`` from an async generator of ready-framed SSE bytes; a
    :class:`LastEvents` ends it."""

    def __init__(self, events: AsyncGenerator[bytes, None], headers: Headers) -> None:
        super().__init__()
        self._events = events
        self._extra = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = _DisconnectWatcher(receive)
        try:
            async with aclosing(self._events) as events:
                await self._stream(events, send, watcher)
        except asyncio.CancelledError:
            if not watcher.absorb():
                raise
        finally:
            watcher.stop()

    async def _stream(
        self, events: AsyncGenerator[bytes, None], send: Send, watcher: _DisconnectWatcher
    ) -> None:
        try:
            first = await anext(events)
        except GatewayError as exc:
            watcher.stop()
            await _send_error(send, exc, self._extra)
            return
        await _start(
            send, 200, b"text/event-stream", [(b"cache-control", b"no-cache"), *self._extra]
        )
        chunk = first
        try:
            while type(chunk) is not LastEvents:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await anext(events, LastEvents())
        except GatewayError as exc:
            chunk = LastEvents(sse_error_event(exc))
        watcher.stop()
        await send({"type": "http.response.body", "body": chunk, "more_body": False})
        await _finish(events)


class DeferredJSONResponse(Response):
    """``application/json`` whose body is the first item of an async generator, computed
    while the client is watched; the generator then runs to its end after the answer."""

    def __init__(self, body: AsyncGenerator[bytes, None], headers: Headers) -> None:
        super().__init__()
        self._body = body
        self._extra = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = _DisconnectWatcher(receive)
        async with aclosing(self._body) as parts:
            try:
                body = await anext(parts)
            except GatewayError as exc:
                watcher.stop()
                await _send_error(send, exc, self._extra)
                return
            except asyncio.CancelledError:
                watcher.stop()
                if watcher.absorb():
                    return
                raise
            watcher.stop()
            await _send_json(send, 200, body, self._extra)
            await _finish(parts)


def header_list(**headers: Any) -> Headers:
    # Header values travel as Latin-1 (ASGI decodes incoming ones that way): round-trip the bytes.
    return [
        (k.replace("_", "-").encode(), str(v).encode("latin-1", "replace"))
        for k, v in headers.items()
    ]
