"""Prefilled KV waiting to be pulled: by request id (vLLM NIXL) or by bootstrap room (SGLang).

A prefill leg leaves its KV blocks held on the engine and registers them here with a lease;
the decode side pulls the metadata, models the transfer, then releases the blocks (vLLM's NIXL
notify). If nobody pulls before the lease runs out the blocks are freed anyway, as vLLM frees
blocks of requests whose decode never came.

Example::

    held = HeldKV(lease_s=30.0)
    rid = held.hold("req-1", KVMeta(prompt_tokens=900, kv_bytes=1.2e8, blocks=57, link="roce_200g"),
                    release=lambda: engine.release(seq))
    meta = held.pull(rid)        # None once released or expired
    held.release(rid)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pdgate.backend.kv")


@dataclass(frozen=True, slots=True)
class KVMeta:
    """What a decode instance needs to model pulling one request's KV."""

    prompt_tokens: int
    kv_bytes: float
    blocks: int
    link: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "kv_bytes": self.kv_bytes,
            "blocks": self.blocks,
            "link": self.link,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> KVMeta:
        link = data.get("link")
        return KVMeta(
            prompt_tokens=int(data["prompt_tokens"]),
            kv_bytes=float(data["kv_bytes"]),
            blocks=int(data["blocks"]),
            link=link if isinstance(link, str) else None,
        )


@dataclass
class _Entry:
    meta: KVMeta
    release: Callable[[], None]
    timer: asyncio.TimerHandle | None = None


class HeldKV:
    """KV held by request id until released or its lease expires."""

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self._entries: dict[str, _Entry] = {}
        self._ids = itertools.count()
        self.expired = 0

    def __len__(self) -> int:
        return len(self._entries)

    def hold(self, request_id: str, meta: KVMeta, release: Callable[[], None]) -> str:
        """Register held blocks; returns the id a decode instance pulls them by."""
        key = request_id if request_id not in self._entries else f"{request_id}#{next(self._ids)}"
        entry = _Entry(meta, release)
        entry.timer = asyncio.get_running_loop().call_later(self.lease_s, self._expire, key)
        self._entries[key] = entry
        return key

    def pull(self, key: str) -> KVMeta | None:
        entry = self._entries.get(key)
        return entry.meta if entry else None

    def release(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        if entry.timer is not None:
            entry.timer.cancel()
        entry.release()
        return True

    def release_all(self) -> None:
        for key in list(self._entries):
            self.release(key)

    def _expire(self, key: str) -> None:
        if key in self._entries:
            log.warning("KV of %s not pulled within the %.0f s lease; freeing", key, self.lease_s)
            self.expired += 1
            self.release(key)


class RoomError(Exception):
    """The prefill of a bootstrap room failed, or its KV never arrived."""


@dataclass
class _Room:
    ready: asyncio.Future[KVMeta]
    release: Callable[[], None] | None = None
    timer: asyncio.TimerHandle | None = None


class Rooms:
    """SGLang bootstrap rooms on a prefill instance: the decode side waits for a room's KV.

    Prefill and decode receive the same request at the same time, so either may touch a room
    first: :meth:`wait` and :meth:`publish` both create it. A published room is leased like
    held KV; a room that was waited on but never published disappears when its waiter gives up.
    """

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self._rooms: dict[int, _Room] = {}
        self.expired = 0

    def __len__(self) -> int:
        return len(self._rooms)

    def _room(self, room: int) -> _Room:
        entry = self._rooms.get(room)
        if entry is None:
            entry = _Room(asyncio.get_running_loop().create_future())
            self._rooms[room] = entry
        return entry

    def publish(self, room: int, meta: KVMeta, release: Callable[[], None]) -> None:
        entry = self._room(room)
        if entry.ready.done():  # a second prefill for the same room: keep the first
            release()
            return
        entry.release = release
        entry.ready.set_result(meta)
        entry.timer = asyncio.get_running_loop().call_later(self.lease_s, self._expire, room)

    def fail(self, room: int, reason: str) -> None:
        entry = self._rooms.get(room)
        if entry is not None and not entry.ready.done():
            entry.ready.set_exception(RoomError(reason))
            entry.ready.exception()  # retrieved: no "never retrieved" warning if nobody waits
            self._rooms.pop(room, None)

    async def wait(self, room: int, limit_s: float) -> KVMeta:
        """The room's KV metadata once its prefill is done; RoomError on failure or timeout."""
        entry = self._room(room)
        try:
            async with asyncio.timeout(limit_s):
                return await asyncio.shield(entry.ready)
        except TimeoutError:
            if not entry.ready.done() and self._rooms.get(room) is entry:
                del self._rooms[room]
            raise RoomError(
                f"KV for bootstrap room {room} did not arrive within {limit_s:g} s"
            ) from None

    def release(self, room: int) -> bool:
        entry = self._rooms.get(room)
        if entry is None or entry.release is None:
            return False
        del self._rooms[room]
        if entry.timer is not None:
            entry.timer.cancel()
        entry.release()
        return True

    def release_all(self) -> None:
        for room in list(self._rooms):
            if not self.release(room):
                self.fail(room, "instance stopping")

    def _expire(self, room: int) -> None:
        if room in self._rooms:
            log.warning(
                "KV of bootstrap room %d not pulled within %.0f s; freeing it", room, self.lease_s
            )
            self.expired += 1
            self.release(room)
