"""Every gateway metric: names, labels and buckets in one place, recorded through helpers.

Metrics live on an app-owned ``CollectorRegistry`` (tests and several apps in one process do
not collide). Labelled children are cached: a label lookup per token would be measurable.

Buckets span 0.1 ms (a wafer-scale engine's inter-token gap) to 10 minutes (TTFT behind a
long queue).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backends.base import BackendLoad

LATENCY_BUCKETS = (
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayMetrics:
    """The gateway's metrics and the helpers that record them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "pdgate_time_to_first_token_seconds",
            "Request arrival to first token.",
            ["model", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "pdgate_inter_token_latency_seconds",
            "Gap between delivered chunks, per token (a chunk of n tokens after gap g counts "
            "as g/n).",
            ["model", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pdgate_e2e_request_latency_seconds",
            "Request arrival to last token.",
            ["model", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.phase = Histogram(
            "pdgate_phase_seconds",
            "Time a request spent in each phase, per pool.",
            ["model", "mode", "pool", "phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "pdgate_prompt_tokens", "Prompt tokens charged.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "pdgate_completion_tokens", "Completion tokens delivered.", ["model"], registry=r
        )
        self.requests = Counter(
            "pdgate_requests",
            "Finished requests by outcome: ok, cancelled (client left), or the error code.",
            ["model", "mode", "outcome"],
            registry=r,
        )
        self.in_flight_gauge = Gauge(
            "pdgate_worker_in_flight",
            "Legs in flight on a worker (this replica).",
            ["model", "pool", "worker"],
            registry=r,
        )

    # -- recording helpers (children cached per label set) ----------------------------------

    @lru_cache(maxsize=4096)  # noqa: B019 - bounded; lives as long as the app
    def _hist(self, metric: Histogram, *labels: str) -> Histogram:
        return metric.labels(*labels)

    @lru_cache(maxsize=4096)  # noqa: B019
    def _counter(self, metric: Counter, *labels: str) -> Counter:
        return metric.labels(*labels)

    def observe_ttft(self, model: str, mode: str, seconds: float) -> None:
        self._hist(self.ttft, model, mode).observe(seconds)

    def observe_itl(self, model: str, mode: str, seconds: float) -> None:
        self._hist(self.itl, model, mode).observe(seconds)

    def observe_e2e(self, model: str, mode: str, seconds: float) -> None:
        self._hist(self.e2e, model, mode).observe(seconds)

    def observe_phase(self, model: str, mode: str, pool: str, phase: str, seconds: float) -> None:
        self._hist(self.phase, model, mode, pool, phase).observe(seconds)

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        self._counter(self.prompt_tokens, model).inc(prompt)
        self._counter(self.completion_tokens, model).inc(completion)

    def count_request(self, model: str, mode: str, outcome: str) -> None:
        self._counter(self.requests, model, mode, outcome).inc()

    def set_in_flight(self, model: str, pool: str, worker: str, value: int) -> None:
        self.in_flight_gauge.labels(model, pool, worker).set(value)

    def watch_workers(
        self, source: Callable[[], Iterable[tuple[str, str, str, BackendLoad]]]
    ) -> None:
        """Export each worker's engine state at scrape time (model, pool, worker, load)."""
        self.registry.register(_WorkerLoadCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerLoadCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[tuple[str, str, str, BackendLoad]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "pool", "worker"]
        running = GaugeMetricFamily(
            "pdgate_worker_running_sequences",
            "Sequences in the worker's running batch.",
            labels=labels,
        )
        waiting = GaugeMetricFamily(
            "pdgate_worker_waiting_sequences", "Sequences queued on the worker.", labels=labels
        )
        kv = GaugeMetricFamily(
            "pdgate_worker_kv_usage_ratio",
            "Fraction of the worker's KV cache in use.",
            labels=labels,
        )
        for model, pool, worker, load in self._source():
            running.add_metric([model, pool, worker], load.running)
            waiting.add_metric([model, pool, worker], load.waiting)
            kv.add_metric([model, pool, worker], load.kv_usage)
        yield from (running, waiting, kv)

    def describe(self) -> Iterator[Metric]:
        return iter(())
