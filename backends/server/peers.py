"""Instance-to-instance side channels of the P/D handshakes, over HTTP.

* vLLM NIXL: the decode instance pulls a held request's KV metadata from the prefill
  instance's HTTP port (``POST /pdgate/kv/pull``) and, once the modelled transfer has landed,
  tells it to free the blocks (``POST /pdgate/kv/release``, NIXL's notify).
* SGLang bootstrap: the prefill instance serves ``bootstrap_port``; the decode instance
  long-polls ``GET /pdgate/rooms/{room}`` until the room's prefill is done, then releases it
  with ``POST /pdgate/rooms/{room}/release``.

aiohttp errors never leave this module: a failed call is :class:`PeerError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from backends.server.kv import KVMeta, RoomError, Rooms

log = logging.getLogger("pdgate.backend.peers")


class PeerError(Exception):
    """A side-channel call to another instance failed."""


class PeerClient:
    """Calls to other instances (one pooled aiohttp session per instance)."""

    def __init__(self, token: str | None = None) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Other instances' control planes want the deployment's shared token.
        self._headers = {"Authorization": f"Bearer {token}"} if token else None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        if self._session is not None:
            await self._session.close()

    async def _call(
        self, method: str, url: str, *, json: dict[str, Any] | None = None, limit_s: float = 10.0
    ) -> tuple[int, dict[str, Any]]:
        assert self._session is not None, "PeerClient not started"
        try:
            async with self._session.request(
                method,
                url,
                json=json,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=limit_s),
            ) as resp:
                data = await resp.json(content_type=None)
                return resp.status, data if isinstance(data, dict) else {}
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PeerError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    async def pull(self, host: str, port: int, request_id: str, engine_id: str) -> KVMeta | None:
        """A NIXL prefill's held KV, or None when it holds nothing under that id."""
        status, data = await self._call(
            "POST",
            f"http://{_host(host)}:{port}/pdgate/kv/pull",
            json={"remote_request_id": request_id, "remote_engine_id": engine_id},
        )
        if status == 404:
            return None
        if status != 200:
            raise PeerError(f"pull from {host}:{port} answered {status}: {data}")
        return KVMeta.from_dict(data)

    async def wait_room(self, host: str, port: int, room: int, limit_s: float) -> KVMeta:
        url = f"http://{_host(host)}:{port}/pdgate/rooms/{room}?timeout={limit_s}"
        status, data = await self._call("GET", url, limit_s=limit_s + 5.0)
        if status != 200:
            raise RoomError(str(data.get("error") or f"bootstrap server answered {status}"))
        return KVMeta.from_dict(data)

    def notify(self, url: str, body: dict[str, Any]) -> None:
        """Fire-and-forget POST (NIXL's notify): failures are logged, never raised."""

        async def send() -> None:
            try:
                await self._call("POST", url, json=body)
            except PeerError as exc:
                log.warning("KV release notification failed: %s", exc)

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def release_nixl(self, host: str, port: int, request_id: str) -> None:
        self.notify(
            f"http://{_host(host)}:{port}/pdgate/kv/release", {"remote_request_id": request_id}
        )

    def release_room(self, host: str, port: int, room: int) -> None:
        self.notify(f"http://{_host(host)}:{port}/pdgate/rooms/{room}/release", {})


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class BootstrapServer:
    """The prefill instance's bootstrap endpoint (SGLang's ``--disaggregation-bootstrap-port``)."""

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
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/pdgate/rooms/{room}", self._wait)
        app.router.add_post("/pdgate/rooms/{room}/release", self._release)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _refused(self, request: web.Request) -> web.Response | None:
        if self._allowed(request.headers.get("Authorization")):
            return None
        return web.json_response({"error": "control token required"}, status=403)

    async def _wait(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        try:
            room = int(request.match_info["room"])
            limit_s = min(float(request.query.get("timeout", self._max_wait)), self._max_wait)
        except ValueError:
            return web.json_response({"error": "room and timeout must be numbers"}, status=400)
        try:
            meta = await self._rooms.wait(room, limit_s)
        except RoomError as exc:
            return web.json_response({"error": str(exc)}, status=504)
        return web.json_response(meta.as_dict())

    async def _release(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        try:
            room = int(request.match_info["room"])
        except ValueError:
            return web.json_response({"error": "room must be a number"}, status=400)
        found = self._rooms.release(room)
        return web.json_response({"released": found}, status=200 if found else 404)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})
