"""Errors raised by backends, one tree for the whole package.

::

    BackendError
    ├── CatalogError          bad device/model/link data or a deployment that cannot fit
    ├── BackendUnavailable    the backend cannot take requests (closed, unhealthy, unreachable)
    ├── BackendOverloaded     the backend refused the request for lack of capacity
    ├── UpstreamRejected      the upstream refused the request itself (a 4xx): the client's
    │                         error, not the worker's; never retried, never held against it
    └── LegFailed             a prefill or decode leg failed after it was accepted
        └── LegTimeout        ...by going silent past its timeout while its worker stalled

Adapters translate their transport's exceptions into these at their boundary
(``raise LegFailed(...) from exc``); nothing above ``backends/`` sees the HTTP client's errors.
"""


class BackendError(Exception):
    """Base of every error raised by ``backends``."""


class CatalogError(BackendError):
    """Invalid catalog data or an impossible deployment."""


class BackendUnavailable(BackendError):
    """The backend cannot take requests."""


class BackendOverloaded(BackendError):
    """The backend refused the request for lack of capacity."""


class LegFailed(BackendError):
    """A leg failed after the backend accepted it."""


class UpstreamRejected(BackendError):
    """The upstream answered a client error (a 4xx about the request: 400, 413, 422...).

    The worker is fine: the request is wrong for it (context longer than its
    ``--max-model-len``, bad token ids, ...). The status and the upstream's ``message``,
    ``type``, ``param`` and ``code`` go back to the client unchanged."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code


class LegTimeout(LegFailed):
    """A leg produced nothing within its timeout while its worker made no progress at all."""
