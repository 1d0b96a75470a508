"""Simulation: the whole gateway's dispatch over emulated pools, in virtual time.

:func:`simulate` builds the gateway from :class:`~gateway.settings.Settings` exactly as
``pdgate serve`` does, but on a virtual-time event loop and without HTTP: each simulated
request becomes a :class:`~gateway.dispatch.DispatchRequest` sent through
``gateway.dispatcher.open``, so policies, flows (aggregated, disaggregated, conditional), KV
handoffs and engines are the production code. Hours of traffic run in seconds because time
jumps from one engine step to the next.

What the simulation changes, and why:

* Backends are emulated instances built with ``coalesce=True`` and no synthetic text: a leg
  delivers its first token at once and the rest in one chunk when it ends, so a request costs
  a handful of wake-ups, not one per token. Per-token timing is not lost: every engine records
  the gap before each token it produces (:class:`~gateway.sim.stats.GapRecorder`), which is
  what a client would have measured, since virtual time has no delivery delay.
* Gateway timeouts (per-leg and the request deadline) are off unless ``timeout_s`` is given:
  a simulation measures latency, and a timeout would cut the distribution it reports; leg
  idle timeouts would also misfire on coalesced streams.
* Each emulated instance runs at ``time_scale`` 1 whatever the config says.

``--device`` simulations use the same path through :func:`device_settings`, which writes the
aggregated config a user would: ``count / tp`` instances behind a least-loaded balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import operator
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from backends.base import Backend, GenerationParams
from backends.clock import Clock, LoopClock, close_loop, virtual_event_loop
from backends.emulator.catalog import Catalog, Deployment, EngineKnobs
from backends.emulator.emulated import EmulatedBackend
from backends.emulator.timing import Link
from backends.errors import BackendError
from backends.wire.requests import ContextLengthExceeded, check_context
from gateway.dispatch import DispatchRequest
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.service import Gateway, build_gateway, worker_deployment
from gateway.settings import (
    SLO_TPOT_S,
    SLO_TTFT_S,
    EmulatedWorker,
    HttpWorker,
    ModelConfig,
    PoolConfig,
    Settings,
    TimeoutConfig,
)
from gateway.sim.economics import FleetItem, joules_per_token, usd_per_million_tokens
from gateway.sim.stats import GapRecorder, summary
from gateway.sim.workload import RequestSpec

NO_TIMEOUT_S = math.inf  # "never": the gateway arms no timer for it


@dataclass(frozen=True)
class Slo:
    """Latency targets a request must meet to count as goodput (default: the gateway's, see
    :data:`gateway.settings.SLO_TPOT_S`)."""

    ttft_s: float = SLO_TTFT_S
    tpot_s: float = SLO_TPOT_S


@dataclass
class SimulationSpec:
    """What to simulate: a gateway config, one of its models, and a workload.

    Open loop (``concurrency`` None): every request is sent at its ``arrival_s``. Closed loop:
    ``concurrency`` clients each send the next request when their last one finished, until the
    requests run out or, with ``stop_after_s``, no new request starts after that time (the
    requests may then be an endless iterator). ``total`` sizes the progress bar.
    """

    settings: Settings
    model: str
    requests: Iterable[RequestSpec]
    concurrency: int | None = None
    stop_after_s: float | None = None
    total: int | None = None
    slo: Slo = Slo()
    seed: int = 0
    hash_block_tokens: int = 512
    timeout_s: float | None = None
    progress: bool = False
    catalog: Catalog | None = None


@dataclass
class RequestRecord:
    """One request as the simulated client saw it."""

    arrival: float
    prompt_tokens: int
    output_tokens: int = 0
    first_at: float | None = None
    end_at: float | None = None
    error: str | None = None

    @property
    def ttft(self) -> float:
        return (self.first_at or math.nan) - self.arrival

    @property
    def e2e(self) -> float:
        return (self.end_at or math.nan) - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2 or self.first_at is None or self.end_at is None:
            return None
        return (self.end_at - self.first_at) / (self.output_tokens - 1)


@dataclass
class SimulationResult:
    """The measurements of one run; :meth:`as_json` is ``pdgate simulate --json``."""

    records: list[RequestRecord]
    gaps: GapRecorder
    deployments: list[Deployment]
    engines: list[Any]
    slo: Slo
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.error is None and r.end_at is not None]

    @property
    def makespan_s(self) -> float:
        done = [r.end_at for r in self.ok if r.end_at is not None]
        if not done:
            return 0.0
        return max(done) - min(r.arrival for r in self.records)

    def metrics(self) -> dict[str, Any]:
        ok = self.ok
        # One pass over the requests that finished, with RequestRecord's own formulas (its
        # properties, spelled out: a run has tens of thousands of records).
        ttfts: list[float] = []
        e2es: list[float] = []
        tpots: list[float] = []
        out_tokens = in_tokens = good = 0
        last_end = -math.inf
        ttft_slo, tpot_slo = self.slo.ttft_s, self.slo.tpot_s
        for r in ok:
            first, end, arrival, n = r.first_at, r.end_at, r.arrival, r.output_tokens
            ttft = (first or math.nan) - arrival
            ttfts.append(ttft)
            e2es.append((end or math.nan) - arrival)
            out_tokens += n
            in_tokens += r.prompt_tokens
            if end is not None and end > last_end:
                last_end = end
            if n < 2 or first is None or end is None:
                good += ttft <= ttft_slo
                continue
            tpot = (end - first) / (n - 1)
            tpots.append(tpot)
            good += ttft <= ttft_slo and tpot <= tpot_slo
        span = last_end - min(map(_arrival, self.records)) if ok else 0.0
        fleet = fleet_of(self.deployments)
        engines = self.engines
        peak = max(
            (e.stats.kv_peak_blocks / e.total_blocks for e in engines if e.total_blocks),
            default=0.0,
        )
        hits = sum(e.stats.prefix_hit_tokens for e in engines)
        drafts = sum(e.stats.draft_tokens for e in engines)
        accepted = sum(e.stats.draft_tokens_accepted for e in engines)
        errors: dict[str, int] = {}
        for r in self.records:
            if r.error is not None:
                errors[r.error] = errors.get(r.error, 0) + 1
        return {
            "ttft_s": _summary(ttfts),
            "itl_s": self.gaps.summary().as_dict(),
            "tpot_s": _summary(tpots),
            "e2e_s": _summary(e2es),
            "output_tokens_per_s": out_tokens / span if span > 0 else 0.0,
            "requests_per_s": len(ok) / span if span > 0 else 0.0,
            "goodput_requests_per_s": good / span if span > 0 else 0.0,
            "requests": len(ok),
            "failed": len(self.records) - len(ok),
            "errors": errors,
            "kv_usage_peak": peak,
            "preemptions": sum(e.stats.preemptions for e in engines),
            "usd_per_million_output_tokens": usd_per_million_tokens(fleet, span, out_tokens),
            "joules_per_output_token": joules_per_token(fleet, span, out_tokens),
            "steady_output_tokens_per_s": steady_throughput(ok),
            "input_tokens": in_tokens,
            "output_tokens": out_tokens,
            "prefix_cache_hit_rate": hits / in_tokens if in_tokens else 0.0,
            "draft_acceptance_rate": accepted / drafts if drafts else None,
            "slo": {"ttft_s": self.slo.ttft_s, "tpot_s": self.slo.tpot_s},
            "devices": [
                {
                    "device": f.device,
                    "count": f.devices,
                    "tdp_w": f.tdp_w,
                    "usd_per_hour": f.usd_per_hour,
                }
                for f in fleet
            ],
            "simulated_s": span,
            "wall_s": self.wall_s,
            **self.extra,
        }


def _summary(values: list[float]) -> dict[str, float | None]:
    return summary(values).as_dict()


_arrival = operator.attrgetter("arrival")
_end_at = operator.attrgetter("end_at")


def steady_throughput(records: Iterable[RequestRecord]) -> float:
    """Output tokens per second in steady state: from the first completion (the pipeline has
    filled) to the last arrival (after it, the load drains).

    Tokens are placed evenly between a request's first and last token (coalesced streams do
    not say when each one came). Excluding ramp-up and drain makes this the sustained rate
    MLPerf reports; when the two overlap (short runs), the window is first to last arrival.
    """
    records = list(records)
    if len(records) < 2:
        return 0.0
    first_done = min((e for e in map(_end_at, records) if e is not None), default=math.inf)
    start: float = first_done
    stop: float = max(map(_arrival, records))
    if stop <= start:
        start = min(map(_arrival, records))
    if stop <= start:
        return 0.0
    tokens = 0.0
    for r in records:
        first, end = r.first_at, r.end_at
        if first is None or end is None:
            continue
        if start <= first <= stop:
            tokens += 1
        rest = r.output_tokens - 1
        if rest <= 0:
            continue
        if end <= first:
            tokens += rest if start <= end <= stop else 0
            continue
        overlap = (end if end < stop else stop) - (first if first > start else start)
        if overlap > 0:
            tokens += rest * overlap / (end - first)
    return tokens / (stop - start)


def fleet_of(deployments: Iterable[Deployment]) -> list[FleetItem]:
    """Devices provisioned, grouped by profile."""
    counts: dict[str, int] = {}
    devices = {}
    for d in deployments:
        counts[d.device.name] = counts.get(d.device.name, 0) + d.count
        devices[d.device.name] = d.device
    return [
        FleetItem(name, n, devices[name].tdp_w, devices[name].usd_per_hour)
        for name, n in sorted(counts.items())
    ]


# -- configs -----------------------------------------------------------------------------------


def device_settings(
    catalog: Catalog,
    *,
    device: str,
    model: str,
    dtype: str = "bf16",
    tp: int | None = None,
    count: int | None = None,
    engine: EngineKnobs | None = None,
) -> Settings:
    """An aggregated config: ``count`` devices as ``count / size`` instances of ``size``
    devices behind a least-loaded balancer.

    ``size`` is ``tp`` when given; else 1 for tensor-parallel devices (HBM and the like) and,
    for devices sized by memory (LPU pipelines, wafers, in-memory cards), the count their memory
    needs for the model (``count`` then defaults to one instance's worth).
    """
    engine = engine or EngineKnobs()
    profile = catalog.device(device)
    if tp is not None:
        size = tp
    elif profile.sized_by_memory:
        size = catalog.deployment(device, model, dtype=dtype, engine=engine).count
    else:
        size = 1
    count = count if count is not None else size
    if count < size or count % size:
        raise ValueError(f"--count {count} must be a positive multiple of the instance size {size}")
    worker = EmulatedWorker(
        device=device,
        count=size,
        tp=1 if profile.sized_by_memory else size,
        dtype=dtype,
        replicas=count // size,
        engine=engine,
    )
    pool = PoolConfig(policy="least_loaded", workers=[worker])
    return Settings(models=[ModelConfig(name=model, mode="aggregated", pools={"aggregated": pool})])


def _without_timeouts(settings: Settings) -> Settings:
    never = TimeoutConfig(
        prefill_s=NO_TIMEOUT_S, decode_first_token_s=NO_TIMEOUT_S, decode_idle_s=NO_TIMEOUT_S
    )
    models = [m.model_copy(update={"timeouts": never}) for m in settings.models]
    return settings.model_copy(update={"models": models})


# -- the run -----------------------------------------------------------------------------------


class _QuietMetrics(GatewayMetrics):
    """Gateway metrics whose recording helpers do nothing: a simulation reports from its own
    records, and Prometheus observations per chunk would be most of a simulated request's
    cost. Every ``observe_*``, ``count_*`` and ``set_*`` helper is silenced, present or future.
    """

    recording = False

    def __init__(self) -> None:
        super().__init__()
        for name in dir(GatewayMetrics):
            if name.startswith(("observe_", "count_", "set_")):
                setattr(self, name, _ignore)


def _ignore(*args: object, **kwargs: object) -> None:
    return None


class _SimFactory:
    """Emulated instances for simulation: coalesced legs, no text, one gap recorder."""

    def __init__(self, catalog: Catalog, clock: Clock, recorder: GapRecorder, seed: int) -> None:
        self._catalog = catalog
        self._clock = clock
        self._recorder = recorder
        self._seed = seed
        self.backends: list[EmulatedBackend] = []

    def __call__(
        self, name: str, spec: EmulatedWorker | HttpWorker, model: ModelConfig, link: Link
    ) -> Backend:
        if not isinstance(spec, EmulatedWorker):
            raise ValueError(f"{name}: only emulated workers can be simulated")
        deployment = worker_deployment(self._catalog, spec, model)
        backend = EmulatedBackend(
            name,
            deployment,
            self._clock,
            link=link,
            coalesce=True,
            synthesize_text=False,
            recorder=self._recorder,
            seed=self._seed * 1_000_003 + len(self.backends),
        )
        self.backends.append(backend)
        return backend


def simulate(spec: SimulationSpec) -> SimulationResult:
    """Run ``spec`` on a fresh virtual-time loop; return its measurements."""
    loop = virtual_event_loop()
    wall = time.perf_counter()
    try:
        with _fewer_collections():
            result = loop.run_until_complete(_run(spec))
    finally:
        close_loop(loop)
    result.wall_s = time.perf_counter() - wall
    return result


# The cyclic garbage collector's thresholds while a simulation runs (asyncio's defaults are
# 700, 10, 10): a run allocates millions of short-lived objects (tasks, futures, handles,
# chunks), nearly all freed by reference counting, and each young collection walks the ones
# alive at the time; at the default rate that was about a tenth of a run's CPU.
SIM_GC_THRESHOLDS = (50_000, 20, 100)


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Collect cycles less often during a run (they are still collected), then restore the
    process's thresholds."""
    before = gc.get_threshold()
    gc.set_threshold(*(max(a, b) for a, b in zip(SIM_GC_THRESHOLDS, before, strict=True)))
    try:
        yield
    finally:
        gc.set_threshold(*before)


async def _run(spec: SimulationSpec) -> SimulationResult:
    catalog = spec.catalog or Catalog.load()
    clock = LoopClock(asyncio.get_running_loop())  # bound: no loop look-up per reading
    gaps = GapRecorder()
    factory = _SimFactory(catalog, clock, gaps, spec.seed)
    settings = spec.settings if spec.timeout_s is not None else _without_timeouts(spec.settings)
    gateway = build_gateway(
        settings, backend_factory=factory, catalog=catalog, clock=clock, metrics=_QuietMetrics()
    )
    served = gateway.models.get(spec.model)
    if served is None:
        raise ValueError(f"the config serves no model '{spec.model}'")
    progress = _Progress(spec.total, spec.progress)
    client = _Client(gateway, spec, served.config, served.max_context, progress)
    await gateway.start()
    try:
        if spec.concurrency is None:
            await client.open_loop(spec.requests)
        else:
            await client.closed_loop(spec.requests, spec.concurrency, spec.stop_after_s)
    finally:
        progress.close()
        await gateway.close()
    deployments = [b.deployment for b in factory.backends]
    engines = [b.engine for b in factory.backends]
    return SimulationResult(client.records, gaps, deployments, engines, spec.slo, 0.0)


class _Client:
    """Sends the workload's requests through the dispatcher and records what comes back."""

    def __init__(
        self,
        gateway: Gateway,
        spec: SimulationSpec,
        model: ModelConfig,
        max_context: int,
        progress: _Progress,
    ) -> None:
        self._gw = gateway
        self._spec = spec
        self._model = model
        self._max_context = max_context
        self._route = gateway.models[model.name].route
        self._clock = gateway.clock
        self._progress = progress
        self.records: list[RequestRecord] = []

    async def open_loop(self, requests: Iterable[RequestSpec]) -> None:
        """Send each request at its arrival: a timer per arrival starts the request's task
        (no client task wakes up for each), and the last request to end wakes this one (no
        gather over tens of thousands of tasks)."""
        loop = asyncio.get_running_loop()
        queue = sorted(requests, key=lambda r: r.arrival_s or 0.0)
        if not queue:
            return
        done: asyncio.Future[None] = loop.create_future()
        # The requests in flight (a finished one leaves at once: kept to its end, tens of
        # thousands of done tasks would be walked by every garbage collection of the run).
        tasks: set[asyncio.Task[None]] = set()
        left = len(queue)

        def ended(failure: Exception | None) -> None:
            nonlocal left
            left -= 1
            tasks.discard(asyncio.current_task(loop))
            if done.done():
                return
            if failure is not None:  # a bug (send records a request's errors): end the run
                done.set_exception(failure)
            elif not left:
                done.set_result(None)

        def arrive(i: int) -> None:
            now = self._clock.now()
            while i < len(queue):
                at = queue[i].arrival_s or 0.0
                if at > now:
                    loop.call_at(at, arrive, i)
                    return
                tasks.add(loop.create_task(self.send(queue[i], ended)))
                i += 1

        arrive(0)
        try:
            await done
        finally:
            for task in list(tasks):
                if not task.done():
                    task.cancel()

    async def closed_loop(
        self, requests: Iterable[RequestSpec], concurrency: int, stop_after: float | None
    ) -> None:
        queue = iter(requests)
        clock = self._clock

        async def client() -> None:
            for r in queue:
                if stop_after is not None and clock.now() >= stop_after:
                    return
                await self.send(r)

        await asyncio.gather(*(client() for _ in range(max(1, concurrency))))

    async def send(
        self, r: RequestSpec, ended: Callable[[Exception | None], None] | None = None
    ) -> None:
        """Send one request and record it; ``ended`` is told when it is over, with the
        exception that a bug raised (instead of raising it)."""
        clock = self._clock
        failure: Exception | None = None
        i = len(self.records)
        record = RequestRecord(clock.now(), r.prompt_tokens)
        self.records.append(record)
        now = record.arrival
        try:
            check_context(r.prompt_tokens, r.output_tokens, self._max_context)
            params = GenerationParams(
                request_id=f"sim-{i}",
                model=self._model.profile_name,
                api="completions",
                prompt_tokens=r.prompt_tokens,
                max_tokens=r.output_tokens,
                seed=self._spec.seed * 1_000_003 + i,
                ignore_eos=True,
                block_hashes=r.block_hashes,
                hash_block_tokens=self._spec.hash_block_tokens,
            )
            timeout = self._spec.timeout_s
            deadline = now + (timeout if timeout is not None else NO_TIMEOUT_S)
            req = DispatchRequest(params, self._route, now, deadline)
            async with self._gw.dispatcher.open(req) as chunks:
                async for chunk in chunks:
                    if record.first_at is None:
                        record.first_at = clock.now()
                    record.output_tokens += chunk.tokens
            record.end_at = clock.now()
        except ContextLengthExceeded:
            record.error = "context_length_exceeded"
        except GatewayError as exc:
            record.error = exc.code or exc.type
        except BackendError as exc:
            record.error = type(exc).__name__
        except Exception as exc:
            if ended is None:
                raise
            failure = exc
        finally:
            self._progress.update()
            if ended is not None:
                ended(failure)


class _Progress:
    """A progress bar on stderr for long runs (tqdm, shown after a second, only on a TTY)."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, unit="req", file=sys.stderr, delay=1.0, mininterval=0.25, leave=False
            )

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update()

    def close(self) -> None:
        if self._bar is not None:
            with contextlib.suppress(Exception):
                self._bar.close()
