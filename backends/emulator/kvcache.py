"""Prefix cache of an emulated engine: KV blocks of prompt prefixes, found by block hash.

Requests may carry *chained* block hashes of their prompt (hash ``i`` identifies tokens
``0 .. (i+1)·unit`` — the whole prefix up to and including block ``i``), as vLLM's automatic
prefix caching and the Mooncake traces do. When a request's prefill completes, each full
prompt unit becomes a cache entry that owns its KV blocks; a later request whose leading hashes
match takes references on those entries and skips their prefill compute (their KV is still
read by attention, so a hit saves FLOPs, not KV bytes).

Entries nobody references stay cached and count as evictable: the engine evicts them, least
recently released first, when it needs blocks. A request releases its entries tail first, so
the deepest blocks of a prefix go before its shared head (vLLM frees blocks in the same order).

The cache tracks block *counts*, like the engine: no block ids, no per-token work.

Example::

    cache = PrefixCache()
    hit = cache.match(hashes)           # leading entries present
    cache.acquire(hashes[:hit])
    ...
    cache.release(hashes[:hit])         # now evictable
    freed = cache.evict(10)             # blocks given back to the engine's free pool
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class _Entry:
    __slots__ = ("blocks", "refs")

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.refs = 1


class PrefixCache:
    """Hash → KV blocks of one prefix unit, with reference counts and LRU eviction."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced entries, oldest first
        self.blocks = 0  # blocks held by all entries
        self.evictable_blocks = 0  # blocks of unreferenced entries
        self.hits = 0  # units found by match() and then acquired
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading hashes are cached (chained: the first miss ends the match)."""
        entries = self._entries
        n = 0
        for h in hashes:
            if h not in entries:
                break
            n += 1
        return n

    def acquire(self, hashes: Sequence[int]) -> None:
        """Take a reference on each (cached) entry; referenced entries cannot be evicted."""
        for h in hashes:
            entry = self._entries[h]
            if entry.refs == 0:
                del self._lru[h]
                self.evictable_blocks -= entry.blocks
            entry.refs += 1
        self.hits += len(hashes)

    def insert(self, h: int, blocks: int) -> bool:
        """Adopt a freshly computed unit's blocks, referenced once by their computer.

        Returns False when the hash is cached already (computed concurrently elsewhere); the
        caller then references the existing entry instead (:meth:`acquire`) and frees its copy.
        """
        if h in self._entries:
            return False
        self._entries[h] = _Entry(blocks)
        self.blocks += blocks
        return True

    def release(self, hashes: Sequence[int]) -> None:
        """Drop one reference per entry; unreferenced entries become evictable, tail first."""
        for h in reversed(hashes):
            entry = self._entries[h]
            entry.refs -= 1
            if entry.refs == 0:
                self._lru[h] = None
                self.evictable_blocks += entry.blocks

    def evict(self, blocks: int) -> int:
        """Evict least recently released entries until ``blocks`` are freed or none is left."""
        freed = 0
        lru, entries = self._lru, self._entries
        while freed < blocks and lru:
            h, _ = lru.popitem(last=False)
            entry = entries.pop(h)
            freed += entry.blocks
            self.evictions += 1
        self.blocks -= freed
        self.evictable_blocks -= freed
        return freed
