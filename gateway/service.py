"""The assembled gateway: catalog → workers and pools → flows → dispatcher, plus metrics.

:func:`build_gateway` wires everything from :class:`~gateway.settings.Settings`; the app's
lifespan starts and closes it. Nothing here is a module-level singleton.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Protocol

from backends.base import Backend
from backends.clock import Clock, LoopClock
from backends.emulator.catalog import Catalog, Deployment
from backends.emulator.emulated import EmulatedBackend
from backends.emulator.timing import Link
from backends.tokens import TokenCounter
from backends.upstream.http import HttpBackend, HttpOptions
from gateway.admission import Limiter
from gateway.auth import (
    ApiKey,
    Authenticator,
    KeyRing,
    LocalRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    digest,
    resolve_secret,
)
from gateway.circuit import CircuitBreaker
from gateway.dispatch import FLOWS, Dispatcher, FlowDeps, Route
from gateway.health import HealthChecker
from gateway.metrics import GatewayMetrics, WorkerState
from gateway.policies import PolicyDeps, make_policy
from gateway.registry import Pool, Worker, WorkerRegistry
from gateway.settings import (
    ConfigError,
    EmulatedWorker,
    HttpWorker,
    ModelConfig,
    PoolConfig,
    Settings,
)
from gateway.state import InMemoryStateStore, StateStore

if TYPE_CHECKING:  # (redis is imported only for a config that uses it)
    import redis.asyncio as aioredis

log = logging.getLogger("pdgate.service")

# Each shutdown step gets this long; one that hangs (a wedged upstream, a Redis client that
# swallows its cancellation) is abandoned with a warning so the process still exits.
SHUTDOWN_STEP_S = 5.0


async def _bounded(step: Awaitable[None], what: str, seconds: float = SHUTDOWN_STEP_S) -> None:
    try:
        async with asyncio.timeout(seconds):
            await step
    except TimeoutError:
        log.warning("shutdown: %s did not finish within %.1f s; abandoned", what, seconds)


@dataclass
class ServedModel:
    config: ModelConfig
    route: Route
    counter: TokenCounter
    max_context: int


@dataclass
class Gateway:
    settings: Settings
    catalog: Catalog
    clock: Clock
    metrics: GatewayMetrics
    registry: WorkerRegistry
    dispatcher: Dispatcher
    models: dict[str, ServedModel]
    started: int
    auth: Authenticator
    redis: aioredis.Redis | None = None
    workers: WorkerBuilder | None = None  # builds workers added at run time (admin API)
    health: HealthChecker | None = None

    async def start(self) -> None:
        await self.registry.start()
        await self.auth.start()
        if self.health is not None:
            self.health.start()

    async def close(self) -> None:
        """Stop background work and release clients; every step is bounded in time."""
        if self.health is not None:
            await _bounded(self.health.close(), "health checks")
        await _bounded(self.auth.close(), "authenticator")
        await _bounded(self.registry.close(), "workers and state store")
        if self.redis is not None:
            await _bounded(self.redis.aclose(), "Redis client")

    async def add_workers(
        self, model: str, role: str, spec: EmulatedWorker | HttpWorker
    ) -> list[Worker]:
        """``spec.replicas`` new workers in a pool, built as at start-up (see
        :class:`WorkerBuilder`), started, then put in rotation together with the model's
        context limit recomputed, so no request sees one without the other."""
        if self.workers is None:
            raise RuntimeError("this gateway cannot build workers at run time")
        config = self.settings.model(model)
        if config is None:
            raise KeyError(model)
        pool = self.registry.pool(model, role)
        taken = {w.name for w in pool.workers}
        new: list[Worker] = []
        try:
            for _ in range(spec.replicas):
                name = free_name(taken, len(pool.workers) + len(new), spec.id or role)
                taken.add(name)
                new.append(self.workers.build(name, config, role, spec))
                await new[-1].backend.start()
        except BaseException:
            for w in new:
                await w.backend.close()
            raise
        for w in new:
            pool.add(w)
        self.registry.store.register_workers(w.id for w in new)
        self._update_context(config)
        return new

    async def remove_worker(self, pool: Pool, worker: Worker) -> None:
        """Take a (drained) worker out of its pool and close it."""
        if worker in pool.workers:
            pool.remove(worker)
            config = self.settings.model(pool.model)
            if config is not None:
                self._update_context(config)
            await worker.backend.close()

    def _update_context(self, config: ModelConfig) -> None:
        served = self.models.get(config.name)
        if served is not None:
            served.max_context = _max_context(config, self.catalog, self.registry)

    def unready_pools(self) -> list[str]:
        """Pools the serving modes need that have no available worker."""
        return [
            f"{pool.model}/{pool.role}"
            for pool in self.registry.pools.values()
            if not pool.candidates()
        ]

    def worker_states(self) -> Iterator[WorkerState]:
        for w in self.registry.workers():
            load, circuit = w.backend.load(), int(w.breaker.state)
            yield WorkerState(w.model, w.role, w.name, w.in_flight, load, circuit)

    def pool_queues(self) -> Iterator[tuple[str, str, int, int]]:
        """(model, pool, in flight, queued) per pool, and the gateway-wide limiter."""
        for pool in self.registry.pools.values():
            yield pool.model, pool.role, pool.limiter.active, pool.limiter.queued
        limiter = self.dispatcher.limiter
        yield "*", "gateway", limiter.active, limiter.queued


class BackendFactory(Protocol):
    """Makes the backend of one worker instance (the default builds emulated instances)."""

    def __call__(
        self, name: str, spec: EmulatedWorker | HttpWorker, model: ModelConfig, link: Link
    ) -> Backend: ...


def build_gateway(
    settings: Settings,
    *,
    backend_factory: BackendFactory | None = None,
    catalog: Catalog | None = None,
    clock: Clock | None = None,
    store: StateStore | None = None,
    metrics: GatewayMetrics | None = None,
) -> Gateway:
    catalog = catalog or Catalog.load()
    clock = clock or LoopClock()
    metrics = metrics or GatewayMetrics()
    redis = _redis(settings) if store is None else None
    if store is None:
        store = _store(settings, redis)
    builder = WorkerBuilder(catalog, clock, store, backend_factory or WorkerFactory(catalog, clock))

    registry = WorkerRegistry(store)
    deps = FlowDeps(registry, metrics, clock)
    models: dict[str, ServedModel] = {}
    for m in settings.models:
        for role, pool_cfg in m.pools.items():
            pool = _build_pool(m, role, pool_cfg, store, builder)
            pool.limiter.retry_after_s = settings.admission.retry_after_s
            registry.add_pool(pool)
        route = Route(m.name, m.mode, FLOWS[m.mode](m, deps), m)
        models[m.name] = ServedModel(
            m, route, TokenCounter(m.tokenizer), _max_context(m, catalog, registry)
        )
    admission = settings.admission
    limiter = Limiter(
        "gateway",
        max_active=admission.max_in_flight,
        max_queue=admission.max_queue,
        retry_after_s=admission.retry_after_s,
    )
    store.register_workers(w.id for w in registry.workers())
    gateway = Gateway(
        settings,
        catalog,
        clock,
        metrics,
        registry,
        Dispatcher(deps, limiter),
        models,
        int(time.time()),
        _authenticator(settings, redis),
        redis,
        builder,
        HealthChecker(registry, settings.health_checks),
    )
    metrics.watch(gateway.worker_states, gateway.pool_queues, store.status)
    return gateway


def _redis(settings: Settings) -> aioredis.Redis | None:
    cfg = settings.state
    if cfg.backend != "redis":
        return None
    from gateway.state_redis import redis_client

    return redis_client(cfg.redis_url, cfg.op_timeout_s)


def _store(settings: Settings, redis: aioredis.Redis | None) -> StateStore:
    cfg = settings.state
    if redis is None:
        return InMemoryStateStore()
    from gateway.state_redis import RedisStateStore

    return RedisStateStore(
        redis,
        replica_id=cfg.replica_id,
        key_prefix=cfg.key_prefix,
        sync_interval_s=cfg.sync_interval_s,
        lease_s=cfg.lease_s,
        op_timeout_s=cfg.op_timeout_s,
    )


def _authenticator(settings: Settings, redis: aioredis.Redis | None) -> Authenticator:
    cfg, state = settings.auth, settings.state
    keys = KeyRing(
        [
            ApiKey(
                name=k.name,
                digest=digest(resolve_secret(k.key, k.key_env, f"auth.api_keys[{k.name}]") or ""),
                requests_per_minute=k.requests_per_minute,
                tokens_per_minute=k.tokens_per_minute,
            )
            for k in cfg.api_keys
        ]
    )
    limiter: RateLimiter = (
        RedisRateLimiter(redis, key_prefix=state.key_prefix, op_timeout_s=state.op_timeout_s)
        if redis is not None
        else LocalRateLimiter()
    )
    return Authenticator(
        keys,
        limiter,
        enabled=cfg.enabled,
        redis=redis if cfg.keys_from_redis else None,
        key_prefix=state.key_prefix,
    )


def _max_context(m: ModelConfig, catalog: Catalog, registry: WorkerRegistry) -> int:
    """The model's context, capped by the smallest KV cache a request of it may land on."""
    limits = [catalog.model(m.profile_name).max_context]
    for role in m.pools:
        for w in registry.pool(m.name, role).workers:
            cap = w.backend.capacity_tokens()
            if cap is not None:
                limits.append(cap)
    return min(limits)


def _build_pool(
    m: ModelConfig, role: str, cfg: PoolConfig, store: StateStore, builder: WorkerBuilder
) -> Pool:
    policy = make_policy(cfg.policy, PolicyDeps(store, cfg.policy_options))
    limiter = Limiter(f"{m.name}/{role}", max_active=cfg.max_in_flight, max_queue=cfg.max_queue)
    pool = Pool(m.name, role, policy, limiter, cfg.policy)
    taken: set[str] = set()
    for spec in cfg.workers:
        for _ in range(spec.replicas):
            name = free_name(taken, len(pool.workers), spec.id or role)
            taken.add(name)
            pool.add(builder.build(name, m, role, spec))
    return pool


def free_name(taken: set[str], index: int, prefix: str) -> str:
    """``prefix-index``, the index raised past names already in the pool."""
    while f"{prefix}-{index}" in taken:
        index += 1
    return f"{prefix}-{index}"


@dataclass(frozen=True)
class WorkerBuilder:
    """Assembles a worker the one way, for the config's pools at start-up and for
    ``POST /admin/workers`` at run time: its backend from the factory, over the pool's KV link,
    and a circuit breaker that publishes to and follows the shared state store."""

    catalog: Catalog
    clock: Clock
    store: StateStore
    factory: BackendFactory

    def build(
        self, name: str, m: ModelConfig, role: str, spec: EmulatedWorker | HttpWorker
    ) -> Worker:
        pool = m.pools[role]  # type: ignore[index]
        link = replace(self.catalog.link(pool.kv_link), layerwise=pool.kv_layerwise)
        worker_id = f"{m.name}/{name}"
        breaker = CircuitBreaker(
            self.clock,
            failure_threshold=m.circuit.failure_threshold,
            cooldown_s=m.circuit.cooldown_s,
            on_open=partial(self.store.set_circuit_open, worker_id),
            # Only a shared store has other replicas to ask (asking a local one, each time a
            # leg picks its worker, says no).
            opened_elsewhere=(
                partial(self.store.circuit_open, worker_id) if self.store.status().shared else None
            ),
        )
        return Worker(name, m.name, role, self.factory(name, spec, m, link), breaker)


class WorkerFactory:
    """The default factory: emulated instances in-process, HTTP workers as upstream adapters."""

    def __init__(self, catalog: Catalog, clock: Clock) -> None:
        self._emulated = EmulatedFactory(catalog, clock)

    def __call__(
        self, name: str, spec: EmulatedWorker | HttpWorker, model: ModelConfig, link: Link
    ) -> Backend:
        if isinstance(spec, HttpWorker):
            return http_backend(name, spec)
        return self._emulated(name, spec, model, link)


def http_backend(name: str, spec: HttpWorker) -> HttpBackend:
    """The upstream adapter of one HTTP worker; its API key, if any, read from the environment
    variable the config names (:class:`ConfigError` when it is not set)."""
    api_key = None
    if spec.api_key_env is not None:
        api_key = os.environ.get(spec.api_key_env)
        if not api_key:
            raise ConfigError(
                f"worker {name} ({spec.url}): environment variable {spec.api_key_env} "
                "(its API key) is not set"
            )
    options = HttpOptions(
        max_connections=spec.max_connections,
        connect_timeout_s=spec.connect_timeout_s,
        prefill_timeout_s=spec.prefill_timeout_s,
        read_timeout_s=spec.read_timeout_s,
        served_model_name=spec.served_model_name,
        usage_per_chunk=spec.usage_per_chunk,
        api_key=api_key,
        health_path=spec.health_path,
        control_token=os.environ.get(spec.control_token_env) or None,
    )
    return HttpBackend(
        name, spec.url, spec.protocol, bootstrap_port=spec.bootstrap_port, options=options
    )


class EmulatedFactory:
    """Builds in-process emulated instances from the catalog."""

    def __init__(self, catalog: Catalog, clock: Clock) -> None:
        self._catalog = catalog
        self._clock = clock

    def __call__(
        self, name: str, spec: EmulatedWorker | HttpWorker, model: ModelConfig, link: Link
    ) -> Backend:
        if not isinstance(spec, EmulatedWorker):
            raise TypeError(f"{name}: EmulatedFactory builds emulated workers only")
        deployment = worker_deployment(self._catalog, spec, model)
        return EmulatedBackend(name, deployment, self._clock, link=link, time_scale=spec.time_scale)


def worker_deployment(catalog: Catalog, spec: EmulatedWorker, model: ModelConfig) -> Deployment:
    """The deployment an emulated worker entry describes."""
    return catalog.deployment(
        spec.device,
        model.profile_name,
        dtype=spec.dtype,
        count=spec.count,
        tp=spec.tp,
        engine=catalog.engine_knobs(
            spec.engine_profile,
            spec.device,
            spec.engine,
            ranks=spec.layout.dp if spec.layout else 1,
        ),
        layout=spec.layout,
        weights=spec.weights,
    )
