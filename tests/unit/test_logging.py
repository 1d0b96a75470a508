"""Structured logs: JSON lines with the request id, set per request by the API layer."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from gateway.logs import REQUEST_ID, JsonFormatter, TextFormatter, configure_logging, make_handler
from tests.helpers import MODEL, app_client, config, pool, settings
from tests.integration.conftest import CHAT, FakeFactory


def _record(msg: str = "hello %s", args: tuple[object, ...] = ("world",)) -> logging.LogRecord:
    return logging.LogRecord("pdgate.test", logging.WARNING, __file__, 1, msg, args, None)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """JSON lines of every ``pdgate.*`` logger, through the production handler."""
    out = io.StringIO()
    handler = make_handler("json", out)
    logger = logging.getLogger("pdgate")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def test_json_line_has_the_documented_fields() -> None:
    record = _record()
    record.request_id = "req-1"
    entry = orjson.loads(JsonFormatter().format(record))
    assert entry["message"] == "hello world"
    assert entry["level"] == "warning"
    assert entry["logger"] == "pdgate.test"
    assert entry["request_id"] == "req-1"
    assert str(entry["timestamp"]).endswith("+00:00")


def test_json_line_keeps_extras_and_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "pdgate.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    record.worker = "decode-0"
    entry = orjson.loads(JsonFormatter().format(record))
    assert entry["worker"] == "decode-0"
    assert "ValueError: boom" in str(entry["exception"])
    assert "request_id" not in entry


def test_handler_stamps_the_request_id_of_the_context() -> None:
    out = io.StringIO()
    handler = make_handler("json", out)
    token = REQUEST_ID.set("ctx-42")
    try:
        handler.handle(_record())
    finally:
        REQUEST_ID.reset(token)
    handler.handle(_record())
    first, second = _lines(out)
    assert first["request_id"] == "ctx-42"
    assert "request_id" not in second


def test_text_format_appends_the_request_id() -> None:
    record = _record()
    record.request_id = "abc"
    line = TextFormatter().format(record)
    assert line.endswith("WARNING pdgate.test hello world [abc]")


def test_configure_logging_replaces_root_handlers() -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_logging("warning", "json")
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.WARNING
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


async def test_a_retry_is_logged_with_the_clients_request_id(captured: io.StringIO) -> None:
    """A failing prefill worker is retried; the warning carries the id the client sent."""
    factory = FakeFactory(fail_prefill=True)
    data = config(prefill=pool("h100-sxm", 2), retries={"prefill": 1, "backoff_s": 0})
    async with app_client(settings(data), backend_factory=factory) as (_, c):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        resp = await c.post(CHAT, json=body, headers={"x-request-id": "client-id-7"})
    assert resp.status_code == 502
    assert resp.headers["x-request-id"] == "client-id-7"
    lines = [e for e in _lines(captured) if e["logger"] == "pdgate.dispatch"]
    assert [e["request_id"] for e in lines] == ["client-id-7", "client-id-7"]
    assert "retrying" in str(lines[0]["message"])
    assert "request failed" in str(lines[1]["message"])
