"""Which HTTP client should carry the gateway's upstream legs? A quick, self-contained measure.

Starts one ``pdgate backend --time-scale 0`` (answers as fast as the server can) on a free
loopback port and sends it small non-streaming completions with three clients, at concurrency
1 and 64: httpx with its default transport, httpx over aiohttp (``httpx-aiohttp``), and aiohttp
directly. Prints requests per second for each; the ratios are what matter (one run, one
machine, the server's own cost included in every figure).

    .venv/bin/python loadtests/bench_upstream_client.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import httpx
import httpx_aiohttp

BODY = {"model": "llama-3.1-8b", "prompt": "hello", "max_tokens": 2}


@contextlib.contextmanager
def backend() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        sys.executable, "-m", "gateway.cli", "backend", "--device", "h100-sxm",
        "--model", "llama-3.1-8b", "--time-scale", "0", "--port", str(port),
        "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(argv)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait()


async def run(send: Callable[[], Awaitable[None]], requests: int, concurrency: int) -> float:
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await send()

    for _ in range(min(50, requests)):  # warm up the pool
        await send()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - t0)


async def bench(url: str, requests: int, concurrency: int) -> dict[str, float]:
    out: dict[str, float] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def httpx_send() -> None:
            (await client.post("/v1/completions", json=BODY)).raise_for_status()

        out["httpx (default transport)"] = await run(httpx_send, requests, concurrency)
    transport = httpx_aiohttp.AiohttpTransport()
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=30) as client:

        async def bridged_send() -> None:
            (await client.post("/v1/completions", json=BODY)).raise_for_status()

        out["httpx over aiohttp (httpx-aiohttp)"] = await run(bridged_send, requests, concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector) as session:

        async def aiohttp_send() -> None:
            async with session.post("/v1/completions", json=BODY) as resp:
                resp.raise_for_status()
                await resp.read()

        out["aiohttp"] = await run(aiohttp_send, requests, concurrency)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with backend() as url:
        for concurrency in (1, 64):
            results = asyncio.run(bench(url, args.requests, concurrency))
            for name, rps in results.items():
                print(f"concurrency {concurrency:3d}  {name:36s} {rps:8.0f} req/s")


if __name__ == "__main__":
    main()
