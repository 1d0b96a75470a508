"""The one place gateway errors become HTTP responses (OpenAI's error envelope)."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from gateway.errors import GatewayError, InvalidRequest

log = logging.getLogger("pdgate.api")


def error_body(exc: GatewayError) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": exc.message,
                "type": exc.type,
                "param": exc.param,
                "code": exc.code,
            }
        }
    )


def error_response(exc: GatewayError) -> Response:
    return Response(
        error_body(exc),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers(),
    )


def sse_error_event(exc: GatewayError) -> bytes:
    """An error after the stream started: one SSE event in OpenAI's shape."""
    return b"data: " + error_body(exc) + b"\n\n"


def invalid_request(exc: ValidationError | RequestValidationError) -> InvalidRequest:
    """Name the first offending field, the way OpenAI's ``param`` does."""
    first = exc.errors()[0]
    # Without "body" (FastAPI's) and the union member a value failed as ("str", "list[int]").
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_member(p)]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    return InvalidRequest(f"{param}: {message}" if param else message, param=param)


def _union_member(part: object) -> bool:
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool") or part.startswith(("list[", "dict["))
    )


def install(app: FastAPI) -> None:
    """Render every error the app can raise in the OpenAI envelope (no FastAPI 422s)."""

    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return error_response(exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return error_response(invalid_request(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        err = GatewayError(str(exc.detail))
        err.status, err.type = exc.status_code, "invalid_request_error"
        return error_response(err)

    async def client_gone(request: Request, exc: Exception) -> Response:
        # Routine: the client closed the connection before its body arrived. Nobody is left
        # to answer; one line, no traceback.
        log.info("client disconnected before its request body arrived (%s)", request.url.path)
        return Response(status_code=499)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(GatewayError("internal error"))

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, unexpected)
