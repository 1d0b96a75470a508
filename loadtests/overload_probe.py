"""Overload probe: many long streams at once on one gateway, and whether the gateway calls a busy
worker broken.

Starts ``pdgate serve`` with a config (the embedded default unless ``--config``), opens
``--streams`` concurrent chat streams asking for ``--max-tokens`` each under a deadline of
``--deadline`` seconds (``X-PDGate-Timeout``), polls ``/ready`` once a second meanwhile, and
reports how the streams ended, what ``/ready`` answered, and the workers' circuit states and
retries at the end. A busy worker that keeps producing must stay in rotation: streams end by
their deadline (or finish), circuits stay closed, ``/ready`` stays 200.

    python -m loadtests.overload_probe [--streams 100] [--max-tokens 30000] [--deadline 45]

Loopback only; bounded by ``--deadline`` (plus start-up).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson
import yaml

from gateway.settings import default_config_path
from loadtests.bench_gateway import MODEL, Processes, free_port, gateway_argv


async def _one(client: httpx.AsyncClient, url: str, max_tokens: int, deadline: float) -> str:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    headers = {"X-PDGate-Timeout": str(deadline)}
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        data = await r.aread()
        if r.status_code != 200:
            return f"{r.status_code} {orjson.loads(data)['error']['code']}"
    if data.endswith(b"data: [DONE]\n\n"):
        return "finished"
    last = data.rstrip().rsplit(b"\n", 1)[-1].removeprefix(b"data: ")
    return "stream ended: " + str(orjson.loads(last)["error"]["code"])


async def probe(url: str, streams: int, max_tokens: int, deadline: float) -> str:
    ready: Counter[int] = Counter()
    done = asyncio.Event()

    async def poll() -> None:
        async with httpx.AsyncClient() as c:
            while not done.is_set():
                ready[(await c.get(url + "/ready")).status_code] += 1
                await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=streams + 10)
    async with httpx.AsyncClient(timeout=deadline + 30, limits=limits) as client:
        poller = asyncio.create_task(poll())
        started = time.monotonic()
        ends = await asyncio.gather(
            *(_one(client, url, max_tokens, deadline) for _ in range(streams))
        )
        elapsed = time.monotonic() - started
        done.set()
        await poller
        metrics = (await client.get(url + "/metrics")).text
    state = [
        line
        for line in metrics.splitlines()
        if line.startswith(("pdgate_worker_circuit_state{", "pdgate_retries_total{"))
    ]
    return "\n".join(
        [
            f"{streams} streams × max_tokens {max_tokens}, deadline {deadline:g} s, "
            f"over in {elapsed:.0f} s",
            f"ends: {dict(Counter(ends))}",
            f"/ready: {dict(ready)}",
            *state,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.overload_probe", description=__doc__)
    parser.add_argument("--config", type=Path, default=default_config_path())
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=30000)
    parser.add_argument("--deadline", type=float, default=45.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pdgate-probe-") as tmp, Processes(Path(tmp)) as procs:
        data = yaml.safe_load(args.config.read_text())
        path = Path(tmp) / "pdgate.yaml"
        path.write_text(yaml.safe_dump(data))
        port = free_port()
        gw = procs.start("gateway", gateway_argv(path, port), port)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(gw.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if gw.popen.poll() is not None or time.monotonic() > deadline:
                print(gw.exited(), file=sys.stderr)
                return 1
            time.sleep(0.1)
        print(asyncio.run(probe(gw.url, args.streams, args.max_tokens, args.deadline)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
