"""Chaos soak: faults under mixed traffic, and proof that no request is lost and nothing leaks.

Two gateway replicas share a real ``redis-server``; in front of two prefill (H100) and two
decode (Groq LPU) ``pdgate backend`` processes (vLLM handshake). A closed loop of mixed traffic
— chat and completions, streamed and not, a share of requests that are the client's error
(a context longer than the decode instances hold: the upstream's 400; a string where
``max_tokens`` needs an integer: the gateway's 400) and of streams the client abandons after
their first event — runs for the whole soak while a schedule goes through these phases:

=================  =============================================================================
baseline           nothing injected
upstream_5xx       decode-0 answers 500 to half its requests (``/admin/faults``)
slow_worker        prefill-1 runs 30× slower
kill_decode        decode-1 is killed (SIGKILL); restarted on its port when the phase ends
stop_prefill       prefill-0 is stopped (SIGSTOP); continued when the phase ends
redis_down         redis-server is killed; restarted when the phase ends
client_errors      half the requests are the client's error
disconnects        half the streams are abandoned by their client after the first event
recovery           nothing injected
=================  =============================================================================

Every request is classified by what its client saw: ``ok``; the client's error (a 4xx it
caused); ``429`` (back-pressure); a worker failure (5xx, or a stream that ended with an error
event); ``disconnected`` (the client left on purpose); or ``lost`` — no answer at all (a reset
connection or a hung request). A client's request answered 5xx, or a good request answered
4xx, is *misattributed*. After the traffic stops and held KV leases run out, every gateway must
report no leg in flight and no admitted request, every backend no running or waiting request
and no KV in use; each gateway's resident memory is compared between the end of the first phase
and the end of the soak.

    python -m loadtests.chaos [--minutes 5] [--concurrency 8] [--max-rss-growth-mb 40]

Prints one table row per phase and the checks; exits 1 if a request was lost or misattributed,
a count was stuck, or memory grew past the limit. Everything runs on 127.0.0.1 and stops on
exit, error or Ctrl-C. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from loadtests.bench_gateway import (
    MODEL,
    Proc,
    Processes,
    backend_argv,
    exit_on_sigterm,
    free_port,
    gateway_argv,
    rss_mb,
    run_loop,
    wait_healthy,
    wait_serving,
)

TOKEN = "chaos-control-token-0123456789"
PHASES = (
    "baseline",
    "upstream_5xx",
    "slow_worker",
    "kill_decode",
    "stop_prefill",
    "redis_down",
    "client_errors",
    "disconnects",
    "recovery",
)
CLIENT_KINDS = frozenset({"too_long", "bad_type"})
KV_LEASE_S = 4.0  # held KV abandoned by a failed handoff is freed after this


# -- the cluster -------------------------------------------------------------------------------


@dataclass
class Cluster:
    procs: Processes
    prefill: list[Proc]
    decode: list[Proc]
    gateways: list[Proc]
    redis: Proc
    redis_argv: list[str]

    @property
    def backends(self) -> list[Proc]:
        return [*self.prefill, *self.decode]


def _redis_argv(port: int, workdir: Path) -> list[str]:
    return [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(workdir),
    ]  # fmt: skip


def _backend(procs: Processes, name: str, role: str, device: str, port: int) -> Proc:
    argv = backend_argv(
        port, role, "--time-scale", "2", "--enable-faults", "--kv-lease", str(KV_LEASE_S),
        device=device,
    )  # fmt: skip
    return procs.start(name, argv, port)


def _config(prefill: list[Proc], decode: list[Proc], redis_port: int) -> dict[str, Any]:
    def pool(ps: list[Proc]) -> dict[str, Any]:
        workers = [{"type": "http", "protocol": "vllm-nixl", "url": p.url} for p in ps]
        return {"policy": "least_loaded", "workers": workers}

    return {
        "server": {"log_level": "warning", "request_timeout_s": 20},
        "state": {"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0"},
        "health_checks": {"interval_s": 1.0, "timeout_s": 1.0},
        "admission": {"max_in_flight": 64, "max_queue": 64},
        "models": [
            {
                "name": MODEL,
                "mode": "disaggregated",
                "timeouts": {"prefill_s": 3, "decode_first_token_s": 5, "decode_idle_s": 3},
                "retries": {"prefill": 2, "decode": 1, "backoff_s": 0.02},
                "circuit": {"failure_threshold": 3, "cooldown_s": 2},
                "pools": {"prefill": pool(prefill), "decode": pool(decode)},
            }
        ],
    }


async def start(procs: Processes) -> Cluster:
    redis_port = free_port()
    redis_argv = _redis_argv(redis_port, procs.logs)
    redis = procs.start("redis", redis_argv, redis_port)
    prefill = [
        _backend(procs, f"prefill-{i}", "prefill", "h100-sxm", free_port()) for i in range(2)
    ]
    decode = [
        _backend(procs, f"decode-{i}", "decode", "groq-lpu-v1", free_port()) for i in range(2)
    ]
    path = procs.logs / "gateway.yaml"
    path.write_text(yaml.safe_dump(_config(prefill, decode, redis_port)))
    ports = (free_port(), free_port())
    gateways = [procs.start(f"gateway-{i}", gateway_argv(path, p), p) for i, p in enumerate(ports)]
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(wait_healthy(session, p) for p in prefill + decode))
        await asyncio.gather(*(wait_serving(session, g) for g in gateways))
    return Cluster(procs, prefill, decode, gateways, redis, redis_argv)


# -- faults -------------------------------------------------------------------------------------


async def _faults(session: aiohttp.ClientSession, proc: Proc, **faults: Any) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session.post(proc.url + "/admin/faults", json=faults, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"{proc.name}: /admin/faults answered {r.status}: {await r.text()}")


def _restart(cluster: Cluster, proc: Proc, argv: list[str]) -> Proc:
    if proc.popen.poll() is None:
        proc.popen.kill()
        proc.popen.wait()
    cluster.procs.procs.remove(proc)
    return cluster.procs.start(proc.name, argv, proc.port)


Fault = tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]


def schedule(cluster: Cluster, session: aiohttp.ClientSession) -> dict[str, Fault]:
    """Each phase's (inject, repair)."""
    p0, p1 = cluster.prefill
    d0, d1 = cluster.decode

    async def nothing() -> None:
        return None

    async def kill_decode() -> None:
        d1.popen.kill()

    async def restart_decode() -> None:
        fresh = _restart(cluster, d1, d1.popen.args)  # type: ignore[arg-type]
        cluster.decode[1] = fresh
        await wait_healthy(session, fresh)

    async def stop_prefill() -> None:
        os.kill(p0.pid, signal.SIGSTOP)

    async def continue_prefill() -> None:
        os.kill(p0.pid, signal.SIGCONT)

    async def kill_redis() -> None:
        cluster.redis.popen.kill()

    async def restart_redis() -> None:
        cluster.redis = _restart(cluster, cluster.redis, cluster.redis_argv)

    return {
        "upstream_5xx": (
            lambda: _faults(session, d0, fail_rate=0.5),
            lambda: _faults(session, d0, fail_rate=0.0),
        ),
        "slow_worker": (
            lambda: _faults(session, p1, slowdown=30.0),
            lambda: _faults(session, p1, slowdown=1.0),
        ),
        "kill_decode": (kill_decode, restart_decode),
        "stop_prefill": (stop_prefill, continue_prefill),
        "redis_down": (kill_redis, restart_redis),
        "baseline": (nothing, nothing),
        "client_errors": (nothing, nothing),
        "disconnects": (nothing, nothing),
        "recovery": (nothing, nothing),
    }


# -- traffic ------------------------------------------------------------------------------------

PROMPT = "Explain what disaggregated prefill and decode serving changes for latency. " * 4


@dataclass
class Tally:
    """What the clients saw in one phase."""

    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    misattributed: list[str] = field(default_factory=list)


def _kind(rng: random.Random, phase: str) -> str:
    bad = 0.5 if phase == "client_errors" else 0.1
    leave = 0.5 if phase == "disconnects" else 0.1
    x = rng.random()
    if x < bad:
        return rng.choice(("too_long", "bad_type"))
    if x < bad + leave:
        return "disconnect"
    return "ok"


def _body(rng: random.Random, kind: str) -> tuple[str, dict[str, Any]]:
    chat = rng.random() < 0.5
    stream = kind == "disconnect" or rng.random() < 0.6
    # Mostly short answers, some long ones: a fault then lands mid-stream too.
    max_tokens = rng.randint(200, 400) if rng.random() < 0.15 else rng.randint(4, 48)
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": stream}
    if kind == "too_long":
        body["max_tokens"] = 100_000  # more than a decode instance holds: its 400
    elif kind == "bad_type":
        body["max_tokens"] = "8"  # a string: the gateway's own 400
    if chat:
        body["messages"] = [{"role": "user", "content": PROMPT}]
        return "/v1/chat/completions", body
    body["prompt"] = PROMPT
    return "/v1/completions", body


_STREAM_ERROR = re.compile(rb'data: \{"error":\{[^\n]*"code":"?([a-z_]*)')


async def _one(session: aiohttp.ClientSession, url: str, kind: str, rng: random.Random) -> str:
    """One request's outcome, as its client saw it."""
    path, body = _body(rng, kind)
    timeout = aiohttp.ClientTimeout(total=40)  # the gateway's deadline is 20 s
    try:
        async with session.post(url + path, data=orjson.dumps(body), timeout=timeout,
                                headers={"content-type": "application/json"}) as r:  # fmt: skip
            if r.status != 200:
                await r.read()
                return str(r.status)
            if kind == "disconnect":
                await r.content.readany()
                r.close()  # the client leaves mid-stream
                return "disconnected"
            data = await r.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"lost:{type(exc).__name__}"
    if body["stream"]:
        failed = _STREAM_ERROR.search(data)
        if failed:
            return f"stream_error:{failed.group(1).decode()}"
        return "ok" if data.endswith(b"data: [DONE]\n\n") else "lost:truncated"
    return "ok"


FAULTLESS = frozenset({"baseline", "client_errors", "disconnects", "recovery"})


def _misattributed(kind: str, outcome: str, phase: str) -> bool:
    """A good request blamed on its client (a 4xx other than 429), or a client's error blamed
    on a worker (a 5xx while no worker is faulty)."""
    status = int(outcome) if outcome.isdigit() else None
    client_error = status is not None and 400 <= status < 500 and status != 429
    worker_error = outcome.startswith("stream_error") or (status is not None and status >= 500)
    if kind in CLIENT_KINDS:
        return worker_error and phase in FAULTLESS
    return client_error


async def traffic(
    cluster: Cluster, phase: list[str], stop: asyncio.Event, tallies: dict[str, Tally], seed: int
) -> None:
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        i = seed
        while not stop.is_set():
            name = phase[0]
            kind = _kind(rng, name)
            gateway = cluster.gateways[i % len(cluster.gateways)]
            i += 1
            tally = tallies[name]
            tally.sent += 1
            outcome = await _one(session, gateway.url, kind, rng)
            label = "client_error" if kind in CLIENT_KINDS and outcome.startswith("4") else outcome
            tally.outcomes[label] += 1
            if _misattributed(kind, outcome, name):
                tally.misattributed.append(f"{kind} → {outcome}")


# -- checks -------------------------------------------------------------------------------------


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def leftovers(cluster: Cluster, session: aiohttp.ClientSession) -> dict[str, float]:
    """Counts that must be zero once traffic stopped and leases ran out."""
    out: dict[str, float] = {}
    for g in cluster.gateways:
        async with session.get(g.url + "/metrics") as r:
            text = await r.text()
        out[f"{g.name} legs in flight"] = _metric(text, "pdgate_worker_in_flight")
        out[f"{g.name} admitted in flight"] = _metric(text, "pdgate_admitted_in_flight")
    for b in cluster.backends:
        async with session.get(b.url + "/metrics") as r:
            text = await r.text()
        out[f"{b.name} running"] = _metric(text, "vllm:num_requests_running")
        out[f"{b.name} waiting"] = _metric(text, "vllm:num_requests_waiting")
        out[f"{b.name} KV in use"] = _metric(text, "vllm:kv_cache_usage_perc")
    return out


# -- the soak -----------------------------------------------------------------------------------


@dataclass
class Result:
    phase_s: float
    tallies: dict[str, Tally]
    leftovers: dict[str, float]
    rss_start_mb: dict[str, float]
    rss_end_mb: dict[str, float]

    def lost(self) -> int:
        return sum(
            n for t in self.tallies.values() for o, n in t.outcomes.items() if o.startswith("lost")
        )

    def misattributed(self) -> int:
        return sum(len(t.misattributed) for t in self.tallies.values())

    def rss_growth_mb(self) -> float:
        return max(self.rss_end_mb[k] - self.rss_start_mb[k] for k in self.rss_start_mb)

    def table(self) -> str:
        columns = ["ok", "client_error", "429", "502", "503", "504", "stream_error", "disconnected"]
        head = "| phase | sent | " + " | ".join(columns) + " | lost | misattributed |"
        rows = [head, "|---" + "|---:" * (len(columns) + 3) + "|"]
        for name in PHASES:
            t = self.tallies[name]
            counts = Counter[str]()
            for outcome, n in t.outcomes.items():
                key = "stream_error" if outcome.startswith("stream_error") else outcome
                key = "lost" if key.startswith("lost") else key
                counts[key] += n
            cells = [str(counts.pop(c, 0)) for c in columns]
            lost = counts.pop("lost", 0)
            other = f" (+{dict(counts)})" if counts else ""
            rows.append(
                f"| {name} | {t.sent} | " + " | ".join(cells)
                + f" | {lost} | {len(t.misattributed)}{other} |"
            )  # fmt: skip
        return "\n".join(rows)

    def report(self) -> str:
        stuck = {k: v for k, v in self.leftovers.items() if v}
        rss = ", ".join(
            f"{k} {self.rss_start_mb[k]:.0f} → {self.rss_end_mb[k]:.0f} MB"
            for k in self.rss_start_mb
        )
        return "\n".join(
            [
                f"phases of {self.phase_s:.0f} s each",
                "",
                self.table(),
                "",
                f"lost without an answer: {self.lost()}",
                f"misattributed: {self.misattributed()}",
                f"stuck counts: {stuck or 'none'} (checked {len(self.leftovers)})",
                f"gateway RSS: {rss}",
            ]
        )


async def soak(seconds: float, concurrency: int, logs: Path) -> Result:
    """Run the soak (see the module docstring) with the processes' logs in ``logs``."""
    previous = os.environ.get("PDGATE_CONTROL_TOKEN")
    os.environ["PDGATE_CONTROL_TOKEN"] = TOKEN  # inherited by every process started below
    try:
        return await _soak(seconds, concurrency, logs)
    finally:
        if previous is None:
            del os.environ["PDGATE_CONTROL_TOKEN"]
        else:
            os.environ["PDGATE_CONTROL_TOKEN"] = previous


async def _soak(seconds: float, concurrency: int, logs: Path) -> Result:
    phase_s = seconds / len(PHASES)
    with Processes(logs) as procs:
        cluster = await start(procs)
        tallies = {name: Tally() for name in PHASES}
        phase = [PHASES[0]]
        stop = asyncio.Event()
        rss_start: dict[str, float] = {}
        # A connection per call: a fault call may come after the backend closed an idle one.
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as session:
            faults = schedule(cluster, session)
            clients = [
                asyncio.create_task(traffic(cluster, phase, stop, tallies, seed))
                for seed in range(concurrency)
            ]
            try:
                for name in PHASES:
                    phase[0] = name
                    inject, repair = faults[name]
                    await inject()
                    await asyncio.sleep(phase_s)
                    await repair()
                    if name == PHASES[0]:
                        rss_start = {g.name: rss_mb(g.pid) for g in cluster.gateways}
            finally:
                stop.set()
                await asyncio.gather(*clients, return_exceptions=True)
            await asyncio.sleep(KV_LEASE_S + 3.0)  # abandoned KV leases run out
            left = await leftovers(cluster, session)
            rss_end = {g.name: rss_mb(g.pid) for g in cluster.gateways}
    return Result(phase_s, tallies, left, rss_start, rss_end)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.chaos", description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, help="overrides --minutes")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-rss-growth-mb", type=float, default=40.0)
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    exit_on_sigterm()
    logs = Path(tempfile.mkdtemp(prefix="pdgate-chaos-"))
    result = run_loop(soak(seconds, args.concurrency, logs))
    print(result.report())
    failures = []
    if result.lost():
        failures.append(f"{result.lost()} requests lost without an answer")
    if result.misattributed():
        examples = [m for t in result.tallies.values() for m in t.misattributed][:5]
        failures.append(f"{result.misattributed()} misattributed: {examples}")
    stuck = {k: v for k, v in result.leftovers.items() if v}
    if stuck:
        failures.append(f"stuck counts: {stuck}")
    if result.rss_growth_mb() > args.max_rss_growth_mb:
        failures.append(f"gateway RSS grew {result.rss_growth_mb():.0f} MB")
    for failure in failures:
        print("FAIL:", failure)
    if failures or args.keep_logs:
        print(f"logs: {logs}")
    else:
        with contextlib.suppress(OSError):
            for f in logs.iterdir():
                f.unlink()
            logs.rmdir()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
