"""Instance-to-instance side channels of the P/D handshakes, over HTTP.

* vLLM NIXL: the decode instance pulls a held request's KV metadata from the prefill
  instance's HTTP port (``POST /pdgate/kv/pull``) and, once the modelled transfer has landed,
  tells it to free the blocks (``POST /pdgate/kv/release``, NIXL's notify).
* SGLang bootstrap: the prefill instance serves ``bootstrap_port``; the decode instance
  long-polls ``GET /pdgate/rooms/{room}`` until the room's prefill is done, then releases it
  with ``POST /pdgate/rooms/{room}/release``.

Calls go through the project's HTTP client (:mod:`backends.upstream.httpclient`, one
keep-alive pool per peer), whose errors never leave this module: a failed call is
:class:`PeerError`. The bootstrap endpoint is served with Starlette and uvicorn, like the
instance itself.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from backends.server.kv import KVMeta, RoomError, Rooms
from backends.upstream.httpclient import HttpPool, UpstreamError

log = logging.getLogger("pdgate.backend.peers")


class PeerError(Exception):
    """A side-channel call to another instance failed."""


class PeerClient:
    """Calls to other instances: one keep-alive pool per peer (``host:port``)."""

    def __init__(self, token: str | None = None) -> None:
        self._pools: dict[str, HttpPool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # Other instances' control planes want the deployment's shared token.
        self._auth: tuple[tuple[str, str], ...] = (
            (("Authorization", f"Bearer {token}"),) if token else ()
        )

    async def start(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.close()

    def _pool(self, base: str) -> HttpPool:
        if self._closed:
            raise PeerError(f"{base}: the peer client is closed")
        pool = self._pools.get(base)
        if pool is None:
            pool = self._pools[base] = HttpPool(base, max_connections=256, connect_timeout_s=5.0)
        return pool

    async def _call(
        self,
        method: str,
        base: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        limit_s: float = 10.0,
    ) -> tuple[int, dict[str, Any]]:
        body = b"" if json is None else orjson.dumps(json)
        headers: tuple[tuple[str, str], ...] = self._auth
        if json is not None:
            headers = (("Content-Type", "application/json"), *headers)
        try:
            async with asyncio.timeout(limit_s):
                pool = self._pool(base)
                async with await pool.request(
                    method, path, body, headers, timeout_s=limit_s
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
            data = orjson.loads(raw) if raw else {}
        except (UpstreamError, TimeoutError, OSError, orjson.JSONDecodeError) as exc:
            raise PeerError(f"{method} {base}{path}: {type(exc).__name__}: {exc}") from exc
        return status, data if isinstance(data, dict) else {}

    async def pull(self, host: str, port: int, request_id: str, engine_id: str) -> KVMeta | None:
        """A NIXL prefill's held KV, or None when it holds nothing under that id."""
        status, data = await self._call(
            "POST",
            _base(host, port),
            "/pdgate/kv/pull",
            json={"remote_request_id": request_id, "remote_engine_id": engine_id},
        )
        if status == 404:
            return None
        if status != 200:
            raise PeerError(f"pull from {host}:{port} answered {status}: {data}")
        return KVMeta.from_dict(data)

    async def wait_room(self, host: str, port: int, room: int, limit_s: float) -> KVMeta:
        path = f"/pdgate/rooms/{room}?timeout={limit_s}"
        status, data = await self._call("GET", _base(host, port), path, limit_s=limit_s + 5.0)
        if status != 200:
            raise RoomError(str(data.get("error") or f"bootstrap server answered {status}"))
        return KVMeta.from_dict(data)

    def notify(self, base: str, path: str, body: dict[str, Any]) -> None:
        """Fire-and-forget POST (NIXL's notify): failures are logged, never raised."""

        async def send() -> None:
            try:
                await self._call("POST", base, path, json=body)
            except PeerError as exc:
                log.warning("KV release notification failed: %s", exc)

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def release_nixl(self, host: str, port: int, request_id: str) -> None:
        self.notify(_base(host, port), "/pdgate/kv/release", {"remote_request_id": request_id})

    def release_room(self, host: str, port: int, room: int) -> None:
        self.notify(_base(host, port), f"/pdgate/rooms/{room}/release", {})


def _base(host: str, port: int) -> str:
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{bracketed}:{port}"


class BootstrapServer:
    """The prefill instance's bootstrap endpoint (SGLang's ``--disaggregation-bootstrap-port``):
    a small Starlette app on its own port, served by uvicorn inside the instance's event loop.

    The server is started and stopped with ``uvicorn.Server.startup``/``shutdown`` on a socket
    bound here, not with ``serve()``: that would take over the process's signal handlers from
    the instance's own server, and exit the process if the port were taken."""

    def __init__(
        self,
        rooms: Rooms,
        host: str,
        port: int,
        max_wait_s: float,
        allowed: Callable[[str | None], bool] = lambda authorization: True,
    ) -> None:
        self._allowed = allowed  # allowed(Authorization header): the control plane's check
        self._rooms = rooms
        self._host = host
        self._port = port
        self._max_wait = max_wait_s
        self._server: uvicorn.Server | None = None
        self._sockets: list[socket.socket] = []

    async def start(self) -> None:
        app = Starlette(
            routes=[
                Route("/pdgate/rooms/{room}", self._wait, methods=["GET"]),
                Route("/pdgate/rooms/{room}/release", self._release, methods=["POST"]),
                Route("/health", self._health, methods=["GET"]),
            ]
        )
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,  # leave the process's logging (the instance's server) alone
            log_level=None,
            access_log=False,
            timeout_graceful_shutdown=1,  # long polls in flight are cut after this
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        # Bound here, so a taken port is an OSError for the instance, as any bind failure.
        self._sockets = [socket.create_server((self._host, self._port), family=family)]
        await server.startup(sockets=self._sockets)
        self._server = server

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown(sockets=self._sockets)

    def _refused(self, request: Request) -> Response | None:
        if self._allowed(request.headers.get("authorization")):
            return None
        return _json({"error": "control token required"}, 403)

    async def _wait(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        try:
            room = int(request.path_params["room"])
            limit_s = min(
                float(request.query_params.get("timeout", self._max_wait)), self._max_wait
            )
        except ValueError:
            return _json({"error": "room and timeout must be numbers"}, 400)
        try:
            meta = await self._rooms.wait(room, limit_s)
        except RoomError as exc:
            return _json({"error": str(exc)}, 504)
        return _json(meta.as_dict())

    async def _release(self, request: Request) -> Response:
        if (refused := self._refused(request)) is not None:
            return refused
        try:
            room = int(request.path_params["room"])
        except ValueError:
            return _json({"error": "room must be a number"}, 400)
        found = self._rooms.release(room)
        return _json({"released": found}, 200 if found else 404)

    async def _health(self, request: Request) -> Response:
        return _json({"status": "ok"})


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")
