"""``create_app(settings)``: the FastAPI application, its lifespan and its error handling."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from backends.catalog import Catalog
from gateway import __version__
from gateway.admin import router as admin_router
from gateway.api import errors
from gateway.api.routes import BODY_COMPONENTS, router
from gateway.service import BackendFactory, build_gateway
from gateway.settings import Settings


def create_app(
    settings: Settings,
    *,
    catalog: Catalog | None = None,
    backend_factory: BackendFactory | None = None,
) -> FastAPI:
    """Build the app; workers start in the lifespan and stop when it ends.

    Example::

        app = create_app(load_settings())
        uvicorn.run(app, loop="uvloop", http="httptools")
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = build_gateway(settings, catalog=catalog, backend_factory=backend_factory)
        await gateway.start()
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(
        title="pdgate", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None
    )
    errors.install(app)
    app.include_router(router)
    _publish_body_schemas(app)
    app.include_router(admin_router)
    return app


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
