"""Gateway errors, one tree, rendered to clients in exactly one place (``gateway.api.errors``).

::

    GatewayError                      status  type
    ├── InvalidRequest                400     invalid_request_error
    ├── Unauthorized                  401     invalid_request_error (code invalid_api_key)
    ├── ModelNotFound                 404     invalid_request_error (code model_not_found)
    ├── PayloadTooLarge               413     invalid_request_error
    ├── Overloaded                    429     rate_limit_error (with Retry-After)
    ├── UpstreamRejected              4xx     as the upstream said (the client's error)
    ├── NoHealthyWorker               503     service_unavailable
    ├── UpstreamFailed                502     upstream_error
    ├── DeadlineExceeded              504     timeout
    └── UpstreamTimeout               504     timeout (code upstream_timeout)

Messages never carry worker names, URLs or upstream bodies (those go to the log); an upstream's
own client error is relayed with its message, which is about the request.

Backend errors (``backends.errors``) are translated into these by the dispatcher.
"""

from __future__ import annotations

import math


class GatewayError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        """Extra response headers this error carries."""
        return {}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Overloaded(GatewayError):
    """Refused before any work started: at capacity, or no worker can meet the request's SLO."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float, reason: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class NoHealthyWorker(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "no_healthy_worker"


class UpstreamFailed(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_failed"


class DeadlineExceeded(GatewayError):
    status = 504
    type = "timeout"
    code = "deadline_exceeded"


class UpstreamRejected(GatewayError):
    """The upstream refused the request (a 4xx): its status and envelope, relayed."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param)
        self.status = status
        self.type = type
        self.code = code


class UpstreamTimeout(GatewayError):
    """A worker went silent past the leg's timeout while making no progress at all."""

    status = 504
    type = "timeout"
    code = "upstream_timeout"
