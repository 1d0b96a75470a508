"""One emulated instance and the legs it runs: plain, P/D prefill and P/D decode.

Which leg a request is follows from its body, as on vLLM and SGLang:

* ``kv_transfer_params.do_remote_decode`` — a vLLM NIXL prefill leg: prefill, one token, hold
  the KV (lease ``kv_lease_s``) and answer ``kv_transfer_params`` for the decode side;
* ``kv_transfer_params.do_remote_prefill`` — a vLLM NIXL decode leg: pull the KV from the
  prefill instance named in those params (modelled transfer over the prefill side's link),
  free it there, decode every output token; invalid params or KV that is gone → prefill
  locally and log a warning, as vLLM does;
* ``bootstrap_room`` — an SGLang leg; the instance's role (``both``: whether
  ``bootstrap_port`` is its own) says prefill (publish the room's KV) or decode (wait for the
  room's KV at ``bootstrap_host:bootstrap_port``, bounded, then decode);
* anything else — a plain (aggregated) request.

A decode leg produces every output token, the first included (the prefill side's token is
discarded by the router, as with real engines); its first token is ready one decode step after
the KV lands.
"""

from __future__ import annotations

import hmac
import logging
import random
import secrets
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from backends.base import GenerationParams, KVHandle, LegStats, TokenChunk
from backends.clock import LoopClock
from backends.emulator import synth
from backends.emulator.catalog import Catalog
from backends.emulator.emulated import EmulatedBackend
from backends.emulator.timing import Link, kv_transfer_time
from backends.server.config import InstanceConfig
from backends.server.kv import HeldKV, KVMeta, RoomError, Rooms
from backends.server.metrics import BackendMetrics
from backends.server.peers import BootstrapServer, PeerClient, PeerError
from backends.tokens import TokenCounter

log = logging.getLogger("pdgate.backend")

NIXL_FIELDS = ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port")


class ServerError(Exception):
    """An error answered to the client in OpenAI's envelope."""

    def __init__(
        self, status: int, message: str, type_: str = "server_error", code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code


@dataclass
class Leg:
    """A request's token stream plus what the response adds (``kv_transfer_params``)."""

    kind: str
    chunks: AsyncGenerator[TokenChunk, None]
    extra: dict[str, Any] = field(default_factory=dict)


class Instance:
    """An :class:`EmulatedBackend` with the P/D handshakes around it."""

    def __init__(self, config: InstanceConfig, catalog: Catalog | None = None) -> None:
        self.config = config
        self.catalog = catalog or Catalog.load()
        c = config
        self.deployment = self.catalog.deployment(
            c.device, c.model, dtype=c.dtype, count=c.count, tp=c.tp, engine=c.engine
        )
        self.link = self.catalog.link(c.kv_link)
        self.clock = LoopClock()
        self.backend = EmulatedBackend(
            f"{c.name}@{c.port}", self.deployment, self.clock, link=self.link,
            time_scale=c.time_scale,
        )  # fmt: skip
        self.counter = TokenCounter(Path(c.tokenizer) if c.tokenizer else None)
        self.engine_id = secrets.token_hex(8)
        self.held = HeldKV(c.kv_lease_s)
        self.rooms = Rooms(c.kv_lease_s)
        self.metrics = BackendMetrics(c.name, self.backend.load)
        self.peers = PeerClient(c.control_token)
        self.rng = random.Random(c.seed)
        self.faults = c.faults
        self.max_context = min(
            self.catalog.model(c.model).max_context, self.backend.capacity_tokens()
        )
        self._bootstrap: BootstrapServer | None = None

    async def start(self) -> None:
        await self.backend.start()
        self.apply_faults()
        await self.peers.start()
        if self.config.bootstrap_port is not None:
            self._bootstrap = BootstrapServer(
                self.rooms, self.config.host, self.config.bootstrap_port,
                self.config.rendezvous_timeout_s, self.control_allowed,
            )  # fmt: skip
            await self._bootstrap.start()

    def control_allowed(self, authorization: str | None) -> bool:
        """Whether a control-plane call with this ``Authorization`` header may proceed (see
        :class:`~backends.server.config.InstanceConfig`)."""
        token = self.config.control_token
        if token is None:
            return self.config.loopback
        scheme, _, given = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        )

    async def close(self) -> None:
        self.held.release_all()
        self.rooms.release_all()
        if self._bootstrap is not None:
            await self._bootstrap.close()
        await self.backend.close()
        await self.peers.close()

    def apply_faults(self) -> None:
        """Re-derive the engine's time scale from ``--time-scale`` and ``slowdown``."""
        # The engine reads its time scale at every step; a public setter would be the tidier
        # hook, but engine.py is being changed elsewhere, so the attribute is set here.
        self.backend.engine._time_scale = self.config.time_scale / self.faults.slowdown

    # -- choosing the leg --------------------------------------------------------------------

    def open_leg(self, params: GenerationParams, data: dict[str, Any]) -> Leg:
        ktp = data.get("kv_transfer_params")
        if isinstance(ktp, dict):
            if ktp.get("do_remote_decode"):
                leg = Leg("nixl-prefill", _empty())
                leg.chunks = self._nixl_prefill(params, leg)
                return leg
            if ktp.get("do_remote_prefill"):
                return Leg("nixl-decode", self._nixl_decode(params, ktp))
        room = data.get("bootstrap_room")
        if room is not None:
            if not isinstance(room, int):
                raise ServerError(400, "bootstrap_room must be an integer", "invalid_request_error")
            role = self.config.role
            if role == "both":
                own = data.get("bootstrap_port") == self.config.bootstrap_port
                role = "prefill" if own else "decode"
            if role == "prefill":
                return Leg("sglang-prefill", self._sglang_prefill(params, room))
            return Leg("sglang-decode", self._sglang_decode(params, data, room))
        return Leg("plain", self.backend.generate(params))

    # -- prefill legs ----------------------------------------------------------------------

    async def _prefill(
        self, params: GenerationParams, publish: Callable[[KVMeta, Callable[[], None]], None]
    ) -> AsyncGenerator[TokenChunk, None]:
        """Prefill, hold the KV via ``publish``, yield the one token the prefill produced."""
        held = replace(params, max_tokens=max(2, params.max_tokens))  # keep the KV blocks
        result = await self.backend.prefill(held)
        kv = result.kv
        meta = KVMeta(kv.prompt_tokens, kv.kv_bytes, kv.descriptors, self.config.kv_link)
        # A stop string in the first token finished the request (nothing is held); the decode
        # side still gets a handle, and finds the stop itself.
        publish(meta, kv.release)
        stopped = result.first.finish_reason == "stop"
        text = result.first.text + ("" if stopped else kv.pending_text)
        yield TokenChunk(text, 1, "stop" if stopped else "length", result.stats)

    async def _nixl_prefill(
        self, params: GenerationParams, leg: Leg
    ) -> AsyncGenerator[TokenChunk, None]:
        def publish(meta: KVMeta, release: Callable[[], None]) -> None:
            rid = self.held.hold(params.request_id, meta, release)
            leg.extra["kv_transfer_params"] = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_engine_id": self.engine_id,
                "remote_block_ids": list(range(meta.blocks)),
                "remote_request_id": rid,
                "remote_host": self.config.public_host,
                "remote_port": self.config.port,
                "tp_size": self.config.tp,
                "pdgate_prompt_tokens": meta.prompt_tokens,
                "pdgate_kv_bytes": meta.kv_bytes,
                "pdgate_kv_link": meta.link,
            }

        async with aclosing(self._prefill(params, publish)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _sglang_prefill(
        self, params: GenerationParams, room: int
    ) -> AsyncGenerator[TokenChunk, None]:
        if self.config.bootstrap_port is None:
            raise ServerError(
                400,
                "this instance serves no bootstrap port (start it with --bootstrap-port)",
                "invalid_request_error",
            )

        def publish(meta: KVMeta, release: Callable[[], None]) -> None:
            self.rooms.publish(room, meta, release)

        try:
            async with aclosing(self._prefill(params, publish)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except BaseException as exc:
            self.rooms.fail(room, f"prefill of bootstrap room {room} failed: {exc!r}")
            raise

    # -- decode legs -----------------------------------------------------------------------

    async def _nixl_decode(
        self, params: GenerationParams, ktp: dict[str, Any]
    ) -> AsyncGenerator[TokenChunk, None]:
        source = _nixl_source(ktp)
        meta: KVMeta | None = None
        if source is None:
            log.warning(
                "request %s: invalid kv_transfer_params %s; recomputing the prefill locally",
                params.request_id, ktp,
            )  # fmt: skip
        else:
            host, port, rid = source
            try:
                meta = await self.peers.pull(host, port, rid, str(ktp["remote_engine_id"]))
            except PeerError as exc:
                log.warning("request %s: KV pull failed (%s); recomputing the prefill locally",
                            params.request_id, exc)  # fmt: skip
            else:
                if meta is None:
                    log.warning(
                        "request %s: %s:%s holds no KV for %s (lease expired?); recomputing "
                        "the prefill locally", params.request_id, host, port, rid,
                    )  # fmt: skip
        if meta is None:
            stream = self.backend.generate(params)
        else:
            host, port, rid = source  # type: ignore[misc]
            stream = self._decode(params, meta, lambda: self.peers.release_nixl(host, port, rid))
        async with aclosing(stream) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _sglang_decode(
        self, params: GenerationParams, data: dict[str, Any], room: int
    ) -> AsyncGenerator[TokenChunk, None]:
        host, port = data.get("bootstrap_host"), data.get("bootstrap_port")
        if not isinstance(host, str) or not isinstance(port, int):
            raise ServerError(
                400, "bootstrap_host and bootstrap_port are required with bootstrap_room",
                "invalid_request_error",
            )  # fmt: skip
        timeout = self.config.rendezvous_timeout_s
        try:
            meta = await self.peers.wait_room(host, port, room, timeout)
        except RoomError as exc:
            message = f"{exc} (bootstrap server {host}:{port})"
            raise ServerError(504, message, code="kv_timeout") from exc
        except PeerError as exc:
            raise ServerError(502, f"bootstrap server {host}:{port} unreachable: {exc}") from exc
        stream = self._decode(params, meta, lambda: self.peers.release_room(host, port, room))
        async with aclosing(stream) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _decode(
        self, params: GenerationParams, meta: KVMeta, release: Callable[[], None]
    ) -> AsyncGenerator[TokenChunk, None]:
        """Decode every output token over KV pulled from a prefill instance."""
        link = self._link(meta.link)
        matcher = synth.StopMatcher(params.stop)
        first, stopped = matcher.feed(synth.token_text(params.seed, 0), check=params.min_tokens < 1)
        kv = KVHandle(
            source="remote", prompt_tokens=meta.prompt_tokens, kv_bytes=meta.kv_bytes,
            descriptors=meta.blocks, link=link, first_token=first, release=_once(release),
            pending_text=matcher.flush(),
        )  # fmt: skip
        try:
            if stopped or params.max_tokens <= 1:
                transfer = kv_transfer_time(link, meta.kv_bytes, meta.blocks)
                scale = self.config.time_scale / self.faults.slowdown
                await self.clock.sleep(transfer / scale if scale > 0 else 0.0)
                kv.release()
                text = first if stopped else first + kv.pending_text
                yield TokenChunk(text, 1, "stop" if stopped else "length", LegStats(0, 0, transfer))
                return
            started = False
            async with aclosing(self.backend.decode(params, kv)) as stream:
                async for chunk in stream:
                    if not started:
                        started = True
                        chunk = replace(chunk, text=first + chunk.text, tokens=chunk.tokens + 1)
                    yield chunk
        finally:
            kv.release()

    def _link(self, name: str | None) -> Link:
        if name and name in self.catalog.links:
            return self.catalog.link(name)
        return self.link

    # -- server-info answers ----------------------------------------------------------------

    def server_info(self) -> dict[str, Any]:
        """SGLang's ``/get_server_info`` fields (no ``model_path``: nothing to download)."""
        c, e = self.config, self.backend.engine
        mode = {"prefill": "prefill", "decode": "decode"}.get(c.role, "null")
        return {
            "served_model_name": c.name,
            "is_generation": True,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "tp_size": c.tp,
            "dp_size": 1,
            "load_balance_method": "round_robin",
            "disaggregation_mode": mode,
            "disaggregation_bootstrap_port": c.bootstrap_port,
            "max_total_num_tokens": e.total_blocks * e.block_size,
            "max_prefill_tokens": e.max_batched_tokens,
            "max_running_requests": e.max_num_seqs,
            "max_batch_size": e.max_num_seqs,
            "max_num_reqs": e.max_num_seqs,
            "page_size": e.block_size,
            "context_length": self.max_context,
            "version": "pdgate-backend",
            "internal_states": [{"last_gen_throughput": 0.0}],
            "pdgate": {
                "device": c.device,
                "model": c.model,
                "dtype": c.dtype,
                "count": self.deployment.count,
                "role": c.role,
                "time_scale": c.time_scale,
                "engine_id": self.engine_id,
                "kv_link": c.kv_link,
            },
        }

    def model_info(self) -> dict[str, Any]:
        return {
            "served_model_name": self.config.name,
            "is_generation": True,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "max_context_length": self.max_context,
            "supports_vision": False,
            "weight_version": "default",
        }

    def load_info(self) -> dict[str, Any]:
        e = self.backend.engine
        tokens = e.used_blocks * e.block_size
        return {
            "dp_rank": 0,
            "num_reqs": len(e.running) + len(e.waiting),
            "num_waiting_reqs": len(e.waiting),
            "num_tokens": tokens,
            "load": len(e.running) + len(e.waiting),
        }


def _nixl_source(ktp: dict[str, Any]) -> tuple[str, int, str] | None:
    """(host, port, request id) of a decode leg's prefill side, or None if unusable."""
    host, port, blocks = ktp.get("remote_host"), ktp.get("remote_port"), ktp.get("remote_block_ids")
    rid, engine = ktp.get("remote_request_id"), ktp.get("remote_engine_id")
    ok = (
        isinstance(host, str)
        and host
        and isinstance(port, int)
        and 0 < port < 65536
        and isinstance(blocks, list)
        and isinstance(rid, str)
        and isinstance(engine, str)
    )
    return (host, port, rid) if ok else None  # type: ignore[return-value]


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return call


async def _empty() -> AsyncGenerator[TokenChunk, None]:
    return
    yield  # pragma: no cover - makes this an async generator
