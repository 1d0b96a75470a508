"""Read deadlines and HTTP/1.0 framing of the HTTP protocol ``pdgate serve`` and ``pdgate
backend`` run (``backends.server.guard``), with real sockets against real uvicorn processes."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.backend_procs import MODEL, Proc, run_backend, run_gateway
from tests.helpers import config, pool

pytestmark = pytest.mark.timeout(90)
SLOW = 30  # slow clients at once


@pytest.fixture(scope="module")
def gateway() -> Iterator[Proc]:
    data = config(
        prefill=pool("h100-sxm", 1, time_scale=0),
        decode=pool("groq-lpu-v1", 1, time_scale=0),
        server={"header_timeout_s": 0.5, "body_timeout_s": 0.5},
    )
    with run_gateway(data) as proc:
        yield proc


@pytest.fixture(scope="module")
def backend() -> Iterator[Proc]:
    args = ("--time-scale", "0", "--header-timeout", "0.5", "--body-timeout", "0.5")
    with run_backend(*args) as proc:
        yield proc


@pytest.fixture(params=["gateway", "backend"])
def server(request: pytest.FixtureRequest) -> Proc:
    """Each read deadline holds for the gateway and for an emulated backend server alike."""
    proc: Proc = request.getfixturevalue(request.param)
    return proc


def _connect(proc: Proc) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
    sock.settimeout(10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_slow_headers_are_cut_at_the_header_deadline(server: Proc) -> None:
    """Slowloris: before, every connection trickling its headers was held for as long as the
    client kept sending (uvicorn has no header timeout), on the gateway and on ``pdgate
    backend``."""
    socks = [_connect(server) for _ in range(SLOW)]
    started = time.monotonic()
    for s in socks:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    closed: dict[int, float] = {}
    while len(closed) < SLOW and time.monotonic() - started < 10:
        for i, s in enumerate(socks):
            if i in closed:
                continue
            try:
                s.sendall(b"X-Slow: 1\r\n")  # one more header line, never the blank one
            except OSError:
                closed[i] = time.monotonic() - started
        time.sleep(0.1)
    answers = []
    for s in socks:
        s.settimeout(2)
        try:
            answers.append(_read_all(s))
        except OSError:
            answers.append(b"")
        s.close()
    assert len(closed) == SLOW, f"{SLOW - len(closed)} slow connections still open after 10 s"
    assert max(closed.values()) < 3.0  # 0.5 s deadline, plus the write that notices
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers if a)
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


def test_a_body_that_never_arrives_is_cut_at_the_body_deadline(server: Proc) -> None:
    sock = _connect(server)
    started = time.monotonic()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    data = _read_all(sock)
    sock.close()
    assert time.monotonic() - started < 5.0
    assert b"200 OK" not in data
    ok = httpx.post(
        server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}
    )
    assert ok.status_code == 200


def test_an_http10_stream_is_close_delimited(gateway: Proc) -> None:
    """Before: ``Transfer-Encoding: chunked``, which HTTP/1.0 does not have."""
    body = orjson.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": True})
    sock = _connect(gateway)
    sock.sendall(
        b"POST /v1/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    raw = _read_all(sock)
    sock.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:300]
    assert b"transfer-encoding" not in head.lower()
    assert payload.startswith(b"data: {")  # the events themselves, no chunk-size lines
    assert payload.endswith(b"data: [DONE]\n\n")


def test_a_client_leaving_mid_body_is_one_quiet_line(gateway: Proc) -> None:
    """Before: each such disconnect logged an ERROR with a traceback."""
    before = gateway.log()
    for _ in range(3):
        sock = _connect(gateway)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n" + b'{"model": "' + b"x" * 100
        )
        time.sleep(0.05)
        sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        new = gateway.log()[len(before) :]
        if new.count("client disconnected before its request body arrived") >= 3:
            break
        time.sleep(0.05)
    assert new.count("client disconnected before its request body arrived") == 3, new
    assert "Traceback" not in new
    assert "ERROR" not in new
