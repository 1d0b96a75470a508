"""Real-clock fidelity: does a client see the emulated device's schedule?

Starts one ``pdgate backend`` process per scenario and streams from it over HTTP, measuring on
the client side:

* ``dense``: 256 concurrent streams on an H100 serving Llama 3.1 8B (about 13 ms per decode
  step at that batch). Measured over the window in which all streams are decoding together
  (after the last stream's first token, before the first stream's last): each stream's
  inter-token latency (window length / tokens it received in the window), p50 over streams,
  against the engine's step time for 256 sequences at the window's mean context. Per-chunk
  gaps are also reported, but a client that reads several buffered events at once sees gaps
  near zero followed by a long one, so they say more about the client than the device.
* ``wafer``: Cerebras WSE-3 serving Llama 3.1 8B, about 0.56 ms per token per stream. Python
  cannot deliver one SSE event per token at that pace for many streams, so the server coalesces
  whatever the engine produced since the client last read. Reported: per-stream token rate
  against ``1 / latency`` and tokens per chunk.

Usage::

    python loadtests/bench_fidelity.py                 # both scenarios
    python loadtests/bench_fidelity.py dense --streams 256 --tokens 300
    python loadtests/bench_fidelity.py wafer --streams 16 --tokens 3000

Measurements, not assertions: the numbers go to stdout as JSON lines and into the notes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from backends.emulator.catalog import Catalog
from backends.emulator.timing import StepShape

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 64  # `prompt` as token ids: exactly this many tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_backend(device: str, model: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "gateway.cli", "backend", "--device", device, "--model", model,
           "--port", str(port), "--log-level", "warning", *extra]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


async def wait_ready(base: str, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError(f"backend exited with {proc.returncode}")
            try:
                if (await client.get(base + "/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("backend did not become ready")


async def stream(
    client: httpx.AsyncClient, base: str, model: str, tokens: int, seed: int
) -> list[tuple[float, int]]:
    """(arrival time, tokens) of every chunk after the first."""
    body = {
        "model": model,
        "prompt": list(range(PROMPT_TOKENS)),
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "seed": seed,
    }
    chunks: list[tuple[float, int]] = []
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            text = "".join(c.get("text", "") for c in data.get("choices", []))
            n = len(text.split())  # synthetic text: one word per token
            if n:
                chunks.append((time.perf_counter(), n))
    return chunks


def window(results: list[list[tuple[float, int]]]) -> tuple[float, float]:
    """(after every stream's first token, before any stream's last token), 1 s margins."""
    start = max(c[0][0] for c in results) + 1.0
    stop = min(c[-1][0] for c in results) - 1.0
    return start, stop


def window_itl(chunks: list[tuple[float, int]], start: float, stop: float) -> float:
    tokens = sum(n for t, n in chunks if start <= t < stop)
    return (stop - start) / tokens if tokens else float("nan")


def itl_samples(chunks: list[tuple[float, int]]) -> tuple[list[float], list[int]]:
    gaps, weights = [], []
    for (t0, _), (t1, n) in itertools.pairwise(chunks):
        gaps.append((t1 - t0) / n)
        weights.append(n)
    return gaps, weights


def weighted_median(values: list[float], weights: list[int]) -> float:
    pairs = sorted(zip(values, weights, strict=True))
    half, acc = sum(weights) / 2, 0
    for v, w in pairs:
        acc += w
        if acc >= half:
            return v
    return pairs[-1][0]


async def run(scenario: str, streams: int, tokens: int) -> dict[str, object]:
    catalog = Catalog.load()
    if scenario == "dense":
        device, model, extra = "h100-sxm", "llama-3.1-8b", ["--max-num-seqs", str(streams)]
    else:
        device, model, extra = "cerebras-wse-3", "llama-3.1-8b", []
    dep = catalog.deployment(device, model)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_backend(device, model, port, *extra)
    try:
        await wait_ready(base, proc)
        limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            await stream(client, base, model, 4, 0)  # warm up
            t0 = time.perf_counter()
            results = await asyncio.gather(
                *(stream(client, base, model, tokens, i) for i in range(streams))
            )
            wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    gaps: list[float] = []
    weights: list[int] = []
    for chunks in results:
        g, w = itl_samples(chunks)
        gaps += g
        weights += w
    delivered = sum(n for chunks in results for _, n in chunks)
    start, stop = window(results)
    per_stream_itl = [window_itl(c, start, stop) for c in results]
    measured = statistics.median(per_stream_itl)
    # The window's context: tokens the median stream had received by its middle.
    middle = (start + stop) / 2
    context = PROMPT_TOKENS + statistics.median(
        sum(n for t, n in c if t < middle) + 1 for c in results
    )
    schedule = dep.step_time(StepShape.of([(1, round(context))] * streams))
    per_stream = [(sum(n for _, n in c[1:]) / (c[-1][0] - c[0][0])) for c in results if len(c) > 2]
    return {
        "scenario": scenario,
        "device": device,
        "model": model,
        "streams": streams,
        "tokens_per_stream": tokens,
        "window_s": stop - start,
        "first_token_s": [min(c[0][0] for c in results) - t0, max(c[0][0] for c in results) - t0],
        "last_token_s": [min(c[-1][0] for c in results) - t0, max(c[-1][0] for c in results) - t0],
        "schedule_itl_s": schedule,
        "client_p50_itl_s": measured,
        "p50_error": measured / schedule - 1,
        "client_p90_itl_s": statistics.quantiles(per_stream_itl, n=10)[-1],
        "chunk_gap_p50_s": weighted_median(gaps, weights),
        "tokens_per_chunk": delivered / sum(len(c) for c in results),
        "stream_tokens_per_s_median": statistics.median(per_stream),
        "schedule_tokens_per_s": 1 / schedule,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="*", default=["dense", "wafer"])
    parser.add_argument("--streams", type=int)
    parser.add_argument("--tokens", type=int)
    args = parser.parse_args()
    defaults = {"dense": (256, 1000), "wafer": (16, 8000)}
    for scenario in args.scenario:
        streams, tokens = defaults[scenario]
        result = asyncio.run(run(scenario, args.streams or streams, args.tokens or tokens))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
