"""How much does the gateway cost? Throughput, latency and CPU, against the backends directly
and against the Rust P/D routers, in one run on one machine.

Starts 2 prefill + 2 decode ``pdgate backend`` instances with device timing off
(``--time-scale 1e9``: every step is instant, so whatever sits in front of them is the
bottleneck), the gateway in front of them (disaggregated, vLLM's NIXL handshake; and a second
one speaking SGLang's bootstrap handshake), ``sglang-router`` and ``vllm-router`` when they are
installed, then drives each target with a closed-loop aiohttp load generator for ``--duration``
seconds per scenario:

* ``c1``, ``c16``, ``c64`` — non-streaming 16-token completions at concurrency 1, 16 and 64;
* ``stream64`` — streaming chat, 256 tokens, 64 concurrent streams;
* then ``c1`` in turns (``--turns`` rounds of one request to each target in rotation): the
  latency a router adds at concurrency 1, measured on the same machine moment as its
  reference (see :class:`Turns`).

Targets (rows of the table):

* ``direct`` — one plain request straight to a decode instance (round robin over both): a
  single leg, no P/D handshake — the floor any router is measured against;
* ``direct-pd`` — the load generator runs vLLM's two legs itself (prefill with
  ``max_tokens: 1`` and ``do_remote_decode``, then decode with the answered
  ``kv_transfer_params``): the same backend work as behind a router, with no router;
* ``pdgate`` — the gateway, ``protocol: vllm-nixl``; ``pdgate-sglang`` — ``sglang-bootstrap``;
* ``sglang-router``, ``vllm-router`` — the PyPI Rust routers in P/D mode, round robin.

For each: requests/s, tokens/s, p50/p99 latency and TTFT (the first token's arrival; for
non-streaming requests, the whole response), and CPU milliseconds per request of the router
process (``utime + stime`` from ``/proc``, process tree included, over the measured window) and
of the four backends together. Everything shares the machine's cores, so absolute numbers
depend on it; compare rows of one run.

    python -m loadtests.bench_gateway                     # 15 s per scenario and target
    python -m loadtests.bench_gateway --duration 5 --targets direct,pdgate,sglang-router
    python -m loadtests.bench_gateway --quick             # a couple of seconds each, for CI
    python -m loadtests.bench_gateway --json out.json --profile prof/   # py-spy per scenario

Linux only (``/proc``). Every process it starts is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import yaml

MODEL = "llama-3.1-8b"
PROMPT = "Explain prefill/decode disaggregation and the KV cache handoff in one paragraph."
BIN = Path(sys.executable).parent
T = TypeVar("T")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Scenario:
    name: str
    api: str  # "completions" or "chat"
    stream: bool
    max_tokens: int
    concurrency: int


SCENARIOS = (
    Scenario("c1", "completions", False, 16, 1),
    Scenario("c16", "completions", False, 16, 16),
    Scenario("c64", "completions", False, 16, 64),
    Scenario("stream64", "chat", True, 256, 64),
)
TARGETS = ("direct", "direct-pd", "pdgate", "pdgate-sglang", "sglang-router", "vllm-router")
ROUTERS = {
    "vllm-router": [str(BIN / "vllm-router")],
    "sglang-router": [sys.executable, "-m", "sglang_router.launch_router"],
}


# -- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path
    bootstrap_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> str:
        return f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}"

    def log_tail(self, size: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-size:]


class Processes:
    """Starts processes with their output in ``logs``; stops every one of them on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], port: int, **kw: Any) -> Proc:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"},
                start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
            )
        proc = Proc(name, popen, port, log_path, **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        self.procs.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def backend_argv(port: int, role: str, *extra: str, device: str = "h100-sxm") -> list[str]:
    return [
        sys.executable, "-m", "gateway.cli", "backend", "--device", device, "--model", MODEL,
        "--role", role, "--port", str(port), "--log-level", "warning", *extra,
    ]  # fmt: skip


def gateway_config(
    protocol: str, prefill: list[Proc], decode: list[Proc], **worker: Any
) -> dict[str, Any]:
    def spec(p: Proc) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "http", "protocol": protocol, "url": p.url, **worker}
        if protocol == "sglang-bootstrap":
            out["bootstrap_port"] = p.bootstrap_port
        return out

    return {
        "server": {"log_level": "warning", "access_log": False},
        "models": [
            {
                "name": MODEL,
                "mode": "disaggregated",
                "pools": {
                    "prefill": {"policy": "round_robin", "workers": [spec(p) for p in prefill]},
                    "decode": {"policy": "round_robin", "workers": [spec(p) for p in decode]},
                },
            }
        ],
    }


def gateway_argv(config_path: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path),
        "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip


def router_argv(kind: str, port: int, prefill: list[Proc], decode: list[Proc]) -> list[str]:
    argv = [*ROUTERS[kind], "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--prometheus-port", str(free_port()), "--policy", "round_robin"]
    argv += ["--worker-startup-check-interval", "1"]  # register the backends within a second
    if kind == "vllm-router":
        argv += ["--vllm-pd-disaggregation", "--kv-connector", "nixl", "--log-level", "warning"]
        for p in prefill:
            argv += ["--prefill", p.url]
    else:
        argv += ["--pd-disaggregation", "--log-level", "warn"]
        for p in prefill:
            argv += ["--prefill", p.url, str(p.bootstrap_port)]
    for d in decode:
        argv += ["--decode", d.url]
    return argv


def router_installed(kind: str) -> str | None:
    """None if the router is installed, else why it is not in the table."""
    if kind == "vllm-router":
        return None if Path(ROUTERS[kind][0]).exists() else "not installed"
    return None if importlib.util.find_spec("sglang_router") else "not installed"


async def wait_serving(session: aiohttp.ClientSession, proc: Proc, limit_s: float = 90.0) -> None:
    """Until one completion goes through (routers register their workers in the background)."""
    deadline = time.monotonic() + limit_s
    body = {"model": MODEL, "prompt": "ping", "max_tokens": 2}
    while True:
        if proc.popen.poll() is not None:
            raise RuntimeError(proc.exited())
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            timeout = aiohttp.ClientTimeout(total=5)
            async with session.post(proc.url + "/v1/completions", json=body, timeout=timeout) as r:
                await r.read()
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} never served a request:\n{proc.log_tail()}")
        await asyncio.sleep(0.2)


async def wait_healthy(session: aiohttp.ClientSession, proc: Proc, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        if proc.popen.poll() is not None:
            raise RuntimeError(proc.exited())
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(proc.url + "/health", timeout=aiohttp.ClientTimeout(2)) as r:
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} not healthy after {limit_s} s:\n{proc.log_tail()}")
        await asyncio.sleep(0.1)


# -- /proc ------------------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of these processes and their descendants, in seconds."""
    ticks = 0
    for root in pids:
        for pid in _tree(root):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE / 2**20


# -- load generator ---------------------------------------------------------------------------

_TOKEN = re.compile(rb'"(?:content|text)":"[^"]')  # an event carrying text
_COMPLETION = re.compile(rb'"completion_tokens":(\d+)')


@dataclass
class Sample:
    latency: float
    ttft: float
    tokens: int


class Failed(Exception):
    pass


Send = Callable[[int], Awaitable[Sample]]


def body(scenario: Scenario) -> dict[str, Any]:
    out: dict[str, Any] = {"model": MODEL, "max_tokens": scenario.max_tokens}
    if scenario.api == "chat":
        out["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        out["prompt"] = PROMPT
    if scenario.stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def path(scenario: Scenario) -> str:
    return "/v1/chat/completions" if scenario.api == "chat" else "/v1/completions"


async def _read(resp: aiohttp.ClientResponse, started: float, stream: bool) -> Sample:
    """The response, timed: TTFT at the first event carrying text, tokens from ``usage``."""
    if resp.status != 200:
        raise Failed(f"{resp.status}: {(await resp.read())[:300]!r}")
    if not stream:
        data = orjson.loads(await resp.read())
        now = time.perf_counter()
        return Sample(now - started, now - started, int(data["usage"]["completion_tokens"]))
    ttft = 0.0
    tail = b""
    async for part in resp.content.iter_any():
        if not ttft and _TOKEN.search(part):
            ttft = time.perf_counter() - started
        tail = (tail + part)[-4096:]
    latency = time.perf_counter() - started
    if not tail.endswith(b"data: [DONE]\n\n"):
        raise Failed(f"stream ended without [DONE]: {tail[-300:]!r}")
    tokens = [int(m) for m in _COMPLETION.findall(tail)]
    return Sample(latency, ttft or latency, tokens[-1] if tokens else 0)


def plain_sender(session: aiohttp.ClientSession, urls: list[str], scenario: Scenario) -> Send:
    """One request to the next of ``urls`` (round robin)."""
    payload = orjson.dumps(body(scenario))
    targets = itertools.cycle([u + path(scenario) for u in urls])
    headers = {"content-type": "application/json"}

    async def send(_: int) -> Sample:
        started = time.perf_counter()
        async with session.post(next(targets), data=payload, headers=headers) as resp:
            return await _read(resp, started, scenario.stream)

    return send


def pd_sender(
    session: aiohttp.ClientSession, prefill: list[str], decode: list[str], scenario: Scenario
) -> Send:
    """vLLM's two legs, run by the client: what a NIXL P/D router does, minus the router."""
    base = body(scenario)
    first = {**base, "max_tokens": 1, "stream": False, "kv_transfer_params": {
        "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
        "remote_block_ids": None, "remote_host": None, "remote_port": None,
    }}  # fmt: skip
    first.pop("stream_options", None)
    prefill_payload = orjson.dumps(first)
    pairs = itertools.cycle(
        [(p + path(scenario), d + path(scenario)) for p, d in zip(prefill, decode, strict=True)]
    )
    headers = {"content-type": "application/json"}

    async def send(i: int) -> Sample:
        p_url, d_url = next(pairs)
        started = time.perf_counter()
        hdrs = {**headers, "x-request-id": f"bench-{i}-{started}"}
        async with session.post(p_url, data=prefill_payload, headers=hdrs) as resp:
            if resp.status != 200:
                raise Failed(f"prefill {resp.status}")
            ktp = orjson.loads(await resp.read())["kv_transfer_params"]
        payload = orjson.dumps({**base, "kv_transfer_params": ktp})
        async with session.post(d_url, data=payload, headers=hdrs) as resp:
            return await _read(resp, started, scenario.stream)

    return send


@dataclass
class Result:
    scenario: str
    target: str
    duration_s: float
    requests: int
    errors: int
    rps: float
    tokens_per_s: float
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    cpu_ms_per_req: float | None  # the router's (gateway's) process tree
    backend_cpu_ms_per_req: float
    loadgen_cpu_ms_per_req: float
    rss_mb: float | None
    error_kinds: dict[str, int] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def measure(
    send: Send,
    scenario: Scenario,
    target: str,
    *,
    duration: float,
    warmup: float,
    router_pid: int | None,
    backend_pids: list[int],
    profiler: Profiler | None = None,
) -> Result:
    """Closed loop: ``concurrency`` workers send back to back; the requests that finish
    inside the measured window count (throughput is completions per second of it), and CPU
    is read at its edges."""
    samples: list[Sample] = []
    errors: Counter[str] = Counter()
    counter = itertools.count()
    t_start = time.perf_counter() + warmup
    t_end = t_start + duration

    async def worker() -> None:
        while time.perf_counter() < t_end:
            try:
                sample = await send(next(counter))
            except (Failed, aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
                if t_start <= time.perf_counter() <= t_end:
                    errors[type(exc).__name__ + ": " + str(exc)[:120]] += 1
                continue
            if t_start <= time.perf_counter() <= t_end:  # finished inside the window
                samples.append(sample)

    async def mark() -> tuple[float, float, float]:
        await asyncio.sleep(warmup)
        if profiler is not None:
            profiler.start()
        before = (
            cpu_seconds([router_pid]) if router_pid else 0.0,
            cpu_seconds(backend_pids),
            time.process_time(),
        )
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        after = (
            cpu_seconds([router_pid]) if router_pid else 0.0,
            cpu_seconds(backend_pids),
            time.process_time(),
        )
        return after[0] - before[0], after[1] - before[1], after[2] - before[2]

    marker = asyncio.create_task(mark())
    await asyncio.gather(*(worker() for _ in range(scenario.concurrency)))
    router_cpu, backend_cpu, own_cpu = await marker
    if profiler is not None:
        profiler.stop()
    n = len(samples)
    per = 1000.0 / n if n else float("nan")
    latencies = [s.latency * 1000 for s in samples]
    ttfts = [s.ttft * 1000 for s in samples]
    return Result(
        scenario=scenario.name,
        target=target,
        duration_s=duration,
        requests=n,
        errors=sum(errors.values()),
        rps=n / duration,
        tokens_per_s=sum(s.tokens for s in samples) / duration,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        cpu_ms_per_req=router_cpu * per if router_pid else None,
        backend_cpu_ms_per_req=backend_cpu * per,
        loadgen_cpu_ms_per_req=own_cpu * per,
        rss_mb=rss_mb(router_pid) if router_pid else None,
        error_kinds=dict(errors),
    )


@dataclass
class Turns:
    """Concurrency 1 in turns: one request to each target, then the next round, so every
    target sees the machine as it is at that moment. Separate 15 s windows see it drift by tens
    of percent, which swamps the fraction of a millisecond a router adds; here that drift is
    shared, and the added latency is the median of per-round differences. What pairing cannot
    share is where the kernel placed each process on the cores: that biases a whole run, by a
    few tenths of a millisecond here, so compare several runs."""

    latencies_ms: dict[str, list[float]]  # target -> one latency per round

    def p50(self, target: str) -> float:
        return percentile(self.latencies_ms[target], 50)

    def added_ms(self, target: str, base: str) -> float:
        """Median over rounds of ``target``'s latency minus ``base``'s in the same round."""
        pairs = zip(self.latencies_ms[target], self.latencies_ms[base], strict=True)
        return statistics.median(t - b for t, b in pairs)

    def report(self, base: str) -> list[str]:
        rounds = len(next(iter(self.latencies_ms.values())))
        lines = [f"c1 in turns ({rounds} rounds), p50 ms: " + ", ".join(
            f"{t} {self.p50(t):.2f}" for t in self.latencies_ms
        )]  # fmt: skip
        if base in self.latencies_ms:
            lines += [
                f"c1 in turns, added latency vs {base} (median of paired rounds): "
                f"{t} {self.added_ms(t, base):+.2f} ms"
                for t in self.latencies_ms
                if t != base
            ]
        return lines


def client_session() -> aiohttp.ClientSession:
    """The load generator's client for one measurement.

    Each measurement opens its own: connections pooled by an earlier one sit idle while other
    targets are measured, and a server closes an idle keep-alive connection (uvicorn after
    5 s) just as a request may be written on it. A fresh pool never reuses such a one.
    """
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)  # a hung request is an error, not a hang
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def take_turns(senders: dict[str, Send], rounds: int, warmup: int = 50) -> Turns:
    """``rounds`` rounds of one request per target (first ``warmup`` rounds not kept); the
    order rotates each round, so no target always follows the same one."""
    names = list(senders)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sample = await senders[name](i)
            if i >= warmup:
                latencies[name].append(sample.latency * 1000)
    return Turns(latencies)


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Cluster:
    prefill: list[Proc]
    decode: list[Proc]
    fronts: dict[str, Proc]  # target name -> the process it sends to (gateways and routers)
    skipped: dict[str, str]  # target name -> why it is not in the table

    @property
    def backend_pids(self) -> list[int]:
        return [p.pid for p in self.prefill + self.decode]


# Device timing off: a billion times faster than the device, every step instant.
ZERO_LATENCY = ("--time-scale", "1e9")


async def start_cluster(
    procs: Processes, targets: Sequence[str], backend_args: Sequence[str] = ZERO_LATENCY
) -> Cluster:
    prefill = [
        procs.start(
            f"prefill-{i}",
            backend_argv(port, "prefill", *backend_args, "--bootstrap-port", str(bport)),
            port,
            bootstrap_port=bport,
        )
        for i, (port, bport) in enumerate((free_port(), free_port()) for _ in range(2))
    ]
    decode = [
        procs.start(
            f"decode-{i}",
            backend_argv(port, "decode", *backend_args, device="groq-lpu-v1"),
            port,
        )
        for i, port in enumerate(free_port() for _ in range(2))
    ]
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(wait_healthy(session, p) for p in prefill + decode))
        fronts: dict[str, Proc] = {}
        skipped: dict[str, str] = {}
        for target, protocol in (("pdgate", "vllm-nixl"), ("pdgate-sglang", "sglang-bootstrap")):
            if target in targets:
                port = free_port()
                config = procs.logs / f"{target}.yaml"
                config.write_text(yaml.safe_dump(gateway_config(protocol, prefill, decode)))
                fronts[target] = procs.start(target, gateway_argv(config, port), port)
        for kind in ROUTERS:
            if kind in targets:
                reason = router_installed(kind)
                if reason is not None:
                    skipped[kind] = reason
                    continue
                port = free_port()
                fronts[kind] = procs.start(kind, router_argv(kind, port, prefill, decode), port)
        serving = await asyncio.gather(
            *(wait_serving(session, p) for p in fronts.values()), return_exceptions=True
        )
        for (name, proc), outcome in zip(list(fronts.items()), serving, strict=True):
            if not isinstance(outcome, Exception):
                continue
            if name not in ROUTERS:  # the gateway must run; a router may not, on this machine
                raise outcome
            skipped[name] = f"did not start: {str(outcome)[-500:]}"
            del fronts[name]
            proc.popen.terminate()
    return Cluster(prefill, decode, fronts, skipped)


def make_sender(
    session: aiohttp.ClientSession, cluster: Cluster, target: str, scenario: Scenario
) -> Send:
    if target == "direct":
        return plain_sender(session, [d.url for d in cluster.decode], scenario)
    if target == "direct-pd":
        return pd_sender(
            session, [p.url for p in cluster.prefill], [d.url for d in cluster.decode], scenario
        )
    return plain_sender(session, [cluster.fronts[target].url], scenario)


class Profiler:
    """``py-spy record`` of one process over the measured window, as collapsed stacks
    (``NAME.txt``: one ``frame;frame;... count`` line per stack, what flame-graph tools
    read), summarised by :func:`profile_summary`."""

    def __init__(self, pid: int, path: Path, seconds: float, rate: int = 250) -> None:
        self._argv = [
            shutil.which("py-spy") or str(BIN / "py-spy"), "record", "--pid", str(pid),
            "--duration", str(max(1, round(seconds))), "--rate", str(rate), "--nonblocking",
            "--format", "raw", "-o", str(path),
        ]  # fmt: skip
        self.path = path
        self._run: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._run = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        if self._run is None:
            return
        try:
            self._run.wait(30)
        except subprocess.TimeoutExpired:
            self._run.kill()
            self._run.wait()


def profile_summary(path: Path, top: int = 25) -> str:
    """The hottest functions of a collapsed-stack profile: by own time and including callees."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    out = [f"{path.name}: {total} samples", "own time:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out.append("including callees:")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out)


def _frame(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:123)`` -> ``func (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.11/", str(Path.cwd()) + "/"):
        where = where.split(marker, 1)[-1]
    return f"{name} ({where})"


async def run_bench(args: argparse.Namespace) -> tuple[list[Result], Turns | None]:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise SystemExit(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    scenarios = [s for s in SCENARIOS if s.name in args.scenarios.split(",")]
    results: list[Result] = []
    turns: Turns | None = None
    with tempfile.TemporaryDirectory(prefix="pdgate-bench-") as tmp, Processes(Path(tmp)) as procs:
        cluster = await start_cluster(procs, targets)
        for kind, reason in cluster.skipped.items():
            print(f"# {kind} skipped: {reason}", file=sys.stderr)
        targets = [t for t in targets if t not in cluster.skipped]
        for scenario in scenarios:
            for target in targets:
                front = cluster.fronts.get(target)
                pid = front.pid if front else None
                profiler = None
                if args.profile and pid is not None and target.startswith("pdgate"):
                    args.profile.mkdir(parents=True, exist_ok=True)
                    out = args.profile / f"{target}-{scenario.name}.txt"
                    profiler = Profiler(pid, out, args.duration)
                async with client_session() as session:
                    result = await measure(
                        make_sender(session, cluster, target, scenario), scenario, target,
                        duration=args.duration, warmup=args.warmup, router_pid=pid,
                        backend_pids=cluster.backend_pids, profiler=profiler,
                    )  # fmt: skip
                if profiler is not None and profiler.path.exists():
                    print(profile_summary(profiler.path), file=sys.stderr)
                results.append(result)
                print(row(result), file=sys.stderr, flush=True)
                for kind, count in result.error_kinds.items():
                    print(f"#   {count} × {kind}", file=sys.stderr)
        c1 = next((s for s in scenarios if s.name == "c1"), None)
        if c1 is not None and args.turns and len(targets) > 1:
            async with client_session() as session:
                senders = {t: make_sender(session, cluster, t, c1) for t in targets}
                turns = await take_turns(senders, args.turns)
            for line in turns.report("direct-pd"):
                print(f"# {line}", file=sys.stderr, flush=True)
    return results, turns


# -- report -----------------------------------------------------------------------------------

HEADER = (
    "| scenario | target | req/s | tokens/s | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms "
    "| CPU ms/req | backends CPU ms/req | errors |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def row(r: Result) -> str:
    return (
        f"| {r.scenario} | {r.target} | {r.rps:.0f} | {r.tokens_per_s:.0f} | {_f(r.p50_ms)} "
        f"| {_f(r.p99_ms)} | {_f(r.ttft_p50_ms)} | {_f(r.ttft_p99_ms)} | {_f(r.cpu_ms_per_req, 3)} "
        f"| {_f(r.backend_cpu_ms_per_req, 3)} | {r.errors} |"
    )


def summary(results: list[Result], turns: Turns | None = None) -> list[str]:
    """The targets as ratios of this run's rows (the c1 latency from ``turns`` too)."""
    by = {(r.scenario, r.target): r for r in results}
    out = []

    def get(s: str, t: str) -> Result | None:
        return by.get((s, t))

    gw, router = get("c64", "pdgate"), get("c64", "sglang-router")
    if gw and router:
        out.append(f"c64 req/s, pdgate / sglang-router: {gw.rps / router.rps:.2f} (target ≥ 1)")
        if gw.cpu_ms_per_req and router.cpu_ms_per_req:
            ratio = gw.cpu_ms_per_req / router.cpu_ms_per_req
            out.append(f"c64 CPU per request, pdgate / sglang-router: {ratio:.2f} (target ≤ 2)")
    for base in ("direct", "direct-pd"):
        gw, ref = get("c1", "pdgate"), get("c1", base)
        if gw and ref:
            out.append(f"c1 added p50 latency vs {base}: {gw.p50_ms - ref.p50_ms:+.2f} ms (≤ 1)")
    if turns is not None and {"pdgate", "direct-pd"} <= turns.latencies_ms.keys():
        added = turns.added_ms("pdgate", "direct-pd")
        out.append(f"c1 added latency vs direct-pd, in turns: {added:+.2f} ms (≤ 1)")
    gw, ref = get("stream64", "pdgate"), get("stream64", "direct")
    if gw and ref and ref.tokens_per_s:
        ratio = gw.tokens_per_s / ref.tokens_per_s
        out.append(f"stream64 tokens/s, pdgate / direct: {ratio:.2f} (target ≥ 0.9)")
    for other in ("direct-pd", "sglang-router", "vllm-router"):  # the two-leg references
        ref = get("stream64", other)
        if gw and ref and ref.tokens_per_s:
            out.append(
                f"stream64 tokens/s, pdgate / {other}: {gw.tokens_per_s / ref.tokens_per_s:.2f}"
            )
    return out


def report(results: list[Result], turns: Turns | None = None) -> str:
    lines = [HEADER, *(row(r) for r in results), ""]
    lines += [f"* {line}" for line in summary(results, turns)]
    if turns is not None:
        lines += ["", *(f"* {line}" for line in turns.report("direct-pd"))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench_gateway", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each")
    parser.add_argument("--quick", action="store_true", help="1.5 s each, 0.3 s warm-up")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated rows")
    parser.add_argument(
        "--scenarios", default=",".join(s.name for s in SCENARIOS), help="comma-separated"
    )
    parser.add_argument(
        "--turns", type=int, default=1000,
        help="rounds of c1 in turns, one request per target each (0: none); see Turns",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--profile", type=Path, help="py-spy the gateway (collapsed stacks) into this folder"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = min(args.duration, 1.5), min(args.warmup, 0.3)
        args.turns = min(args.turns, 100)
    exit_on_sigterm()
    results, turns = run_loop(run_bench(args))
    print(report(results, turns))
    if args.json:
        args.json.write_bytes(
            orjson.dumps([asdict(r) for r in results], option=orjson.OPT_INDENT_2)
        )
    return 0


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop (when installed), as the gateway does."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop every child process."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    raise SystemExit(main())
