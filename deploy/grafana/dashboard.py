"""Builds ``dashboards/pdgate.json``, the provisioned Grafana dashboard, from the panel list below.

    python deploy/grafana/dashboard.py          # rewrite dashboards/pdgate.json
    python deploy/grafana/dashboard.py --check  # exit 1 if the JSON is out of date

Panels are data: a title, a one-line description (shown as the panel's tooltip and in
docs/observability.md), a unit and PromQL targets. Every query filters by the ``$model`` and
``$pool`` variables where the metric has those labels; ``$datasource`` picks the Prometheus.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "pdgate.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
M = 'model=~"$model"'
P = 'pool=~"$pool"'
W = "$__rate_interval"


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    kind: str = "timeseries"
    stack: bool = False
    options: dict[str, object] = field(default_factory=dict)


CIRCUIT_STATES = [
    {
        "type": "value",
        "options": {
            "0": {"text": "closed", "color": "green", "index": 0},
            "1": {"text": "half-open", "color": "yellow", "index": 1},
            "2": {"text": "open", "color": "red", "index": 2},
        },
    }
]


def quantiles(record: str, labels: str, legend: str, qs: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(f"{record}:{q}{{{labels}}}", f"{q} {legend}") for q in qs]


ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Latency",
        [
            Panel(
                "Time to first token",
                "TTFT p50/p90/p99 per model and mode: arrival at the gateway to the first token.",
                "s",
                quantiles(
                    "model_mode:pdgate_time_to_first_token_seconds",
                    M,
                    "{{model}} {{mode}}",
                    ("p50", "p90", "p99"),
                ),
            ),
            Panel(
                "Inter-token latency",
                "ITL p50/p90/p99 per model and mode: the gap between tokens as clients receive "
                "them.",
                "s",
                quantiles(
                    "model_mode:pdgate_inter_token_latency_seconds",
                    M,
                    "{{model}} {{mode}}",
                    ("p50", "p90", "p99"),
                ),
            ),
            Panel(
                "Time per output token and end-to-end latency",
                "TPOT (per request: decode time / tokens after the first) and end-to-end "
                "latency, p50 and p99.",
                "s",
                quantiles(
                    "model_mode:pdgate_time_per_output_token_seconds",
                    M,
                    "TPOT {{model}} {{mode}}",
                    ("p50", "p99"),
                )
                + quantiles(
                    "model_mode:pdgate_e2e_request_latency_seconds",
                    M,
                    "e2e {{model}} {{mode}}",
                    ("p50", "p99"),
                ),
            ),
            Panel(
                "Per-phase time (mean)",
                "Where a request's time goes in each pool: queue, prefill, KV transfer and "
                "decode compute, mean per request.",
                "s",
                [
                    (
                        f"model_pool_phase:pdgate_phase_seconds:mean1m{{{M}, {P}}}",
                        "{{pool}} {{phase}} ({{model}})",
                    )
                ],
                stack=True,
            ),
            Panel(
                "Per-phase time (p99)",
                "The same phases at p99: a long tail in one phase points at its pool.",
                "s",
                [
                    (
                        f"model_pool_phase:pdgate_phase_seconds:p99{{{M}, {P}}}",
                        "{{pool}} {{phase}} ({{model}})",
                    )
                ],
            ),
            Panel(
                "Backend TTFT and ITL per pool",
                "TTFT and ITL p50/p99 as each pool's instances measure them (vLLM metric names).",
                "s",
                quantiles(
                    "pool:vllm_time_to_first_token_seconds", P, "TTFT {{pool}}", ("p50", "p99")
                )
                + quantiles(
                    "pool:vllm_inter_token_latency_seconds", P, "ITL {{pool}}", ("p50", "p99")
                ),
            ),
        ],
    ),
    (
        "Throughput and goodput",
        [
            Panel(
                "Requests per second",
                "Finished requests per second by outcome (ok, cancelled, or the error code).",
                "reqps",
                [
                    (
                        f"sum by (outcome) (model_mode_outcome:pdgate_requests:rate1m{{{M}}})",
                        "{{outcome}}",
                    )
                ],
                stack=True,
            ),
            Panel(
                "Tokens per second",
                "Prompt tokens charged, completion tokens delivered and prompt tokens served "
                "from prefix caches, per second.",
                "short",
                [
                    (f"sum(model:pdgate_prompt_tokens:rate1m{{{M}}})", "prompt"),
                    (f"sum(model:pdgate_completion_tokens:rate1m{{{M}}})", "completion"),
                    (
                        f"sum(rate(pdgate_cached_prompt_tokens_total{{{M}, {P}}}[{W}]))",
                        "cached prompt",
                    ),
                ],
            ),
            Panel(
                "Goodput",
                "Requests per second meeting both the TTFT and the TPOT target, beside all "
                "finished requests.",
                "reqps",
                [
                    (f"sum(model_mode:pdgate_goodput_requests:rate1m{{{M}}})", "goodput"),
                    (
                        f"sum(model_mode_outcome:pdgate_requests:rate1m{{{M}}})",
                        "all finished",
                    ),
                ],
            ),
            Panel(
                "SLO attainment",
                "Share of completed requests meeting both targets per model, and per pool on "
                "the target each pool owns (prefill: TTFT, decode: TPOT).",
                "percentunit",
                [
                    (f"model_mode:pdgate_goodput:ratio_rate1m{{{M}}}", "{{model}} {{mode}}"),
                    (
                        f"model_pool:pdgate_pool_goodput:ratio_rate1m{{{M}, {P}}}",
                        "{{model}} pool {{pool}}",
                    ),
                ],
            ),
            Panel(
                "Targets met",
                "Completed requests per second by which targets they met: both, ttft only, "
                "tpot only, none.",
                "reqps",
                [
                    (
                        f"sum by (met) (rate(pdgate_slo_requests_total{{{M}}}[{W}]))",
                        "{{met}}",
                    )
                ],
                stack=True,
            ),
        ],
    ),
    (
        "Load and routing",
        [
            Panel(
                "Admission queue depth",
                "Requests (gateway) and legs (per pool) waiting for an admission slot.",
                "short",
                [
                    ('sum(pdgate_admission_queue_depth{pool="gateway"})', "gateway"),
                    (
                        "sum by (model, pool) "
                        f'(pdgate_admission_queue_depth{{{M}, {P}, pool!="gateway"}})',
                        "{{model}} {{pool}}",
                    ),
                ],
            ),
            Panel(
                "In flight per worker",
                "Legs in flight on each worker, and admission slots held per pool.",
                "short",
                [
                    (
                        f"sum by (pool, worker) (pdgate_worker_in_flight{{{M}, {P}}})",
                        "{{pool}}/{{worker}}",
                    ),
                    (
                        f"sum by (pool) (pdgate_admitted_in_flight{{{M}, {P}}})",
                        "admitted {{pool}}",
                    ),
                ],
            ),
            Panel(
                "Engine queue per worker",
                "Sequences running in each emulated worker's batch and waiting in its queue.",
                "short",
                [
                    (
                        f"sum by (pool, worker) (pdgate_worker_running_sequences{{{M}, {P}}})",
                        "running {{pool}}/{{worker}}",
                    ),
                    (
                        f"sum by (pool, worker) (pdgate_worker_waiting_sequences{{{M}, {P}}})",
                        "waiting {{pool}}/{{worker}}",
                    ),
                ],
            ),
            Panel(
                "Worker KV cache usage",
                "Share of each in-process emulated worker's KV cache in use.",
                "percentunit",
                [
                    (
                        f"max by (pool, worker) (pdgate_worker_kv_usage_ratio{{{M}, {P}}})",
                        "{{pool}}/{{worker}}",
                    )
                ],
            ),
            Panel(
                "Routing decisions",
                "Legs sent to each worker per second, by pool and policy: how evenly each "
                "policy spreads load.",
                "ops",
                [
                    (
                        f"sum by (pool, policy, worker) "
                        f"(rate(pdgate_routing_decisions_total{{{M}, {P}}}[{W}]))",
                        "{{pool}} {{policy}} → {{worker}}",
                    )
                ],
                stack=True,
            ),
            Panel(
                "Disaggregation decisions",
                "Conditional mode: requests prefilled remotely, or locally and why.",
                "ops",
                [
                    (
                        f"sum by (decision) "
                        f"(rate(pdgate_disaggregation_decisions_total{{{M}}}[{W}]))",
                        "{{decision}}",
                    )
                ],
                stack=True,
            ),
        ],
    ),
    (
        "KV transfer",
        [
            Panel(
                "KV transfer throughput",
                "KV cache bytes per second handed from prefill to decode workers.",
                "Bps",
                [(f"model:pdgate_kv_transfer_bytes:rate1m{{{M}}}", "{{model}}")],
            ),
            Panel(
                "KV transfer size and time",
                "Mean KV bytes per handoff, and the handoff's p50/p99 time on the decode side.",
                "bytes",
                [
                    (
                        f"sum by (model) (rate(pdgate_kv_transfer_bytes_sum{{{M}}}[{W}])) / "
                        f"sum by (model) (rate(pdgate_kv_transfer_bytes_count{{{M}}}[{W}]))",
                        "bytes per transfer {{model}}",
                    ),
                    (
                        "histogram_quantile(0.5, sum by (model, le) (rate("
                        f'pdgate_phase_seconds_bucket{{{M}, phase="kv_transfer"}}[{W}])))',
                        "p50 seconds {{model}}",
                    ),
                    (
                        "histogram_quantile(0.99, sum by (model, le) (rate("
                        f'pdgate_phase_seconds_bucket{{{M}, phase="kv_transfer"}}[{W}])))',
                        "p99 seconds {{model}}",
                    ),
                ],
                options={"seconds_override": r"/seconds/"},
            ),
        ],
    ),
    (
        "Backends (vLLM metric names)",
        [
            Panel(
                "Device KV cache usage",
                "vllm:kv_cache_usage_perc of each backend instance (a fraction, as in vLLM).",
                "percentunit",
                [(f"vllm:kv_cache_usage_perc{{{P}}}", "{{pool}} {{instance}}")],
            ),
            Panel(
                "Batch size and queue",
                "vllm:num_requests_running (the running batch) and vllm:num_requests_waiting "
                "per instance.",
                "short",
                [
                    (f"vllm:num_requests_running{{{P}}}", "running {{pool}} {{instance}}"),
                    (f"vllm:num_requests_waiting{{{P}}}", "waiting {{pool}} {{instance}}"),
                ],
            ),
            Panel(
                "Backend tokens per second",
                "Prompt and generation tokens per second each pool's instances processed.",
                "short",
                [
                    (f"pool:vllm_prompt_tokens:rate1m{{{P}}}", "prompt {{pool}}"),
                    (f"pool:vllm_generation_tokens:rate1m{{{P}}}", "generation {{pool}}"),
                ],
            ),
        ],
    ),
    (
        "Errors and resilience",
        [
            Panel(
                "Errors by type",
                "Failed requests per second by error code (upstream_failed, "
                "deadline_exceeded, no_healthy_worker, ...).",
                "reqps",
                [
                    (
                        "sum by (outcome) (model_mode_outcome:pdgate_requests:rate1m"
                        f'{{{M}, outcome!~"ok|cancelled"}})',
                        "{{outcome}}",
                    ),
                ],
                stack=True,
            ),
            Panel(
                "Error ratio",
                "Share of finished requests that failed, per model and mode.",
                "percentunit",
                [(f"model_mode:pdgate_request_errors:ratio_rate1m{{{M}}}", "{{model}} {{mode}}")],
            ),
            Panel(
                "Rejections",
                "429s per second before any work, by reason (full admission queue, "
                "unattainable SLO).",
                "reqps",
                [
                    (
                        f"sum by (reason) (rate(pdgate_rejections_total{{{M}}}[{W}]))",
                        "{{reason}}",
                    )
                ],
                stack=True,
            ),
            Panel(
                "Retries",
                "Legs retried on another worker per second, by pool and the error that caused "
                "the retry.",
                "ops",
                [
                    (
                        f"sum by (pool, error) (rate(pdgate_retries_total{{{M}, {P}}}[{W}]))",
                        "{{pool}} {{error}}",
                    )
                ],
                stack=True,
            ),
            Panel(
                "Circuit breakers",
                "Each worker's breaker: 0 closed, 1 half-open (one probe), 2 open (out of "
                "rotation).",
                "short",
                [
                    (
                        f"max by (pool, worker) (pdgate_worker_circuit_state{{{M}, {P}}})",
                        "{{pool}}/{{worker}}",
                    )
                ],
                kind="state-timeline",
                options={"mappings": CIRCUIT_STATES},
            ),
        ],
    ),
]


def _variables() -> list[dict[str, object]]:
    def query(name: str, label: str, metric: str) -> dict[str, object]:
        q = f"label_values({metric}, {label})"
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": q, "refId": f"{name}-values"},
            "definition": q,
            "refresh": 2,  # on time range change
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }

    return [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "refresh": 1,
        },
        query("model", "model", "pdgate_requests_total"),
        query("pool", "pool", "pdgate_worker_circuit_state"),
    ]


def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, object]:
    custom: dict[str, object] = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
    if p.stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    overrides: list[dict[str, object]] = []
    if "seconds_override" in p.options:
        overrides.append(
            {
                "matcher": {"id": "byRegexp", "options": p.options["seconds_override"]},
                "properties": [
                    {"id": "unit", "value": "s"},
                    {"id": "custom.axisPlacement", "value": "right"},
                ],
            }
        )
    return {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {
                "unit": p.unit,
                "custom": custom if p.kind == "timeseries" else {},
                "mappings": p.options.get("mappings", []),
            },
            "overrides": overrides,
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [
            {
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                "refId": chr(ord("A") + i),
            }
            for i, (expr, legend) in enumerate(p.targets)
        ],
    }


def build() -> dict[str, object]:
    panels: list[dict[str, object]] = []
    pid, y = 1, 0
    for title, row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y = pid + 1, y + 1
        for i, p in enumerate(row):
            panels.append(_panel(p, pid, (i % 3) * 8, y + (i // 3) * 8))
            pid += 1
        y += ((len(row) + 2) // 3) * 8
    return {
        "uid": "pdgate-overview",
        "title": "pdgate — disaggregated serving",
        "description": "Gateway latency, throughput, goodput, load, KV transfer, backends and "
        "errors (see docs/observability.md).",
        "tags": ["pdgate", "llm-serving"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": _variables()},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
