"""Locust load test for pdgate (or any OpenAI-compatible server): streaming chat users.

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 \\
        --workload mix --shape step --rate 2 --step-rate 2 --step-every 20 --steps 5 -u 64 \\
        --csv results/run --html results/run.html

Every request streams (``stream: true`` with usage), and besides locust's own POST rows
(whose response time here is the whole stream, first byte to ``[DONE]``) each request records
custom metrics, named by workload:

* ``TTFT``: request sent to the first token's SSE event, in ms;
* ``ITL``: the gap between consecutive token events, in ms;
* ``TOKENS_PER_S``: the request's decode speed, 1 / TPOT (the value sits in the response-time
  columns; it is tokens per second, not ms).

Workloads (``--workload``): ``chat`` (short prompts), ``rag`` (long prompts of documents
from a shared corpus), ``agent`` (multi-turn sessions on a growing shared prefix), ``mix``
(each user one of those, 6:2:2) and ``trace`` (replays ``--trace``, a Mooncake JSONL file,
at its own arrival times × ``--trace-speedup``).

Load (``--shape``): ``closed`` (``-u`` users back to back), or open-loop Poisson arrivals
shared by ``-u`` users: ``steady`` (``--rate``), ``step`` (``--rate`` plus ``--step-rate``
every ``--step-every`` s, ``--steps`` steps) and ``spike`` (``--spike-rate`` from
``--spike-at`` for ``--spike-for`` s). ``-u`` caps concurrency: give enough users for the peak
rate × latency, or arrivals go out late (recorded as ``late_s``). Open-loop rates are per
locust process: run them without ``--processes``/workers.

With ``--csv PREFIX``, two more files feed ``pdgate report PREFIX``: ``PREFIX_requests.csv``
(one row per request) and ``PREFIX_itl.csv`` (every inter-token gap, bucketed).

Measurement: a ``requests``-based ``HttpUser`` reading the response line by line, each SSE
event stamped as it is read. (``FastHttpUser``'s streaming read buffers, and measured TTFT one
token late in our trials.)
"""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Any

import gevent
import gevent.lock
from locust import HttpUser, LoadTestShape, constant, events, task
from locust.env import Environment
from pdgate_load import (
    ItlHistogram,
    Pacer,
    RequestLog,
    Schedule,
    TraceArrivals,
    TraceWorkload,
    Workload,
    WorkloadOptions,
    load_trace_specs,
    make_workload,
    read_stream,
)

from gateway.sim.workload import parse_length

PATH = "/v1/chat/completions"


class _Run:
    """Per-process state shared by the users: arrivals, the schedule and the result files."""

    pacer = Pacer()
    turn = gevent.lock.Semaphore()  # held by the one user waiting for the next arrival
    schedule = Schedule()
    trace: TraceArrivals | None = None
    log: RequestLog | None = None
    itl = ItlHistogram()
    itl_path: Path | None = None
    users = 0


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    g = parser.add_argument_group("pdgate")
    g.add_argument("--model", default="llama-3.1-8b", help="model name to send")
    g.add_argument("--workload", default="mix", choices=["chat", "rag", "agent", "mix", "trace"])
    g.add_argument("--shape", default="closed", choices=["closed", "steady", "step", "spike"])
    g.add_argument(
        "--rate", type=float, default=1.0, help="requests/s (steady, step start, spike base)"
    )
    g.add_argument("--step-rate", type=float, default=1.0, help="requests/s added per step")
    g.add_argument("--step-every", type=float, default=30.0, help="seconds per step")
    g.add_argument("--steps", type=int, default=5, help="steps, then the test ends")
    g.add_argument("--spike-rate", type=float, default=10.0, help="requests/s during the spike")
    g.add_argument("--spike-at", type=float, default=30.0, help="seconds before the spike")
    g.add_argument("--spike-for", type=float, default=10.0, help="spike length, seconds")
    g.add_argument(
        "--prompt-tokens", default="lognormal:256,128", help="chat prompt length: N or DIST:A,B"
    )
    g.add_argument(
        "--output-tokens", default="lognormal:128,64", help="output length: N or DIST:A,B"
    )
    g.add_argument("--rag-tokens", default="uniform:3000,8000", help="RAG prompt length")
    g.add_argument("--agent-turns", type=int, default=6, help="turns per agentic session")
    g.add_argument("--agent-system-tokens", type=int, default=1024, help="shared system prompt")
    g.add_argument("--agent-tool-tokens", type=int, default=256, help="tool result per turn")
    g.add_argument("--trace", help="Mooncake-format JSONL trace (with --workload trace)")
    g.add_argument("--trace-speedup", type=float, default=1.0, help="replay this much faster")
    g.add_argument("--trace-limit", type=int, help="use the trace's first N requests")
    g.add_argument("--seed", type=int, default=0, help="same seed, same prompts and arrivals")


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    o = environment.parsed_options
    if o is None:
        return
    _Run.pacer = Pacer(o.seed)
    _Run.schedule = Schedule(
        o.shape, o.rate, o.step_rate, o.step_every, o.steps, o.spike_rate, o.spike_at, o.spike_for
    )
    if o.workload == "trace":
        if not o.trace:
            raise SystemExit("--workload trace needs --trace FILE")
        specs = load_trace_specs(Path(o.trace), o.trace_limit)
        _Run.trace = TraceArrivals(specs, o.trace_speedup)


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    o = environment.parsed_options
    prefix = getattr(o, "csv_prefix", None) if o is not None else None
    if prefix:
        _Run.log = RequestLog(Path(f"{prefix}_requests.csv"))
        _Run.itl = ItlHistogram()
        _Run.itl_path = Path(f"{prefix}_itl.csv")


@events.test_stop.add_listener
def _stop(environment: Environment, **_: Any) -> None:
    if _Run.log is not None:
        _Run.log.close()
        _Run.log = None
    if _Run.itl_path is not None:
        _Run.itl.write(_Run.itl_path)


class PdgateShape(LoadTestShape):
    """Drives the offered rate (``--shape``); ``-u``, ``-r`` and ``-t`` keep their meaning."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        o = self.runner.environment.parsed_options if self.runner else None
        t = self.get_run_time()
        # Locust applies --run-time only after a shape ends, so the shape applies it itself.
        if o is not None and o.run_time and t >= o.run_time:
            return None
        rate = _Run.schedule.rate_at(t)
        if rate is None:
            return None
        _Run.pacer.set_rate(rate or None)
        users = (o.num_users if o else None) or 1
        # Open loop: every user at once (they only wait for arrivals); closed loop: -r.
        closed = _Run.schedule.shape == "closed"
        spawn = (o.spawn_rate if o and closed else None) or float(users)
        _Run.users = users
        return users, spawn


class ChatUser(HttpUser):
    """One OpenAI streaming client running its workload (see the module docstring)."""

    host = "http://127.0.0.1:8000"
    wait_time = constant(0)  # arrivals are paced by the shape, not by think time
    _numbers = itertools.count()

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.model: str = o.model if o else "llama-3.1-8b"
        rng = random.Random(((o.seed if o else 0) << 20) + next(self._numbers))
        kind = o.workload if o else "mix"
        self.workload: Workload
        if kind == "trace":
            self.workload = TraceWorkload()
        else:
            options = WorkloadOptions(
                prompt=parse_length(o.prompt_tokens),
                output=parse_length(o.output_tokens),
                rag_prompt=parse_length(o.rag_tokens),
                agent_turns=o.agent_turns,
                agent_system_tokens=o.agent_system_tokens,
                agent_tool_tokens=o.agent_tool_tokens,
            ) if o else WorkloadOptions()  # fmt: skip
            self.workload = make_workload(kind, options, rng)

    @task
    def request(self) -> None:
        due, offered = self._wait_for_arrival()
        late = max(0.0, time.monotonic() - due) if due is not None else None
        req = self.workload.next_request()
        name = f"{PATH} [{req.kind}]"
        start_unix = time.time()
        sent = time.perf_counter()
        with self.client.post(
            PATH, json=req.body(self.model), stream=True, catch_response=True, name=name
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                result = None
            else:
                result = read_stream(resp.iter_lines(), sent)
                e2e = time.perf_counter() - sent
                resp.request_meta["response_time"] = e2e * 1000  # the whole stream
                resp.request_meta["response_length"] = result.tokens
                if result.error:
                    resp.failure(result.error)
                else:
                    resp.success()
        ok = result is not None and result.error is None
        self.workload.observe(result.text if result else "", ok)
        if result is not None and ok:
            self._fire(req.kind, result)
        self._log(req.kind, offered, start_unix, sent, result, late, resp.status_code)

    def _wait_for_arrival(self) -> tuple[float | None, float]:
        """Sleep until this request's arrival time; returns it (None in closed loop) and the
        load offered then."""
        if _Run.trace is not None:
            due, spec = _Run.trace.claim()  # fixed times: users may claim ahead
            if isinstance(self.workload, TraceWorkload):
                self.workload.assign(spec)
            gevent.sleep(max(0.0, due - time.monotonic()))
            return due, _Run.trace.mean_rate
        if _Run.schedule.shape == "closed":
            return None, 0.0
        # One user at a time waits for the next arrival: users claiming slots ahead would
        # keep sending at the old rate long after the shape changed it.
        with _Run.turn:
            while (claimed := _Run.pacer.claim()) is None:
                gevent.sleep(0.05)  # an offered rate of 0 (e.g. a spike's baseline)
            offered = _Run.pacer.rate or 0.0
            gevent.sleep(max(0.0, claimed - time.monotonic()))
        return claimed, offered

    def _fire(self, kind: str, r: Any) -> None:
        fire = self.environment.events.request.fire
        fire(request_type="TTFT", name=kind, response_time=r.ttft * 1000, response_length=0)
        for gap in r.gaps:
            fire(request_type="ITL", name=kind, response_time=gap * 1000, response_length=0)
            _Run.itl.add(gap)
        rate = r.decode_tokens_per_s
        if rate is not None:
            fire(request_type="TOKENS_PER_S", name=kind, response_time=rate, response_length=0)

    def _log(
        self,
        kind: str,
        offered: float,
        start: float,
        sent: float,
        r: Any,
        late: float | None,
        status: int,
    ) -> None:
        if _Run.log is None:
            return
        ok = r is not None and r.error is None
        _Run.log.add(
            {
                "start_unix_s": round(start, 6),
                "kind": kind,
                "offered_rps": offered,
                "users": _Run.users or self.environment.runner.user_count,
                "prompt_tokens": r.prompt_tokens if r else None,
                "completion_tokens": r.tokens if r else None,
                "ttft_s": r.ttft if ok else None,
                "tpot_s": r.tpot if ok else None,
                "e2e_s": time.perf_counter() - sent,
                "ok": int(ok),
                "error": "" if ok else (r.error if r else f"HTTP {status}"),
                "late_s": late,
            }
        )
