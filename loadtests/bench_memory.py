"""Gateway memory: resident set with thousands of open streams, and its slope over a soak.

* ``streams`` — 2 prefill + 2 decode ``pdgate backend`` instances with device timing slowed
  (``--time-scale``, default 0.05: every step takes 20× its real time, so a 300-token answer
  streams for about a minute), the gateway in front (vLLM handshake), then ``--streams``
  concurrent streaming chats opened in waves. Reports the gateway's RSS idle, once every
  stream has its first token, and at the peak, per open stream, and whether every stream
  ended cleanly.
* ``soak`` — the same processes with device timing off (``--time-scale 1e9``), a closed loop
  of streaming and non-streaming requests for ``--minutes``, the gateway's RSS sampled every
  few seconds; reports the least-squares slope of RSS over time (MB/min) after a warm-up,
  with its start, end and peak.

    python -m loadtests.bench_memory streams [--streams 2000]
    python -m loadtests.bench_memory soak [--minutes 10] [--concurrency 32]

Linux only (``/proc``). Every process it starts is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from loadtests.bench_gateway import (
    MODEL,
    PROMPT,
    Proc,
    Processes,
    backend_argv,
    exit_on_sigterm,
    free_port,
    gateway_argv,
    gateway_config,
    rss_mb,
    run_loop,
    wait_healthy,
    wait_serving,
)


@dataclass
class Gateway:
    proc: Proc
    backends: list[Proc]


async def start(
    procs: Processes, time_scale: str, decode_args: Sequence[str] = (), **worker: Any
) -> Gateway:
    """2 prefill + 2 decode backends and the gateway (vLLM handshake) in front of them."""
    prefill = [
        procs.start(f"prefill-{i}", backend_argv(port, "prefill", "--time-scale", time_scale), port)
        for i, port in enumerate(free_port() for _ in range(2))
    ]
    decode = [
        procs.start(
            f"decode-{i}",
            backend_argv(
                port, "decode", "--time-scale", time_scale, *decode_args, device="h200-sxm"
            ),
            port,
        )
        for i, port in enumerate(free_port() for _ in range(2))
    ]
    config = gateway_config("vllm-nixl", prefill, decode, **worker)
    config["server"]["request_timeout_s"] = 3600
    path = procs.logs / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    gw = procs.start("gateway", gateway_argv(path, port), port)
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(wait_healthy(session, p) for p in prefill + decode))
        await wait_serving(session, gw)
    return Gateway(gw, prefill + decode)


def chat(max_tokens: int, stream: bool = True) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return orjson.dumps(body)


HEADERS = {"content-type": "application/json"}


# -- streams ----------------------------------------------------------------------------------


@dataclass
class StreamsResult:
    streams: int
    opened_s: float  # until every stream had its first token
    rss_idle_mb: float
    rss_open_mb: float  # once every stream had its first token
    rss_peak_mb: float
    completed: int
    errors: dict[str, int] = field(default_factory=dict)

    def report(self) -> str:
        per = (self.rss_peak_mb - self.rss_idle_mb) * 1024 / self.streams
        return "\n".join(
            [
                "| streams | opened in | RSS idle | RSS all open | RSS peak | per stream "
                "| completed | errors |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|",
                f"| {self.streams} | {self.opened_s:.1f} s | {self.rss_idle_mb:.0f} MB "
                f"| {self.rss_open_mb:.0f} MB | {self.rss_peak_mb:.0f} MB | {per:.1f} KB "
                f"| {self.completed} | {sum(self.errors.values())} |",
            ]
        )


async def run_streams(args: argparse.Namespace) -> StreamsResult:
    with tempfile.TemporaryDirectory(prefix="pdgate-mem-") as tmp, Processes(Path(tmp)) as procs:
        decode_args = ["--max-num-seqs", str(args.streams), "--kv-lease", "600"]
        gw = await start(procs, args.time_scale, decode_args, max_connections=2 * args.streams)
        pid = gw.proc.pid
        idle = rss_mb(pid)
        first = asyncio.Event()
        started = 0
        completed = 0
        errors: Counter[str] = Counter()
        payload = chat(args.max_tokens)

        async def one(session: aiohttp.ClientSession) -> None:
            nonlocal started, completed
            try:
                async with session.post(gw.proc.url + "/v1/chat/completions", data=payload,
                                        headers=HEADERS) as resp:  # fmt: skip
                    if resp.status != 200:
                        errors[f"HTTP {resp.status}"] += 1
                        return
                    seen = False
                    tail = b""
                    async for part in resp.content.iter_any():
                        if not seen and b'"content":"' in part:
                            seen = True
                            started += 1
                            if started == args.streams:
                                first.set()
                        tail = (tail + part)[-64:]
                    if tail.endswith(b"data: [DONE]\n\n"):
                        completed += 1
                    else:
                        errors["stream ended without [DONE]"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1

        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
        peak = idle
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            t0 = time.monotonic()
            tasks = []
            for wave in range(0, args.streams, args.wave):
                for _ in range(min(args.wave, args.streams - wave)):
                    tasks.append(asyncio.create_task(one(session)))
                await asyncio.sleep(0.5)
                peak = max(peak, rss_mb(pid))
            waiting = asyncio.create_task(first.wait())
            while not waiting.done() and not all(t.done() for t in tasks):
                await asyncio.wait([waiting], timeout=1.0)
                peak = max(peak, rss_mb(pid))
            opened = time.monotonic() - t0
            rss_open = rss_mb(pid)
            print(f"# {started} streams open after {opened:.1f} s: gateway RSS {rss_open:.0f} MB",
                  file=sys.stderr)  # fmt: skip
            pending = set(tasks)
            while pending:
                _, pending = await asyncio.wait(pending, timeout=1.0)
                peak = max(peak, rss_mb(pid))
            waiting.cancel()
        return StreamsResult(args.streams, opened, idle, rss_open, peak, completed, dict(errors))


# -- soak -------------------------------------------------------------------------------------


@dataclass
class SoakResult:
    minutes: float
    requests: int
    errors: int
    samples: list[tuple[float, float]]  # (seconds since start, RSS MB)
    warmup_s: float

    def slope(self) -> float:
        """Least-squares RSS slope after the warm-up, MB per minute."""
        points = [(t, r) for t, r in self.samples if t >= self.warmup_s]
        if len(points) < 2:
            return float("nan")
        n = len(points)
        mt = sum(t for t, _ in points) / n
        mr = sum(r for _, r in points) / n
        var = sum((t - mt) ** 2 for t, _ in points)
        cov = sum((t - mt) * (r - mr) for t, r in points)
        return 60.0 * cov / var if var else float("nan")

    def report(self) -> str:
        after = [r for t, r in self.samples if t >= self.warmup_s]
        return "\n".join(
            [
                "| duration | requests | errors | RSS after warm-up | RSS at end | RSS peak "
                "| slope |",
                "|---:|---:|---:|---:|---:|---:|---:|",
                f"| {self.minutes:.1f} min | {self.requests} | {self.errors} "
                f"| {after[0]:.1f} MB | {after[-1]:.1f} MB | {max(after):.1f} MB "
                f"| {self.slope():+.3f} MB/min |",
            ]
        )


async def run_soak(args: argparse.Namespace) -> SoakResult:
    with tempfile.TemporaryDirectory(prefix="pdgate-soak-") as tmp, Processes(Path(tmp)) as procs:
        gw = await start(procs, "1e9")
        pid = gw.proc.pid
        url = gw.proc.url + "/v1/chat/completions"
        bodies = itertools.cycle([chat(64), chat(16, stream=False)])  # half streaming
        requests = errors = 0
        duration = args.minutes * 60
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()
        end = t0 + duration

        async def worker(session: aiohttp.ClientSession) -> None:
            nonlocal requests, errors
            while time.monotonic() < end:
                try:
                    async with session.post(url, data=next(bodies), headers=HEADERS) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                requests += ok
                errors += not ok

        async def sample() -> None:
            while (now := time.monotonic()) < end:
                samples.append((now - t0, rss_mb(pid)))
                await asyncio.sleep(args.interval)

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(sample(), *(worker(session) for _ in range(args.concurrency)))
        samples.append((time.monotonic() - t0, rss_mb(pid)))
        return SoakResult(args.minutes, requests, errors, samples, args.warmup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench_memory", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("streams", help="RSS with many concurrent open streams")
    s.add_argument("--streams", type=int, default=2000)
    s.add_argument("--wave", type=int, default=200, help="streams opened every half second")
    s.add_argument("--max-tokens", type=int, default=300)
    s.add_argument("--time-scale", default="0.05", help="backends' --time-scale")
    k = sub.add_parser("soak", help="RSS slope under steady load")
    k.add_argument("--minutes", type=float, default=10.0)
    k.add_argument("--concurrency", type=int, default=32)
    k.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    k.add_argument("--warmup", type=float, default=60.0, help="seconds left out of the slope")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    if args.mode == "streams":
        streams = run_loop(run_streams(args))
        print(streams.report())
        return 0 if not streams.errors else 1
    soak = run_loop(run_soak(args))
    print(soak.report())
    return 0 if not soak.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
