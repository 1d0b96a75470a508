"""Test helpers: configs, the app in-process, and a real server on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from fastapi import FastAPI

from backends.emulator.catalog import Catalog
from gateway.app import create_app
from gateway.policies import POLICIES
from gateway.service import BackendFactory, Gateway
from gateway.settings import Settings, parse_settings

MODEL = "llama-3.1-8b"


def pool(
    device: str, replicas: int = 1, policy: str = "round_robin", **worker: Any
) -> dict[str, Any]:
    return {"policy": policy, "workers": [{"device": device, "replicas": replicas, **worker}]}


def config(
    *,
    mode: str = "disaggregated",
    name: str = MODEL,
    prefill: dict[str, Any] | None = None,
    decode: dict[str, Any] | None = None,
    aggregated: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    **model: Any,
) -> dict[str, Any]:
    """A one-model config as plain data (H100 prefill, LPU decode unless told otherwise)."""
    pools: dict[str, Any]
    if mode == "aggregated":
        pools = {"aggregated": aggregated or pool("h100-sxm")}
    else:
        pools = {
            "prefill": prefill or pool("h100-sxm", 2),
            "decode": decode or pool("groq-lpu-v1", 2),
        }
    data: dict[str, Any] = {"models": [{"name": name, "mode": mode, "pools": pools, **model}]}
    if server:
        data["server"] = server
    return data


def settings(data: dict[str, Any], catalog: Catalog | None = None) -> Settings:
    return parse_settings(data, catalog=catalog, policies=set(POLICIES))


@contextlib.asynccontextmanager
async def app_client(
    s: Settings, *, backend_factory: BackendFactory | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app in-process (lifespan run) behind httpx's ASGI transport."""
    app = create_app(s, backend_factory=backend_factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://pdgate", timeout=30
        ) as c:
            yield app, c


@contextlib.asynccontextmanager
async def uvicorn_in_process(app: FastAPI) -> AsyncIterator[str]:
    """The app under real uvicorn (httptools) on a free loopback port, in this process and
    its event loop, so a test can look inside while it serves; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, http="httptools", log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def gateway_of(app: FastAPI) -> Gateway:
    gw: Gateway = app.state.gateway
    return gw


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def run_server(data: dict[str, Any], *, ready_timeout: float = 30.0) -> Iterator[str]:
    """``pdgate serve`` as a real process on a free loopback port; yields its base URL.

    Readiness is polled on ``/health``; the process is terminated (then killed) on exit.
    """
    with run_server_process(data, ready_timeout=ready_timeout) as (base, _):
        yield base


@contextlib.contextmanager
def run_server_process(
    data: dict[str, Any], *, ready_timeout: float = 30.0
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """:func:`run_server`, also yielding the process (to kill it, say)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pdgate.yaml"
        path.write_text(yaml.safe_dump(data))
        log = open(Path(tmp) / "server.log", "w+b")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--config",
                str(path),
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(base, proc, ready_timeout, log)
            yield base, proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def _wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout: float, log: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read().decode()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server at {base} not healthy after {timeout} s")
