"""The prefix cache's bookkeeping (backends/emulator/kvcache.py)."""

from __future__ import annotations

from backends.emulator.kvcache import PrefixCache


def test_match_stops_at_the_first_missing_hash() -> None:
    cache = PrefixCache()
    for h in (1, 2, 3):
        assert cache.insert(h, 32)
    assert cache.match((1, 2, 3, 4)) == 3
    assert cache.match((1, 9, 3)) == 1  # chained: 3 after a miss does not count
    assert cache.match((7,)) == 0
    assert cache.blocks == 96


def test_inserted_units_are_referenced_until_released_then_evictable() -> None:
    cache = PrefixCache()
    cache.insert(1, 32)
    assert cache.evictable_blocks == 0
    assert cache.evict(32) == 0  # referenced: not evictable
    cache.release((1,))
    assert cache.evictable_blocks == 32
    cache.acquire((1,))
    assert cache.evictable_blocks == 0
    cache.release((1,))
    assert cache.evict(1) == 32  # whole entries go
    assert cache.blocks == cache.evictable_blocks == 0
    assert cache.match((1,)) == 0
    assert cache.evictions == 1


def test_duplicate_insert_is_refused_so_the_caller_references_the_existing_entry() -> None:
    cache = PrefixCache()
    assert cache.insert(5, 8)
    assert not cache.insert(5, 8)
    assert cache.blocks == 8


def test_eviction_is_least_recently_released_first_and_tail_first_within_a_prefix() -> None:
    cache = PrefixCache()
    for h in (1, 2, 3):
        cache.insert(h, 10)
    cache.release((1, 2, 3))  # tail first: 3, then 2, then 1
    cache.insert(9, 10)
    cache.release((9,))
    assert cache.evict(10) == 10
    assert cache.match((1, 2, 3)) == 2  # the deepest block went first
    assert cache.evict(15) == 20  # then 2 and 1, before the later-released 9
    assert cache.match((9,)) == 1
    assert len(cache) == 1
