"""Workers at run time: ``/admin/workers`` to list, add, drain and remove them.

::

    GET    /admin/workers                     every worker: pool, type, URL, health, load
    POST   /admin/workers                     {"model", "role", "worker": {...}} → 201
    POST   /admin/workers/{id}/drain          finish in-flight legs, take no new ones
    DELETE /admin/workers/{id}                drain (bounded by admin.drain_timeout_s), remove

A worker spec is what a pool's ``workers`` list takes in the config (``type: http`` or
emulated). Ids are ``model/name`` as in metrics. Every call needs the admin key, from
``admin.api_key`` or the environment variable named by ``admin.api_key_env``, as
``Authorization: Bearer KEY`` or ``X-Admin-Key: KEY``; with no key configured the API is off.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import TypeAdapter, ValidationError
from starlette.responses import Response

from backends.emulator.catalog import format_validation_error
from gateway.errors import GatewayError, InvalidRequest
from gateway.registry import Pool, Worker
from gateway.service import Gateway
from gateway.settings import EmulatedWorker, HttpWorker, WorkerConfig, check_worker

router = APIRouter(prefix="/admin")
_SPEC = TypeAdapter[EmulatedWorker | HttpWorker](WorkerConfig)


class AdminUnauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_admin_key"


class AdminDisabled(GatewayError):
    status = 403
    type = "permission_error"
    code = "admin_disabled"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


def _gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    _authorize(gw, request)
    return gw


def _authorize(gw: Gateway, request: Request) -> None:
    cfg = gw.settings.admin
    key = cfg.api_key or os.environ.get(cfg.api_key_env)
    if not key:
        raise AdminDisabled(
            f"the admin API is off: set admin.api_key or the {cfg.api_key_env} variable"
        )
    given = request.headers.get("x-admin-key") or ""
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        given = given or auth[7:].strip()
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise AdminUnauthorized("a valid admin key is required (Authorization: Bearer KEY)")


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def describe(worker: Worker) -> dict[str, Any]:
    backend = worker.backend
    return {
        "id": worker.id,
        "name": worker.name,
        "model": worker.model,
        "role": worker.role,
        **backend.describe(),
        "healthy": backend.healthy(),
        "available": worker.available(),
        "draining": worker.draining,
        "in_flight": worker.in_flight,
    }


def _find(gw: Gateway, worker_id: str) -> tuple[Pool, Worker]:
    for pool in gw.registry.pools.values():
        for w in pool.workers:
            if w.id == worker_id:
                return pool, w
    raise NotFound(f"no worker '{worker_id}'", param="id")


@router.get("/workers")
async def list_workers(request: Request) -> Response:
    gw = _gateway(request)
    return _json({"workers": [describe(w) for w in gw.registry.workers()]})


@router.post("/workers")
async def add_worker(request: Request) -> Response:
    gw = _gateway(request)
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest('body must be {"model", "role", "worker": {...}}')
    model, role = data.get("model"), data.get("role")
    if (model, role) not in gw.registry.pools or not isinstance(model, str):
        raise NotFound(f"no pool '{role}' for model '{model}'", param="role")
    try:
        spec = _SPEC.validate_python(data.get("worker"))
    except ValidationError as exc:
        raise InvalidRequest(format_validation_error(exc, "worker"), param="worker") from exc
    limit = gw.settings.admin.max_new_workers
    if spec.replicas > limit:
        raise InvalidRequest(
            f"worker.replicas: at most {limit} workers per call (admin.max_new_workers)",
            param="worker.replicas",
        )
    config = gw.settings.model(model)
    if config is None or not isinstance(role, str):
        raise NotFound(f"no model '{model}'", param="model")
    problems = check_worker(spec, config, role, gw.catalog, "worker")
    if problems:
        raise InvalidRequest("; ".join(problems), param="worker")
    if gw.workers is None:
        raise AdminDisabled("this gateway cannot build workers at run time")
    added = await gw.add_workers(model, role, spec)
    return _json({"workers": [describe(w) for w in added]}, 201)


@router.post("/workers/{worker_id:path}/drain")
async def drain_worker(worker_id: str, request: Request) -> Response:
    gw = _gateway(request)
    _, worker = _find(gw, worker_id)
    worker.draining = True
    return _json(describe(worker))


@router.delete("/workers/{worker_id:path}")
async def remove_worker(worker_id: str, request: Request) -> Response:
    gw = _gateway(request)
    pool, worker = _find(gw, worker_id)
    worker.draining = True
    deadline = gw.clock.now() + gw.settings.admin.drain_timeout_s
    while worker.in_flight > 0 and gw.clock.now() < deadline:
        await gw.clock.sleep(0.05)  # in-flight counts change in sync code: poll them
    drained = worker.in_flight == 0
    await gw.remove_worker(pool, worker)
    return _json({"removed": worker.id, "drained": drained})
