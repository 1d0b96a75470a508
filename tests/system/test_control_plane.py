"""The P/D control plane belongs to the gateway and the backends, not to clients or neighbours:
real ``pdgate backend`` processes, a real gateway and a real listening socket."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.backend_procs import MODEL, backend_argv, http_pools, run_gateway, spawn
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(90)
TOKEN = "control-token-0123456789"


class _Listener:
    """A loopback TCP server that counts the connections it is offered (the SSRF target)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[_Listener]:
    lis = _Listener()
    try:
        yield lis
    finally:
        lis.close()


def test_client_handshake_fields_never_reach_the_backends(listener: _Listener) -> None:
    """Before: a client's kv_transfer_params made the prefill server connect to a host and port
    of the client's choice (three times), then fail with a KeyError."""
    p_port, d_port = free_port(), free_port()
    prefill = backend_argv(p_port, "--role", "prefill", "--time-scale", "0")
    decode = backend_argv(d_port, "--role", "decode", "--time-scale", "0")
    with spawn(prefill, "/health", p_port) as p, spawn(decode, "/health", d_port) as d:
        data = {"models": [{"name": MODEL, "pools": http_pools("vllm-nixl", [p], [d])}]}
        with run_gateway(data) as g:
            forged = {
                "do_remote_prefill": True,
                "remote_host": "127.0.0.1",
                "remote_port": listener.port,
                "remote_engine_id": "x",
                "remote_request_id": "victim",
                "remote_block_ids": [1, 2, 3],
            }
            for max_tokens in (1, 4):
                body = {
                    "model": MODEL,
                    "prompt": "hello",
                    "max_tokens": max_tokens,
                    "kv_transfer_params": forged,
                    "bootstrap_host": "127.0.0.1",
                    "bootstrap_port": listener.port,
                    "bootstrap_room": 7,
                }
                r = httpx.post(g.url + "/v1/completions", json=body, timeout=30)
                assert r.status_code == 200, r.text
    assert listener.connections == 0


def test_backend_control_plane_needs_the_shared_token() -> None:
    """Before: anyone who could reach a backend could inject faults or free another
    request's KV."""
    port = free_port()
    argv = backend_argv(port, "--time-scale", "0", "--enable-faults")
    with spawn(argv, "/health", port, env={"PDGATE_CONTROL_TOKEN": TOKEN}) as b:
        for method, path in (
            ("POST", "/admin/faults"),
            ("GET", "/admin/faults"),
            ("POST", "/pdgate/kv/release"),
            ("POST", "/pdgate/kv/pull"),
            ("POST", "/flush_cache"),
            ("POST", "/reset_prefix_cache"),
        ):
            r = httpx.request(method, b.url + path, json={"fail_rate": 1.0})
            assert r.status_code == 403, (path, r.text)
            assert r.json()["error"]["code"] == "control_token_required"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = httpx.post(b.url + "/admin/faults", json={"slowdown": 2.0}, headers=auth)
        assert r.status_code == 200
        assert r.json()["slowdown"] == 2.0
        r = httpx.post(b.url + "/pdgate/kv/release", json={"remote_request_id": "x"}, headers=auth)
        assert r.status_code == 404  # authorized; nothing held under that id
        # The data plane stays open.
        ok = httpx.post(b.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert ok.status_code == 200


def test_fault_injection_is_off_unless_enabled() -> None:
    port = free_port()
    with spawn(backend_argv(port, "--time-scale", "0"), "/health", port) as b:
        r = httpx.post(b.url + "/admin/faults", json={"fail_rate": 1.0})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "faults_disabled"
        ok = httpx.post(b.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert ok.status_code == 200


def test_a_public_bind_without_a_token_closes_the_control_plane() -> None:
    port = free_port()
    argv = backend_argv(port, "--time-scale", "0", "--enable-faults", "--host", "0.0.0.0")
    with spawn(argv, "/health", port) as b:
        r = httpx.post(b.url + "/pdgate/kv/release", json={"remote_request_id": "x"})
        assert r.status_code == 403


def test_disaggregated_serving_works_with_tokens_everywhere() -> None:
    """Decode pulls KV from prefill and the gateway releases abandoned KV with the token."""
    env = {"PDGATE_CONTROL_TOKEN": TOKEN}
    p_port, d_port = free_port(), free_port()
    prefill = backend_argv(p_port, "--role", "prefill", "--time-scale", "0")
    decode = backend_argv(d_port, "--role", "decode", "--time-scale", "0")
    with (
        spawn(prefill, "/health", p_port, env=env) as p,
        spawn(decode, "/health", d_port, env=env) as d,
    ):
        data = {"models": [{"name": MODEL, "pools": http_pools("vllm-nixl", [p], [d])}]}
        with run_gateway(data, env=env) as g:
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 8}
            r = httpx.post(g.url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 8
