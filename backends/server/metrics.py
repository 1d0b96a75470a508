"""The backend server's metrics under vLLM's names, so dashboards built for vLLM work unchanged.

Names and labels follow vLLM v1 (``model_name`` and ``engine``): the engine-state gauges are
read from the emulated engine at scrape time; latencies and token counts are recorded per
request. ``vllm:kv_cache_usage_perc`` is a fraction in [0, 1], as in vLLM despite its name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backends.base import BackendLoad

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets for TTFT and end-to-end latency, with sub-millisecond ones added for LPU and
# wafer-scale devices.
TTFT_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

LABELS = ["model_name", "engine"]


class BackendMetrics:
    """vLLM-named metrics of one instance, on their own registry."""

    def __init__(self, model_name: str, load: Callable[[], BackendLoad]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._labels = (model_name, "0")
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            LABELS,
            buckets=TTFT_BUCKETS,
            registry=r,
        ).labels(*self._labels)
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            LABELS,
            buckets=ITL_BUCKETS,
            registry=r,
        ).labels(*self._labels)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            LABELS,
            buckets=E2E_BUCKETS,
            registry=r,
        ).labels(*self._labels)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS, registry=r
        ).labels(*self._labels)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", LABELS, registry=r
        ).labels(*self._labels)
        self.requests = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*LABELS, "finished_reason"],
            registry=r,
        )
        r.register(_EngineCollector(self._labels, load))

    def finished(self, reason: str) -> None:
        self.requests.labels(*self._labels, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, labels: tuple[str, str], load: Callable[[], BackendLoad]) -> None:
        self._labels = list(labels)
        self._load = load

    def collect(self) -> Iterator[Metric]:
        load = self._load()
        for name, text, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.",
             load.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             load.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             load.kv_usage),
        ):  # fmt: skip
            family = GaugeMetricFamily(name, text, labels=LABELS)
            family.add_metric(self._labels, value)
            yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())
