"""Active health checks: probe each HTTP worker's ``/health`` every few seconds.

A worker that fails ``failure_threshold`` checks in a row leaves rotation (its backend reports
itself unhealthy, so pools stop offering it and ``/ready`` sees it); ``success_threshold``
passes in a row bring it back. Emulated workers live in-process and are not probed.

Example::

    checker = HealthChecker(registry, HealthCheckConfig(interval_s=5))
    checker.start()          # in the app's lifespan
    await checker.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol, runtime_checkable

from gateway.registry import Worker, WorkerRegistry
from gateway.settings import HealthCheckConfig

log = logging.getLogger("pdgate.health")


@runtime_checkable
class Probeable(Protocol):
    """A backend that can be probed from outside (HTTP upstreams)."""

    def set_healthy(self, value: bool) -> None: ...

    async def probe(self, limit_s: float) -> bool: ...


class HealthChecker:
    """Probes every probeable worker of a registry on an interval (see the module docstring)."""

    def __init__(self, registry: WorkerRegistry, config: HealthCheckConfig) -> None:
        self._registry = registry
        self._config = config
        self._streaks: dict[str, int] = {}  # worker id → +passes / −failures in a row
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check_once(self) -> None:
        """Probe every probeable worker once, concurrently, and apply the thresholds."""
        workers = [w for w in self._registry.workers() if isinstance(w.backend, Probeable)]
        if not workers:
            return
        results = await asyncio.gather(
            *(_probe(w, self._config.timeout_s) for w in workers), return_exceptions=True
        )
        for worker, ok in zip(workers, results, strict=True):
            self._apply(worker, ok is True)

    def _apply(self, worker: Worker, ok: bool) -> None:
        backend = worker.backend
        assert isinstance(backend, Probeable)
        streak = self._streaks.get(worker.id, 0)
        streak = max(streak, 0) + 1 if ok else min(streak, 0) - 1
        self._streaks[worker.id] = streak
        was = worker.backend.healthy()
        if ok and not was and streak >= self._config.success_threshold:
            backend.set_healthy(True)
            log.warning("worker %s passed its health checks: back in rotation", worker.id)
        elif not ok and was and -streak >= self._config.failure_threshold:
            backend.set_healthy(False)
            log.warning("worker %s failed %d health checks: out of rotation", worker.id, -streak)

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # a bug here must not stop checking
                log.exception("health check round failed")
            await asyncio.sleep(self._config.interval_s)


async def _probe(worker: Worker, limit_s: float) -> bool:
    backend = worker.backend
    assert isinstance(backend, Probeable)
    return await backend.probe(limit_s)
