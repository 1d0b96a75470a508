"""Errors raised by backends, one tree for the whole package.

::

    BackendError
    ├── CatalogError          bad device/model/link data or a deployment that cannot fit
    ├── BackendUnavailable    the backend cannot take requests (closed, unhealthy, unreachable)
    ├── BackendOverloaded     the backend refused the request for lack of capacity
    └── LegFailed             a prefill or decode leg failed after it was accepted

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
