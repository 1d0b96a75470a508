"""The upstream HTTP/1.1 client (:mod:`backends.upstream.httpclient`) against a scripted loopback
server: keep-alive reuse, framing, timeouts, abandoned responses, the connection limit, stale and
server-closed connections."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from backends.upstream.httpclient import (
    HIGH_WATER,
    ConnectError,
    HttpPool,
    ResponseError,
    UpstreamError,
)
from tests.helpers import free_port

# (path, body, reader, writer) -> keep the connection alive
Handler = Callable[[str, bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class Server:
    """Reads requests (Content-Length bodies) and answers with ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[str, bytes, bytes]] = []  # (path, head, body)
        self.closed = asyncio.Event()  # a client closed its connection
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                path = head.split(b" ")[1].decode()
                self.requests.append((path, head, body))
                if not await self.handler(path, body, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
        except asyncio.CancelledError:
            pass  # the test is over (returning, not raising: asyncio logs cancelled handlers)
        finally:
            writer.close()


def json_response(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + b"".join(extra)
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


async def echo(
    path: str, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    writer.write(json_response(b'{"path":"' + path.encode() + b'"}'))
    await writer.drain()
    return True


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.fixture
async def pool_factory() -> AsyncIterator[Callable[..., HttpPool]]:
    pools: list[HttpPool] = []

    def make(url: str, **kw: float) -> HttpPool:
        pools.append(HttpPool(url, **kw))  # type: ignore[arg-type]
        return pools[-1]

    yield make
    for p in pools:
        await p.close()


async def test_a_base_path_prefixes_every_request(pool_factory: Callable[..., HttpPool]) -> None:
    async with Server(echo) as url:
        pool = pool_factory(url + "/base/")
        async with await pool.request("POST", "/v1/completions", b"{}") as r:
            assert r.status == 200
            assert await r.read() == b'{"path":"/base/v1/completions"}'


async def test_requests_share_a_connection_and_carry_headers(
    pool_factory: Callable[..., HttpPool],
) -> None:
    server = Server(echo)
    async with server as url:
        pool = pool_factory(url)
        for i in range(3):
            async with await pool.request("POST", "/p", b'{"i":%d}' % i, [("X-A", "b")]) as r:
                await r.read()
    assert server.connections == 1
    _, head, body = server.requests[-1]
    assert body == b'{"i":2}'
    assert b"\r\nX-A: b\r\n" in head
    assert f"\r\nHost: 127.0.0.1:{url.rsplit(':', 1)[1]}\r\n".encode() in head


async def test_a_chunked_body_arrives_in_parts(pool_factory: Callable[..., HttpPool]) -> None:
    go = asyncio.Event()

    async def stream(
        path: str, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"one "))
        await go.wait()
        writer.write(chunk(b"two") + b"0\r\n\r\n")
        return True

    server = Server(stream)
    async with server as url:
        pool = pool_factory(url)
        async with await pool.request("POST", "/s") as r:
            assert await r.readany() == b"one "
            go.set()
            assert [part async for part in r] == [b"two"]
        async with await pool.request("POST", "/s") as r:  # pooled after the terminal chunk
            assert await r.read() == b"one two"
    assert server.connections == 1


async def test_connection_close_and_bodies_framed_by_the_end_are_not_reused(
    pool_factory: Callable[..., HttpPool],
) -> None:
    async def close(
        path: str, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if path == "/close":
            writer.write(json_response(b"{}", b"connection: close\r\n"))
        else:  # HTTP/1.0 style: no length, the body ends with the connection
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
        await writer.drain()
        return False

    server = Server(close)
    async with server as url:
        pool = pool_factory(url)
        for path in ("/close", "/eof", "/close"):
            async with await pool.request("GET", path) as r:
                body = await r.read()
            assert body == (b"{}" if path == "/close" else b"until the end")
    assert server.connections == 3


async def test_a_closed_connection_is_freed_without_the_cycle_collector(
    pool_factory: Callable[..., HttpPool],
) -> None:
    """Under load connections close every second (idle, ``connection: close``, failures); each
    one left in a reference cycle would wait for the collector's rarer full passes."""

    async def close(
        path: str, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(json_response(b"{}", b"connection: close\r\n"))
        await writer.drain()
        return False

    async with Server(close) as url:
        pool = pool_factory(url)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(5):
                async with await pool.request("GET", "/") as r:
                    assert await r.read() == b"{}"
            await asyncio.sleep(0.05)  # let the transports report their connections lost
            gc.collect()
            kinds = Counter(type(o).__name__ for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert kinds["_Connection"] == 0, kinds.most_common(10)


async def test_refused_connections_are_connect_errors(
    pool_factory: Callable[..., HttpPool],
) -> None:
    pool = pool_factory(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConnectError):
        await pool.request("GET", "/health")
    with pytest.raises(ConnectError):  # the failed attempt freed its slot
        await pool.request("GET", "/health")


async def test_silence_beyond_the_read_timeout_fails_and_closes(
    pool_factory: Callable[..., HttpPool],
) -> None:
    async def stall(
        path: str, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"x"))
        await reader.read()  # silent until the client leaves
        raise ConnectionResetError

    server = Server(stall)
    async with server as url:
        pool = pool_factory(url)
        async with await pool.request("POST", "/", read_timeout_s=0.2) as r:
            assert await r.readany() == b"x"
            with pytest.raises(ResponseError, match=r"nothing arrived for 0\.2 s"):
                await r.readany()
        await asyncio.wait_for(server.closed.wait(), 5)


async def test_the_whole_request_time_limit(pool_factory: Callable[..., HttpPool]) -> None:
    async def trickle(
        path: str, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(100):
            writer.write(chunk(b"."))
            await asyncio.sleep(0.02)
        return False

    async with Server(trickle) as url:
        pool = pool_factory(url)
        async with await pool.request("POST", "/", timeout_s=0.3, read_timeout_s=5) as r:
            with pytest.raises(ResponseError, match="time limit"):
                await r.read()


async def test_an_abandoned_response_closes_its_connection(
    pool_factory: Callable[..., HttpPool],
) -> None:
    async def endless(
        path: str, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(chunk(b"token "))
            await writer.drain()
            await asyncio.sleep(0.01)

    server = Server(endless)
    async with server as url:
        pool = pool_factory(url)

        async def consume() -> None:
            async with await pool.request("POST", "/") as r:
                async for _ in r:
                    pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed.wait(), 5)  # the upstream sees the client leave
        async with await pool.request("POST", "/") as r:  # a fresh connection works
            assert await r.readany()
    assert server.connections == 2


async def test_the_connection_limit_makes_requests_wait(
    pool_factory: Callable[..., HttpPool],
) -> None:
    release = asyncio.Event()

    async def slow(
        path: str, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if path == "/slow":
            await release.wait()
        writer.write(json_response(b"{}"))
        return True

    server = Server(slow)
    async with server as url:
        pool = pool_factory(url, max_connections=1)
        first = asyncio.create_task(pool.request("GET", "/slow"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(pool.request("GET", "/fast"))
        await asyncio.sleep(0.05)
        assert not second.done()
        with pytest.raises(UpstreamError, match="waiting for a free connection"):
            await pool.request("GET", "/fast", timeout_s=0.05)
        release.set()
        async with await first as r:
            assert await r.read() == b"{}"
        async with await second as r:
            assert await r.read() == b"{}"
    assert server.connections == 1


async def test_connections_the_server_closed_or_left_idle_are_replaced(
    pool_factory: Callable[..., HttpPool],
) -> None:
    async def once(
        path: str, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(json_response(b"{}"))
        await writer.drain()
        return path != "/then-close"  # the server's keep-alive timeout, in effect

    server = Server(once)
    async with server as url:
        pool = pool_factory(url, idle_timeout_s=0.2)
        async with await pool.request("GET", "/then-close") as r:
            await r.read()
        await asyncio.sleep(0.05)  # the close reaches the client
        async with await pool.request("GET", "/a") as r:
            assert await r.read() == b"{}"
        await asyncio.sleep(0.3)  # idle longer than idle_timeout_s: not reused
        async with await pool.request("GET", "/b") as r:
            assert await r.read() == b"{}"
    assert server.connections == 3


async def test_header_values_cannot_break_the_request(
    pool_factory: Callable[..., HttpPool],
) -> None:
    server = Server(echo)
    async with server as url:
        pool = pool_factory(url)
        async with await pool.request("GET", "/", b"", [("X-Request-Id", "a\r\nX-Evil: 1")]) as r:
            await r.read()
    _, head, _ = server.requests[0]
    assert b"X-Evil" not in head.split(b"\r\n")[2][:7]
    assert b"\r\nX-Request-Id: a  X-Evil: 1\r\n" in head


async def test_a_slow_reader_pauses_the_socket(pool_factory: Callable[..., HttpPool]) -> None:
    async def flood(
        path: str, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        data = b"x" * 65536
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (64 * len(data)))
        for _ in range(64):
            writer.write(data)
            await writer.drain()
        return True

    async with Server(flood) as url:
        pool = pool_factory(url)
        async with await pool.request("GET", "/") as r:
            await asyncio.sleep(0.3)  # 4 MiB sent; the client reads nothing meanwhile
            first = await r.readany()
            assert len(first) <= 2 * HIGH_WATER  # the mark, plus at most one socket read
            assert len(first) + len(await r.read()) == 64 * 65536
