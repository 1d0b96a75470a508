"""Gateway configuration: typed, validated at start, with the YAML path in every error.

A config serves one or more models; each model has a mode and the pools that mode needs::

    server: {host: 127.0.0.1, port: 8000}
    models:
      - name: llama-3.1-8b          # name clients send; also the catalog profile by default
        mode: disaggregated         # or: aggregated
        pools:
          prefill:
            policy: least_loaded
            kv_link: roce_200g      # link the prefill instances hand KV over (config/links.yaml)
            workers: [{device: h100-sxm, replicas: 2}]
          decode:
            policy: round_robin
            workers: [{device: groq-lpu-v1, replicas: 2}]

Structural checks are pydantic's; names that refer to the catalog (devices, models, links,
policies) and deployments that must fit in memory are checked by :func:`load_settings` against
the catalog, so a bad config fails before anything starts, e.g.
``models[0].pools.decode.workers[0].device: unknown device 'h1000'; known: ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from backends.emulator.catalog import (
    Catalog,
    EngineKnobs,
    ParallelLayout,
    WeightFormats,
    format_validation_error,
)
from backends.errors import CatalogError

Role = Literal["prefill", "decode", "aggregated"]
Mode = Literal["disaggregated", "aggregated", "conditional"]

MODE_POOLS: dict[str, tuple[Role, ...]] = {
    "disaggregated": ("prefill", "decode"),
    "aggregated": ("aggregated",),
    "conditional": ("prefill", "decode"),
}


class ConfigError(Exception):
    """The configuration is invalid; the message names the YAML path and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmulatedWorker(_Strict):
    """``replicas`` identical emulated instances of one deployment."""

    type: Literal["emulated"] = "emulated"
    id: str | None = Field(None, description="instance id prefix (default: '<pool>-<device>')")
    device: str
    count: int | None = Field(
        None,
        gt=0,
        description="devices per instance (default: tp, "
        "or derived from memory for LPU and wafer-scale devices)",
    )
    tp: int = Field(1, gt=0)
    dtype: Literal["bf16", "fp8", "fp4"] = "bf16"
    replicas: int = Field(1, gt=0)
    time_scale: float = Field(1.0, ge=0, description="emulated time runs this much faster")
    engine: EngineKnobs = EngineKnobs()
    engine_profile: str | None = Field(
        None,
        description="engine profile (config/engines, e.g. vllm-0.14, sglang-0.5, trtllm-1.1) "
        "whose defaults apply; fields set under `engine` override them",
    )
    layout: ParallelLayout | None = Field(
        None, description="TP/PP/attention-DP/MoE-TP/EP layout (default: tp-way tensor parallel)"
    )
    weights: WeightFormats | None = Field(
        None, description="weight-only formats (dense, experts) where they differ from dtype"
    )


class HttpWorker(_Strict):
    """One real upstream server (vLLM, SGLang or any OpenAI-compatible server) at ``url``.

    ``protocol`` says how the legs talk to it: ``vllm-nixl`` (kv_transfer_params),
    ``sglang-bootstrap`` (bootstrap rooms; prefill workers need ``bootstrap_port``) or
    ``openai`` (aggregated pools only).
    """

    type: Literal["http"]
    id: str | None = Field(None, description="instance id prefix (default: the pool's role)")
    url: str = Field(pattern=r"^https?://", description="base URL, e.g. http://10.0.0.5:8000")
    protocol: Literal["vllm-nixl", "sglang-bootstrap", "openai"]
    bootstrap_port: int | None = Field(None, gt=0, le=65535)
    max_connections: int = Field(512, gt=0, description="pooled connections to this upstream")
    connect_timeout_s: float = Field(5.0, gt=0)
    prefill_timeout_s: float = Field(300.0, gt=0, description="a whole prefill leg")
    read_timeout_s: float = Field(120.0, gt=0, description="longest silence within a stream")
    served_model_name: str | None = Field(
        None, description="the model name the upstream serves (default: the name clients send)"
    )
    control_token_env: str = Field(
        "PDGATE_CONTROL_TOKEN",
        description="environment variable with the upstream's control-plane token (pdgate "
        "backend's KV release); unset: none sent",
    )
    usage_per_chunk: bool = Field(
        True,
        description="ask streams for usage on every event (continuous_usage_stats): exact "
        "tokens per chunk for ITL and TPOT when events carry several tokens; off saves upstream "
        "and gateway CPU, counts one token per event, and still settles totals exactly",
    )

    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the upstream's API key, sent as "
        "`Authorization: Bearer` (hosted APIs: GroqCloud, Cerebras, SambaCloud, SiliconFlow); "
        "the key itself never goes in the config",
    )
    health_path: str = Field(
        "/health",
        pattern=r"^/",
        description="what health checks GET (hosted APIs: their model list, /v1/models)",
    )

    @property
    def replicas(self) -> int:
        return 1


def _worker_type(value: object) -> str:
    """``type`` selects the worker model; absent means ``emulated``."""
    if isinstance(value, dict):
        return str(value.get("type", "emulated"))
    return str(getattr(value, "type", "emulated"))


WorkerConfig = Annotated[
    Annotated[EmulatedWorker, Tag("emulated")] | Annotated[HttpWorker, Tag("http")],
    Discriminator(
        _worker_type,
        custom_error_type="worker_type",
        custom_error_message="worker type must be 'emulated' or 'http'",
    ),
]


class PoolConfig(_Strict):
    policy: str = "round_robin"
    policy_options: dict[str, float | int | str | bool] = Field(
        default_factory=dict, description="keyword options of the policy (see gateway/policies)"
    )
    kv_link: str = "roce_200g"
    kv_layerwise: bool = Field(
        False, description="send KV layer by layer during the prefill (only the last is exposed)"
    )
    max_in_flight: int | None = Field(None, gt=0, description="legs running at once (None: no cap)")
    max_queue: int = Field(0, ge=0, description="legs waiting beyond max_in_flight before 429")
    workers: list[WorkerConfig] = Field(min_length=1)


class RetryConfig(_Strict):
    """Retries before the first byte of a leg; after it, the client gets an error event."""

    prefill: int = Field(2, ge=0, description="extra prefill attempts on other workers")
    decode: int = Field(1, ge=0, description="extra decode attempts on other workers")
    backoff_s: float = Field(0.01, ge=0, description="first backoff; doubles, jittered ±50%")


class TimeoutConfig(_Strict):
    """Per-leg timeouts: seconds, far below engine defaults, so a stuck leg fails fast."""

    prefill_s: float = Field(30.0, gt=0, description="a prefill leg, queue included")
    decode_first_token_s: float = Field(30.0, gt=0, description="decode leg to its first token")
    decode_idle_s: float = Field(15.0, gt=0, description="longest gap between decode chunks")


class CircuitConfig(_Strict):
    failure_threshold: int = Field(5, gt=0, description="consecutive failures that open it")
    cooldown_s: float = Field(10.0, gt=0, description="open this long, then one probe")


# The one default SLO, behind the gateway's goodput metrics, `pdgate simulate` and
# `pdgate report`: MLPerf Inference's server-scenario latency limits for Llama 3.1 8B, the
# embedded config's model (TTFT 2 s, TPOT 100 ms at p99; mlcommons/inference
# loadgen/mlperf.conf, llama3_1-8b Server, 2025). Larger models have looser limits there
# (Llama 2 70B: TPOT 200 ms): set ``slo`` per model, or pass --slo-tpot.
SLO_TTFT_S = 2.0
SLO_TPOT_S = 0.1


class SloConfig(_Strict):
    """Latency targets; requests meeting both count as goodput (MLPerf's server limits)."""

    ttft_s: float = Field(SLO_TTFT_S, gt=0)
    tpot_s: float = Field(SLO_TPOT_S, gt=0)


class ConditionalConfig(_Strict):
    """When ``conditional`` mode prefills on the decode worker instead of the prefill pool."""

    local_max_prompt_tokens: int = Field(
        512, ge=0, description="prompts up to this long prefill locally"
    )
    local_min_prefix_hit: float = Field(
        0.5, ge=0, le=1, description="prefill locally when this share of the prompt is cached"
    )
    prefill_busy_wait_s: float = Field(
        0.5, ge=0, description="prefill locally when the prefill pool's predicted wait exceeds it"
    )
    local_max_kv_usage: float = Field(
        0.8,
        gt=0,
        le=1,
        description="never prefill locally when the decode worker's KV, with its queued prompts "
        "and this one, would be fuller than this",
    )


class AdmissionConfig(_Strict):
    max_in_flight: int | None = Field(None, gt=0, description="requests at once (None: no cap)")
    max_queue: int = Field(0, ge=0, description="requests waiting beyond that before 429")
    retry_after_s: float = Field(1.0, gt=0, description="Retry-After sent with 429")


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    profile: str | None = Field(None, description="catalog model profile (default: name)")
    tokenizer: Path | None = Field(None, description="Hugging Face tokenizer.json")
    mode: Mode = "disaggregated"
    default_max_tokens: int = Field(256, gt=0)
    slo: SloConfig = SloConfig()
    retries: RetryConfig = RetryConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    circuit: CircuitConfig = CircuitConfig()
    conditional: ConditionalConfig = ConditionalConfig()
    first_token: Literal["prefill", "decode"] = Field(
        "prefill",
        description="disaggregated: where the client's first token comes from. prefill: sent "
        "as soon as the prefill returns it (the lowest TTFT); decode: held until the decode "
        "worker streams, as SGLang's PD mode and NVIDIA Dynamo serve it (the first token "
        "reaches the client through the decode worker once it has admitted the request and "
        "pulled its KV, so a full decode pool shows in TTFT rather than in TPOT)",
    )
    pools: dict[Role, PoolConfig]

    @model_validator(mode="after")
    def _mode_has_pools(self) -> ModelConfig:
        missing = [p for p in MODE_POOLS[self.mode] if p not in self.pools]
        if missing:
            raise ValueError(
                f"mode '{self.mode}' needs pools {list(MODE_POOLS[self.mode])}; missing {missing}"
            )
        return self

    @property
    def profile_name(self) -> str:
        return self.profile or self.name


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    request_timeout_s: float = Field(120.0, gt=0, description="default per-request deadline")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per line, with the request id"
    )
    access_log: bool = False
    public_metrics: bool | None = Field(
        None,
        description="serve /metrics without an API key (default: yes unless auth.api_keys is "
        "on; closed, Prometheus scrapes with any client key as its bearer token)",
    )
    public_docs: bool | None = Field(
        None, description="serve /docs and /openapi.json (default: yes unless auth is on)"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers must arrive within this (slowloris)"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request's body must arrive within this after its headers"
    )


class StateConfig(_Strict):
    """Where shared state lives: this process (``memory``) or Redis, shared by replicas."""

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "pdgate"
    replica_id: str | None = Field(None, description="default: hostname-pid")
    sync_interval_s: float = Field(0.05, gt=0, description="how often the local view syncs")
    lease_s: float = Field(10.0, gt=0, description="a replica's counts expire this long after it")
    op_timeout_s: float = Field(0.05, gt=0, description="Redis round trips give up after this")


class ApiKeyConfig(_Strict):
    name: str = Field(min_length=1, description="shown in logs and metrics instead of the key")
    key: str | None = Field(None, min_length=8)
    key_env: str | None = Field(None, description="read the key from this environment variable")
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyConfig:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give exactly one of key and key_env")
        return self


class AuthConfig(_Strict):
    """Bearer API keys for /v1 endpoints (none configured: open). The admin API has its own
    key (:class:`AdminConfig`)."""

    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    keys_from_redis: bool = Field(False, description="also accept keys provisioned in Redis")

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys) or self.keys_from_redis


class AdminConfig(_Strict):
    """The admin API (``/admin/workers``): off unless a key is set here or in the environment."""

    api_key: str | None = Field(None, description="key for the admin API")
    api_key_env: str = Field("PDGATE_ADMIN_KEY", description="environment variable with the key")
    drain_timeout_s: float = Field(
        60.0, gt=0, description="DELETE waits this long for in-flight legs to finish"
    )
    max_new_workers: int = Field(
        64, gt=0, description="the most workers one POST /admin/workers may add"
    )


class HealthCheckConfig(_Strict):
    """Active health checks of HTTP workers (``GET /health``)."""

    interval_s: float = Field(5.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)
    failure_threshold: int = Field(2, gt=0, description="failed checks that take it out")
    success_threshold: int = Field(1, gt=0, description="passed checks that bring it back")


class Settings(_Strict):
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    health_checks: HealthCheckConfig = HealthCheckConfig()
    admission: AdmissionConfig = AdmissionConfig()
    state: StateConfig = StateConfig()
    auth: AuthConfig = AuthConfig()
    models: list[ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _redis_for_redis_keys(self) -> Settings:
        if self.auth.keys_from_redis and self.state.backend != "redis":
            raise ValueError("auth.keys_from_redis needs state.backend: redis")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {dupes}")
        return self

    @property
    def metrics_public(self) -> bool:
        public = self.server.public_metrics
        return not self.auth.enabled if public is None else public

    @property
    def docs_public(self) -> bool:
        public = self.server.public_docs
        return not self.auth.enabled if public is None else public

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


def default_config_path() -> Path:
    """The embedded default config (shipped as package data)."""
    return Catalog.default_dir() / "default.yaml"


def load_settings(
    path: Path | None = None, *, catalog: Catalog | None = None, policies: set[str] | None = None
) -> Settings:
    """Read, validate and cross-check a config file against the catalog."""
    path = path or default_config_path()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_settings(data, catalog=catalog, policies=policies, source=str(path))


def parse_settings(
    data: object,
    *,
    catalog: Catalog | None = None,
    policies: set[str] | None = None,
    source: str = "<config>",
) -> Settings:
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc)}") from exc
    problems = check_references(settings, catalog or Catalog.load(), policies)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return settings


def check_references(settings: Settings, catalog: Catalog, policies: set[str] | None) -> list[str]:
    """Every catalog/policy name resolves and every emulated deployment fits."""
    problems: list[str] = []
    for i, m in enumerate(settings.models):
        where = f"models[{i}]"
        if m.profile_name not in catalog.models:
            problems.append(
                f"{where}.profile: unknown model '{m.profile_name}'; known: "
                f"{', '.join(sorted(catalog.models))}"
            )
            continue
        if m.tokenizer is not None and not m.tokenizer.is_file():
            problems.append(f"{where}.tokenizer: no such file '{m.tokenizer}'")
        for role, pool in m.pools.items():
            at = f"{where}.pools.{role}"
            problem = _check_policy_options(pool) if policies and pool.policy in policies else None
            if problem:
                problems.append(f"{at}.policy_options: {problem}")
            if policies is not None and pool.policy not in policies:
                problems.append(
                    f"{at}.policy: unknown policy '{pool.policy}'; known: "
                    f"{', '.join(sorted(policies))}"
                )
            if pool.kv_link not in catalog.links:
                problems.append(
                    f"{at}.kv_link: unknown link '{pool.kv_link}'; known: "
                    f"{', '.join(sorted(catalog.links))}"
                )
            for j, w in enumerate(pool.workers):
                problems += check_worker(w, m, role, catalog, f"{at}.workers[{j}]")
    return problems


def check_worker(
    w: EmulatedWorker | HttpWorker, m: ModelConfig, role: str, catalog: Catalog, at: str
) -> list[str]:
    """Problems with one worker of a ``role`` pool (empty if none)."""
    if isinstance(w, HttpWorker):
        return _check_http_worker(w, role, at)
    return _check_worker(w, m, catalog, at)


def _check_http_worker(w: HttpWorker, role: str, at: str) -> list[str]:
    if w.protocol == "openai" and role != "aggregated":
        return [f"{at}.protocol: 'openai' upstreams serve aggregated pools only, not '{role}'"]
    if w.protocol == "sglang-bootstrap" and role == "prefill" and w.bootstrap_port is None:
        return [f"{at}.bootstrap_port: sglang-bootstrap prefill workers need their bootstrap port"]
    return []


def _check_policy_options(pool: PoolConfig) -> str | None:
    """Build the pool's policy once, so bad options fail at load, not at start."""
    from gateway.policies import PolicyDeps, PolicyError, make_policy
    from gateway.state import InMemoryStateStore

    try:
        make_policy(pool.policy, PolicyDeps(InMemoryStateStore(), pool.policy_options))
    except PolicyError as exc:
        return str(exc)
    return None


def _check_worker(w: EmulatedWorker, m: ModelConfig, catalog: Catalog, at: str) -> list[str]:
    if w.device not in catalog.devices:
        return [
            f"{at}.device: unknown device '{w.device}'; known: {', '.join(sorted(catalog.devices))}"
        ]
    try:
        catalog.deployment(
            w.device, m.profile_name, dtype=w.dtype, count=w.count, tp=w.tp, engine=w.engine
        )
    except CatalogError as exc:
        return [f"{at}: {exc}"]
    return []
