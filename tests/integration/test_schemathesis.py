"""Property-based API testing: requests generated from the gateway's own OpenAPI schema.

Schemathesis generates valid and invalid requests for every operation the schema declares and
sends them to the app in-process (its ASGI transport runs the app's lifespan on a background
event loop). No request may end in a server error, and responses must match the schema where
it declares them. The generated ``model`` is pinned to the served model so that valid bodies
reach the dispatcher instead of stopping at 404; everything else is generated freely.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import response_schema_conformance

from gateway.app import create_app
from tests.helpers import MODEL, config, pool
from tests.helpers import settings as gateway_settings

# Short outputs on fast emulated devices: each generated request costs milliseconds.
APP = create_app(
    gateway_settings(
        config(
            default_max_tokens=4,
            prefill=pool("h100-sxm", 2, time_scale=1000),
            decode=pool("groq-lpu-v1", 2, time_scale=1000),
        )
    )
)


BODIES = ("/v1/chat/completions", "/v1/completions")


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolves(spec: dict[str, Any], ref: str) -> bool:
    if not ref.startswith("#/"):
        return False
    node: Any = spec
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _pinned_schema() -> dict[str, Any]:
    """The published schema with ``model`` narrowed to the served one, so generated bodies
    reach the dispatcher instead of stopping at 404."""
    spec = copy.deepcopy(APP.openapi())
    for path in BODIES:
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        name = body["schema"]["$ref"].rsplit("/", 1)[1]
        spec["components"]["schemas"][name]["properties"]["model"] = {
            "type": "string",
            "enum": [MODEL],
        }
    return spec


schema = schemathesis.openapi.from_dict(_pinned_schema())
schema.app = APP

# (path, status) of every generated request, for the sanity check at the end.
SEEN: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _stop_the_app() -> Iterator[None]:
    yield
    shutdown_lifespans()  # the lifespan schemathesis started for APP


def test_schema_covers_the_api() -> None:
    operations = {
        (op.method.upper(), op.path)
        for result in schema.get_all_operations()
        for op in [result.ok()]
    }
    # Other operations (the admin API) are generated for too; these must be there.
    assert operations >= {
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/health"),
        ("GET", "/ready"),
        ("GET", "/metrics"),
    }


def test_published_schema_refs_resolve() -> None:
    spec = APP.openapi()
    dangling = sorted({ref for ref in _refs(spec) if not _resolves(spec, ref)})
    assert dangling == []


def test_generated_operations_have_their_bodies() -> None:
    """Nothing was skipped for being unresolvable: the bodies are generated, not left empty."""
    for path in BODIES:
        operation = schema[path]["POST"]
        assert operation.skipped_parameters == []
        assert not operation.has_skipped_required_body


@schema.parametrize()
@settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api(case: schemathesis.Case) -> None:
    response = case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])
    assert response.status_code < 500
    SEEN[(case.operation.path, response.status_code)] += 1
    if case.operation.method.upper() == "POST" and response.status_code == 200:
        content_type = response.headers["content-type"][0]
        assert content_type.startswith(("application/json", "text/event-stream"))


def test_generated_requests_were_served() -> None:
    """Valid generated completions reached the workers (the run was not all 4xx)."""
    if not all(any(p == path for p, _ in SEEN) for path in BODIES):
        pytest.skip("checks what test_api sent; runs after it")
    for path in BODIES:
        assert SEEN[(path, 200)] > 0, repr(sorted(SEEN.items()))
        assert sum(n for (p, status), n in SEEN.items() if p == path and status == 400) > 0, SEEN
