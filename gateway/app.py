"""``create_app(settings)``: the FastAPI application, its lifespan and its error handling."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from backends.emulator.catalog import Catalog
from gateway import __version__
from gateway.api import errors
from gateway.api.admin import router as admin_router
from gateway.api.routes import BODY_COMPONENTS, HOT_ENDPOINTS, Endpoint, router
from gateway.service import BackendFactory, build_gateway
from gateway.settings import Settings


def create_app(
    settings: Settings,
    *,
    catalog: Catalog | None = None,
    backend_factory: BackendFactory | None = None,
    after_start: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the app; workers start in the lifespan and stop when it ends. ``after_start``
    runs once they have started (``pdgate serve`` settles the heap there: :func:`settle_heap`).

    Example::

        app = create_app(load_settings())
        uvicorn.run(app, loop="uvloop", http="httptools")
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = build_gateway(settings, catalog=catalog, backend_factory=backend_factory)
        await gateway.start()
        app.state.gateway = gateway
        if after_start is not None:
            after_start()
        try:
            yield
        finally:
            await gateway.close()

    docs = settings.docs_public  # with API keys on, closed unless server.public_docs
    app = GatewayApp(
        title="pdgate",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        openapi_url="/openapi.json" if docs else None,
        redoc_url=None,
    )
    errors.install(app)
    app.include_router(router)
    _publish_body_schemas(app)
    app.include_router(admin_router, include_in_schema=False)  # operators', not clients'
    return app


class GatewayApp(FastAPI):
    """FastAPI, with a short path for the two completion endpoints.

    ``POST /v1/chat/completions`` and ``POST /v1/completions`` go straight to their endpoint
    and the app's exception handlers, past Starlette's middleware stack and router (server
    errors, exception mapping, exit stacks, telemetry: six layers of ASGI calls), which do
    nothing for them: their endpoints read the request themselves and answer with responses
    that handle their own errors (:mod:`gateway.api.responses`). That is about 10 % of the
    gateway's CPU per completion. Every other request, and the OpenAPI document, is FastAPI's.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = HOT_ENDPOINTS.get(scope["path"])
            if endpoint is not None:
                await self._hot(endpoint, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _hot(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        request = Request(scope, receive)
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            response = await endpoint(request)
            await response(scope, receive, watched_send)
        except Exception as exc:
            if started:  # the status went out already: nothing left to answer with
                raise
            handler = self._handler(exc)
            if handler is None:
                raise
            answer = await handler(request, exc)
            await answer(scope, receive, send)

    def _handler(self, exc: Exception) -> _Handler | None:
        """The registered exception handler for ``exc``'s class or its nearest base."""
        for cls in type(exc).__mro__:
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                return cast(_Handler, handler)
        return None


_Handler = Callable[[Request, Exception], Awaitable[Response]]

# Tracked allocations between young-generation collections (CPython's default: 700).
YOUNG_GC_THRESHOLD = 10_000


def settle_heap() -> None:
    """Once the server is up: move everything alive into the permanent generation, and collect
    the young generation less often.

    A request allocates a few hundred container objects and frees nearly all of them by
    reference counting; at the default threshold the collector runs every few requests,
    scanning those still in flight, and promotes them into generations whose full scans also
    walk the ~90k objects of the imported modules. Frozen, those are never scanned again; at
    10,000 most of a request's objects are gone before a scan sees them. Together that is about
    10 % of the gateway's CPU per request at concurrency 64 (``loadtests/bench_gateway.py``).
    The cost: up to 10,000 young objects more before cyclic garbage is found (requests make
    none; ``tests/system/test_request_garbage.py`` checks)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, middle, old)


def _publish_body_schemas(app: FastAPI) -> None:
    """Add the hand-declared request-body schemas to the generated OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            document.setdefault("components", {}).setdefault("schemas", {}).update(BODY_COMPONENTS)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
