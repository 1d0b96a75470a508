"""Test helpers: ``pdgate backend`` processes, peer routers and gateways on loopback ports.

Every process logs to a file; readiness is polled on a real endpoint, and exit terminates
(then kills) the process. ``Proc.log()`` returns what it logged, for assertions and failures.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.helpers import free_port

MODEL = "llama-3.1-8b"


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str
    port: int
    bootstrap_port: int | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        _stop(self.process)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def spawn(
    argv: Sequence[str],
    ready_path: str,
    port: int,
    *,
    bootstrap_port: int | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Proc]:
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "process.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", **(env or {})},
            )
        url = f"http://127.0.0.1:{port}"
        proc = Proc(process, log_path, url, port, bootstrap_port)
        try:
            wait_ready(url + ready_path, process, log_path)
            yield proc
        finally:
            _stop(process)


def backend_argv(port: int, *args: str, device: str = "h100-sxm") -> list[str]:
    return [
        sys.executable, "-m", "gateway.cli", "backend", "--device", device, "--model", MODEL,
        "--port", str(port), *args,
    ]  # fmt: skip


@contextlib.contextmanager
def run_backend(
    *args: str,
    device: str = "h100-sxm",
    role: str = "both",
    bootstrap: bool = False,
    port: int | None = None,
) -> Iterator[Proc]:
    """``pdgate backend`` on a free port (and a free bootstrap port if ``bootstrap``)."""
    port = port or free_port()
    extra = ["--role", role, *args]
    bport = free_port() if bootstrap else None
    if bport is not None:
        extra += ["--bootstrap-port", str(bport)]
    argv = backend_argv(port, *extra, device=device)
    with spawn(argv, "/health", port, bootstrap_port=bport) as proc:
        yield proc


@contextlib.contextmanager
def run_pd_backends(
    prefill: int, decode: int, *args: str
) -> Iterator[tuple[list[Proc], list[Proc]]]:
    """``prefill`` H100 prefill instances (with bootstrap ports) and ``decode`` LPU decodes."""
    with contextlib.ExitStack() as stack:
        ps = [
            stack.enter_context(run_backend(*args, role="prefill", bootstrap=True))
            for _ in range(prefill)
        ]
        ds = [
            stack.enter_context(run_backend(*args, device="groq-lpu-v1", role="decode"))
            for _ in range(decode)
        ]
        yield ps, ds


@contextlib.contextmanager
def run_gateway(data: dict[str, Any], *, env: dict[str, str] | None = None) -> Iterator[Proc]:
    """``pdgate serve`` with config ``data`` on a free port."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pdgate.yaml"
        path.write_text(yaml.safe_dump(data))
        argv = [
            sys.executable, "-m", "gateway.cli", "serve", "--config", str(path),
            "--port", str(port),
        ]  # fmt: skip
        with spawn(argv, "/health", port, env=env) as proc:
            yield proc


def http_pools(protocol: str, prefill: list[Proc], decode: list[Proc]) -> dict[str, Any]:
    """A disaggregated one-model config whose pools are these processes."""

    def worker(p: Proc) -> dict[str, Any]:
        spec: dict[str, Any] = {"type": "http", "protocol": protocol, "url": p.url}
        if protocol == "sglang-bootstrap" and p.bootstrap_port is not None:
            spec["bootstrap_port"] = p.bootstrap_port
        return spec

    return {
        "prefill": {"workers": [worker(p) for p in prefill]},
        "decode": {"workers": [worker(p) for p in decode]},
    }
