"""The hosted-API example configs (deploy/configs/clouds/) and the API-key and health-path
settings they rely on, against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from backends.upstream.http import HttpBackend
from gateway.service import http_backend
from gateway.settings import ConfigError, EmulatedWorker, HttpWorker, load_settings

CLOUDS = Path(__file__).resolve().parents[2] / "deploy" / "configs" / "clouds"
FILES = sorted(CLOUDS.glob("*.yaml"))
KEYS = {
    "groqcloud": "GROQ_API_KEY",
    "cerebras": "CEREBRAS_API_KEY",
    "sambanova": "SAMBANOVA_API_KEY",
    "siliconflow": "SILICONFLOW_API_KEY",
}


def test_every_cloud_has_a_config() -> None:
    assert sorted(p.stem for p in FILES) == sorted(KEYS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_cloud_config_loads_with_the_service_beside_its_emulation(path: Path) -> None:
    settings = load_settings(path)
    http = [w for m in settings.models for p in m.pools.values() for w in p.workers]
    upstreams = [w for w in http if isinstance(w, HttpWorker)]
    emulated = [w for w in http if isinstance(w, EmulatedWorker)]
    assert upstreams
    assert emulated
    for w in upstreams:
        assert w.url.startswith("https://")
        assert w.protocol == "openai"
        assert w.api_key_env == KEYS[path.stem]
        assert w.health_path == "/v1/models"
        assert w.served_model_name
    names = {m.name for m in settings.models}
    for m in settings.models:  # each service model has its emulated twin
        if m.name.endswith("@cloud"):
            assert m.name.replace("@cloud", "@emulated") in names


def test_a_missing_api_key_is_a_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PDGATE_TEST_KEY", raising=False)
    spec = HttpWorker(
        type="http", url="https://example.invalid", protocol="openai", api_key_env="PDGATE_TEST_KEY"
    )
    with pytest.raises(ConfigError, match="PDGATE_TEST_KEY"):
        http_backend("cloud-0", spec)


async def _serve(seen: list[bytes]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"
        )
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_the_key_and_health_path_reach_the_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []
    server = await _serve(seen)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("PDGATE_TEST_KEY", "sk-test-123")
    spec = HttpWorker(
        type="http",
        url=f"http://127.0.0.1:{port}/openai",
        protocol="openai",
        api_key_env="PDGATE_TEST_KEY",
        health_path="/v1/models",
    )
    backend = http_backend("cloud-0", spec)
    assert isinstance(backend, HttpBackend)
    await backend.start()
    try:
        assert await backend.probe(5.0)
    finally:
        await backend.close()
        server.close()
        await server.wait_closed()
    request = seen[0].decode()
    assert request.startswith("GET /openai/v1/models HTTP/1.1")
    assert "Authorization: Bearer sk-test-123" in request
    assert "sk-test-123" not in repr(backend.options)  # the key stays out of logs


async def test_without_a_key_no_authorization_header_is_sent() -> None:
    seen: list[bytes] = []
    server = await _serve(seen)
    port = server.sockets[0].getsockname()[1]
    spec = HttpWorker(type="http", url=f"http://127.0.0.1:{port}", protocol="openai")
    backend = http_backend("local-0", spec)
    await backend.start()
    try:
        assert await backend.probe(5.0)
    finally:
        await backend.close()
        server.close()
        await server.wait_closed()
    assert seen[0].decode().startswith("GET /health HTTP/1.1")
    assert "authorization" not in seen[0].decode().lower()
