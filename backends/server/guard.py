"""pdgate's HTTP/1 protocol (the gateway's and ``pdgate backend``'s): uvicorn's httptools
protocol with read deadlines.

uvicorn times idle keep-alive connections (``timeout_keep_alive``) but nothing else: a client
that opens a connection and sends its headers a byte at a time (slowloris), or announces a body
and never sends it, holds a connection, a parser and (for the body) a request task for as long
as it likes. :func:`guarded_protocol` returns the protocol class ``uvicorn.run(http=...)`` takes,
which adds two deadlines:

* ``header_timeout_s`` — from the connection's first byte (or the start of the next request on
  a keep-alive connection) to the end of the request's headers. Past it the client gets
  ``408 Request Timeout`` and the connection is closed.
* ``body_timeout_s`` — from the end of the headers to the end of the body. Past it the
  connection is closed: the request sees a disconnect, and everything it held is released.

It also answers an HTTP/1.0 request whose response has no ``Content-Length`` (a stream) with a
close-delimited body: HTTP/1.0 has no chunked transfer coding (RFC 9112 §7.1: a server must not
send it to a 1.0 client), and uvicorn would send it anyway.

Example::

    uvicorn.run(app, http=guarded_protocol(header_timeout_s=10.0, body_timeout_s=30.0))
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

log = logging.getLogger("pdgate.http")

_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_TIMEOUT_BODY = (
    b'{"error":{"message":"request headers not received in time","type":'
    b'"invalid_request_error","param":null,"code":"request_timeout"}}'
)


class _CloseDelimitedCycle(RequestResponseCycle):
    """A request/response cycle that sends an HTTP/1.0 client's response of unknown length
    close-delimited instead of chunked."""

    _close_delimited = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            headers = message.get("headers", ())
            if not any(name.lower() == b"content-length" for name, _ in headers):
                self._close_delimited = True
                self.chunked_encoding = False  # uvicorn adds chunked only when this is None
                self.expected_content_length = sys.maxsize
        elif self._close_delimited and not message.get("more_body", False):
            # The last piece of the body: what is left to send is all there is.
            self.expected_content_length = len(message.get("body", b""))
        await super().send(message)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body read deadlines (module docstring)."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._in_headers = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s, headers=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # the next request on a kept-alive connection
            self._arm(self.header_timeout_s, headers=True)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and self.scope.get("http_version") == "1.0":
            cycle.__class__ = _CloseDelimitedCycle  # its task has not run yet
        self._arm(self.body_timeout_s, headers=False)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self, seconds: float, *, headers: bool) -> None:
        self._disarm()
        self._in_headers = headers
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport.is_closing():
            return
        what = "headers" if self._in_headers else "body"
        log.info("closing a connection from %s: request %s too slow", _peer(self.client), what)
        if self._in_headers and (self.cycle is None or self.cycle.response_complete):
            transport.write(_TIMEOUT_408 % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
        transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


def guarded_protocol(
    *, header_timeout_s: float, body_timeout_s: float
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with these deadlines."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )
