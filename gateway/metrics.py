"""Every gateway metric: names, labels and buckets in one place, recorded through helpers.

Metrics live on an app-owned ``CollectorRegistry`` (tests and several apps in one process do
not collide). Counters and histograms are :class:`LocalCounter` and :class:`LocalHistogram`:
recorded without locks, exported by prometheus_client at scrape time.

Buckets span 0.1 ms (a wafer-scale engine's inter-token gap) to 10 minutes (TTFT behind a
long queue).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from backends.base import BackendLoad
from gateway.state import StoreStatus

# 1-2-3-5-7.5 steps from 0.1 ms to 10 minutes.
LATENCY_BUCKETS = (
    *(round(m * 10.0**e, 6) for e in range(-4, 2) for m in (1.0, 2.0, 3.0, 5.0, 7.5)),
    100.0,
    120.0,
    300.0,
    600.0,
)

# ×4 steps from 64 KiB (a few tokens of a small model) to 64 GiB (a long prompt of a large one).
BYTE_BUCKETS = tuple(float(65536 * 4**e) for e in range(11))

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

C = TypeVar("C")


class _Family(Collector, Generic[C]):
    """A labelled metric whose children are plain objects, recorded without locks.

    prometheus_client's children take a lock per update, and its histograms walk their
    buckets one by one (34 here). A request records about twenty counts and observations, and
    that came to about a tenth of the gateway's CPU per request at concurrency 64. The gateway
    records from its event loop's thread only, so plain attributes do; prometheus_client still
    renders the exposition, from :meth:`collect` at scrape time."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], C] = {}
        registry.register(self)

    def labels(self, *values: str) -> C:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self._children[values] = self._child()
        return child

    def _child(self) -> C:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def _family(self) -> Metric:
        raise NotImplementedError


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class LocalCounter(_Family[CounterChild]):
    """A counter (exported as ``NAME_total``) of :class:`_Family`'s kind."""

    def _child(self) -> CounterChild:
        return CounterChild()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._children.items():
            family.add_metric(values, child.value)
        yield family


class HistogramChild:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self._bounds, amount)] += 1  # the first bound >= amount: "le"
        self.sum += amount


class LocalHistogram(_Family[HistogramChild]):
    """A histogram of :class:`_Family`'s kind."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets))
        # As prometheus_client writes them (it has no annotations).
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._children.items():
            cumulative = map(float, accumulate(child.counts))
            family.add_metric(values, list(zip(self._le, cumulative, strict=True)), child.sum)
        yield family


class GatewayMetrics:
    """The gateway's metrics and the helpers that record them."""

    # False for a sink that keeps nothing (a simulation's): callers may then skip working out
    # what they would observe.
    recording = True

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, resident memory, open fds
        self.ttft = LocalHistogram(
            "pdgate_time_to_first_token_seconds",
            "Request arrival to first token.",
            ["model", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = LocalHistogram(
            "pdgate_inter_token_latency_seconds",
            "Gap between delivered chunks, per token (a chunk of n tokens after gap g counts "
            "as g/n).",
            ["model", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = LocalHistogram(
            "pdgate_e2e_request_latency_seconds",
            "Request arrival to last token.",
            ["model", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.phase = LocalHistogram(
            "pdgate_phase_seconds",
            "Time a request spent in each phase, per pool.",
            ["model", "mode", "pool", "phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = LocalCounter(
            "pdgate_prompt_tokens", "Prompt tokens charged.", ["model"], registry=r
        )
        self.completion_tokens = LocalCounter(
            "pdgate_completion_tokens", "Completion tokens delivered.", ["model"], registry=r
        )
        self.requests = LocalCounter(
            "pdgate_requests",
            "Finished requests by outcome: ok, cancelled (client left), or the error code.",
            ["model", "mode", "outcome"],
            registry=r,
        )
        self.tpot = LocalHistogram(
            "pdgate_time_per_output_token_seconds",
            "Per request: (last token − first token) / (completion tokens − 1).",
            ["model", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.slo = LocalCounter(
            "pdgate_slo_requests",
            "Completed requests by whether they met the TTFT and TPOT targets; "
            'met="both" is goodput.',
            ["model", "mode", "met"],
            registry=r,
        )
        self.retries = LocalCounter(
            "pdgate_retries",
            "Legs retried on another worker, by pool and the error that caused it.",
            ["model", "pool", "error"],
            registry=r,
        )
        self.rejections = LocalCounter(
            "pdgate_rejections",
            "Requests refused with 429 before any work, by reason.",
            ["model", "reason"],
            registry=r,
        )
        self.routes = LocalCounter(
            "pdgate_routing_decisions",
            "Legs sent to each worker, by pool and policy.",
            ["model", "pool", "policy", "worker"],
            registry=r,
        )
        self.disaggregation = LocalCounter(
            "pdgate_disaggregation_decisions",
            "Conditional mode: remote prefill, or local prefill and why "
            "(short_prompt, prefix_hit, prefill_busy), or the whole request on a prefill "
            "worker while the decode pool is full (decode_full).",
            ["model", "decision"],
            registry=r,
        )
        self.kv_transfer = LocalHistogram(
            "pdgate_kv_transfer_bytes",
            "KV cache bytes handed from a prefill to a decode worker, per completed decode leg.",
            ["model", "mode"],
            buckets=BYTE_BUCKETS,
            registry=r,
        )
        self.cached_tokens = LocalCounter(
            "pdgate_cached_prompt_tokens",
            "Prompt tokens a worker's prefix cache served instead of computing them.",
            ["model", "pool"],
            registry=r,
        )
        self.pool_slo = LocalCounter(
            "pdgate_pool_slo_requests",
            "Completed requests by whether their part in a pool met its target: a prefill pool "
            "owns TTFT, a decode pool after a remote prefill owns TPOT, a pool that did both "
            'owns both; met="true" is the pool\'s goodput.',
            ["model", "mode", "pool", "met"],
            registry=r,
        )

    # -- recording helpers --------------------------------------------------------------------

    def observe_ttft(self, model: str, mode: str, seconds: float) -> None:
        self.ttft.labels(model, mode).observe(seconds)

    def observe_itl(self, model: str, mode: str, seconds: float) -> None:
        self.itl.labels(model, mode).observe(seconds)

    def observe_e2e(self, model: str, mode: str, seconds: float) -> None:
        self.e2e.labels(model, mode).observe(seconds)

    def observe_phase(self, model: str, mode: str, pool: str, phase: str, seconds: float) -> None:
        self.phase.labels(model, mode, pool, phase).observe(seconds)

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.completion_tokens.labels(model).inc(completion)

    def count_request(self, model: str, mode: str, outcome: str) -> None:
        self.requests.labels(model, mode, outcome).inc()

    def observe_slo(self, model: str, mode: str, *, ttft_ok: bool, tpot_ok: bool) -> None:
        met = (
            "both" if ttft_ok and tpot_ok else "ttft" if ttft_ok else "tpot" if tpot_ok else "none"
        )
        self.slo.labels(model, mode, met).inc()

    def observe_tpot(self, model: str, mode: str, seconds: float) -> None:
        self.tpot.labels(model, mode).observe(seconds)

    def count_retry(self, model: str, pool: str, error: str) -> None:
        self.retries.labels(model, pool, error).inc()

    def count_rejection(self, model: str, reason: str) -> None:
        self.rejections.labels(model, reason).inc()

    def count_route(self, model: str, pool: str, policy: str, worker: str) -> None:
        self.routes.labels(model, pool, policy, worker).inc()

    def count_disaggregation(self, model: str, decision: str) -> None:
        self.disaggregation.labels(model, decision).inc()

    def observe_kv_transfer(self, model: str, mode: str, nbytes: float) -> None:
        self.kv_transfer.labels(model, mode).observe(nbytes)

    def count_cached_tokens(self, model: str, pool: str, tokens: int) -> None:
        self.cached_tokens.labels(model, pool).inc(tokens)

    def observe_pool_slo(self, model: str, mode: str, pool: str, *, met: bool) -> None:
        self.pool_slo.labels(model, mode, pool, "true" if met else "false").inc()

    def watch(
        self,
        workers: Callable[[], Iterable[WorkerState]],
        queues: Callable[[], Iterable[tuple[str, str, int, int]]],
        store: Callable[[], StoreStatus],
    ) -> None:
        """Export worker, admission and shared-state status at scrape time (read, never pushed)."""
        self.registry.register(_StateCollector(workers, queues, store))

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class WorkerState:
    model: str
    pool: str
    worker: str
    in_flight: int  # legs this replica has on the worker
    load: BackendLoad
    circuit: int  # 0 closed, 1 half-open, 2 open


class _StateCollector(Collector):
    def __init__(
        self,
        workers: Callable[[], Iterable[WorkerState]],
        queues: Callable[[], Iterable[tuple[str, str, int, int]]],
        store: Callable[[], StoreStatus],
    ) -> None:
        self._workers = workers
        self._queues = queues
        self._store = store

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "pool", "worker"]
        families = {
            "in_flight": GaugeMetricFamily(
                "pdgate_worker_in_flight",
                "Legs in flight on a worker (this replica).",
                labels=labels,
            ),
            "running": GaugeMetricFamily(
                "pdgate_worker_running_sequences",
                "Sequences in the worker's running batch.",
                labels=labels,
            ),
            "waiting": GaugeMetricFamily(
                "pdgate_worker_waiting_sequences", "Sequences queued on the worker.", labels=labels
            ),
            "kv": GaugeMetricFamily(
                "pdgate_worker_kv_usage_ratio",
                "Fraction of the worker's KV cache in use.",
                labels=labels,
            ),
            "circuit": GaugeMetricFamily(
                "pdgate_worker_circuit_state",
                "Circuit breaker: 0 closed, 1 half-open, 2 open.",
                labels=labels,
            ),
        }
        for w in self._workers():
            key = [w.model, w.pool, w.worker]
            families["in_flight"].add_metric(key, w.in_flight)
            families["running"].add_metric(key, w.load.running)
            families["waiting"].add_metric(key, w.load.waiting)
            families["kv"].add_metric(key, w.load.kv_usage)
            families["circuit"].add_metric(key, w.circuit)
        yield from families.values()
        active = GaugeMetricFamily(
            "pdgate_admitted_in_flight",
            "Requests (pool=gateway) or legs holding an admission slot.",
            labels=["model", "pool"],
        )
        queued = GaugeMetricFamily(
            "pdgate_admission_queue_depth",
            "Requests or legs waiting for an admission slot.",
            labels=["model", "pool"],
        )
        for model, pool, in_flight, depth in self._queues():
            active.add_metric([model, pool], in_flight)
            queued.add_metric([model, pool], depth)
        yield active
        yield queued
        status = self._store()
        up = GaugeMetricFamily(
            "pdgate_state_store_up",
            "1 while shared state is reachable (always 1 for local state), 0 while serving "
            "local state because the shared store is down.",
            labels=["shared"],
        )
        up.add_metric([str(status.shared).lower()], 1 if status.up else 0)
        yield up
        failures = CounterMetricFamily(
            "pdgate_state_store_fallbacks",
            "Shared-state syncs that failed, each answered from local state.",
            labels=["shared"],
        )
        failures.add_metric([str(status.shared).lower()], status.failures)
        yield failures

    def describe(self) -> Iterator[Metric]:
        return iter(())
