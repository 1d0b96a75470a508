"""Prompt block hashes (gateway/prefix.py) and the state store's prefix index (gateway/state.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.prefix import BLOCK_CHARS, block_hashes, chat_block_hashes, prompt_block_hashes
from gateway.state import InMemoryStateStore


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def shared_leading(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# -- block hashes -----------------------------------------------------------------------------


def test_only_whole_blocks_are_hashed() -> None:
    assert block_hashes("") == ()
    assert block_hashes("x" * (BLOCK_CHARS - 1)) == ()
    assert len(block_hashes("x" * BLOCK_CHARS)) == 1
    assert len(block_hashes("x" * (3 * BLOCK_CHARS + 100))) == 3
    # Blocks are counted in UTF-8 bytes: 'é' is two.
    assert len(block_hashes("é" * BLOCK_CHARS)) == 2


def test_hashes_are_chained() -> None:
    base = "".join(chr(ord("a") + i % 26) for i in range(4 * BLOCK_CHARS))
    hashes = block_hashes(base)
    assert len(set(hashes)) == 4
    # Identical block contents at different positions hash differently (the chain).
    same = block_hashes("z" * 4 * BLOCK_CHARS)
    assert len(set(same)) == 4
    # A change in block 0 changes every hash after it...
    changed_first = block_hashes("#" + base[1:])
    assert all(x != y for x, y in zip(hashes, changed_first, strict=True))
    # ...while a change in block 2 leaves blocks 0 and 1 alone.
    at = 2 * BLOCK_CHARS + 5
    changed_third = block_hashes(base[:at] + "#" + base[at + 1 :])
    assert changed_third[:2] == hashes[:2]
    assert changed_third[2] != hashes[2]
    assert changed_third[3] != hashes[3]


def test_a_longer_prompt_extends_the_shorter_ones_hashes() -> None:
    short = "q" * (2 * BLOCK_CHARS + 17)
    longer = short + "more text " * 100
    assert block_hashes(longer)[:2] == block_hashes(short)


def test_hashes_fit_in_63_bits() -> None:
    hashes = block_hashes("".join(str(i) for i in range(5000)))
    assert hashes
    assert all(0 <= h < 2**63 for h in hashes)


def test_hashes_are_stable_across_processes() -> None:
    """Replicas must agree: no dependence on Python's per-process hash salt."""
    text = "stable prefix " * 100
    code = (
        "from gateway.prefix import block_hashes; "
        f"print(','.join(map(str, block_hashes({text!r}))))"
    )
    outputs = set()
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=os.getcwd(),
        )
        outputs.add(out.stdout.strip())
    assert outputs == {",".join(map(str, block_hashes(text)))}


def test_prompt_hashes_for_text_and_token_ids() -> None:
    assert prompt_block_hashes("p" * 600) == block_hashes("p" * 600)
    ids = list(range(300))
    assert prompt_block_hashes(ids) == block_hashes(",".join(map(str, ids)))
    assert prompt_block_hashes(ids)
    assert prompt_block_hashes(ids[:10]) == ()


# -- whole conversations ----------------------------------------------------------------------


def test_conversation_hashes_cover_every_message() -> None:
    """Same first message, different later turns: only the leading blocks are shared."""
    system = {"role": "system", "content": "You are a careful assistant. " * 40}  # ~1160 chars
    a = chat_block_hashes([system, user("Tell me about prefill. " * 30)])
    b = chat_block_hashes([system, user("Tell me about decode!! " * 30)])
    assert len(a) == len(b) > 4
    shared = shared_leading(a, b)
    # The system message spans 4 whole blocks (plus its role header); the fifth block mixes it
    # with the user message, so from there on the hashes differ.
    assert shared == 4
    assert all(x != y for x, y in zip(a[shared:], b[shared:], strict=True))


def test_later_turns_change_the_trailing_hashes() -> None:
    first = user("What is disaggregated serving? " * 20)
    convo = [first, assistant("It splits prefill and decode. " * 20)]
    one = chat_block_hashes([*convo, user("Why? " * 60)])
    two = chat_block_hashes([*convo, user("How? " * 60)])
    prefix_only = chat_block_hashes(convo)
    assert one[: len(prefix_only)] == prefix_only
    assert two[: len(prefix_only)] == prefix_only
    assert one[-1] != two[-1]
    assert one != two


def test_roles_and_message_boundaries_matter() -> None:
    text = "w" * 600
    assert chat_block_hashes([user(text)]) != chat_block_hashes([assistant(text)])
    split_early = chat_block_hashes([user("w" * 300), user("w" * 500)])
    split_late = chat_block_hashes([user("w" * 500), user("w" * 300)])
    assert split_early != split_late
    assert chat_block_hashes([user("a" * 300), user("b" * 300)]) != chat_block_hashes(
        [user("b" * 300), user("a" * 300)]
    )


def test_text_parts_hash_like_plain_content() -> None:
    text = "part of a message " * 40
    parts = {"role": "user", "content": [{"type": "text", "text": text}]}
    assert chat_block_hashes([parts]) == chat_block_hashes([user(text)])
    assert chat_block_hashes([parts])


def test_index_matches_a_conversation_by_its_leading_blocks() -> None:
    store = InMemoryStateStore()
    system = {"role": "system", "content": "Be brief. " * 120}
    a = chat_block_hashes([system, user("question one " * 50)])
    b = chat_block_hashes([system, user("question two " * 50)])
    store.record_prefix(a, "decode-0")
    matched = store.match_prefix(b)
    assert matched == {"decode-0": shared_leading(a, b)}
    assert 0 < matched["decode-0"] < len(b)
    assert store.match_prefix(a) == {"decode-0": len(a)}


# -- the prefix index -------------------------------------------------------------------------


def test_match_prefix_counts_leading_blocks_per_worker() -> None:
    store = InMemoryStateStore()
    store.record_prefix([1, 2, 3], "w0")
    store.record_prefix([1, 2], "w1")
    store.record_prefix([9], "w2")
    assert store.match_prefix([1, 2, 3, 4]) == {"w0": 3, "w1": 2}
    assert store.match_prefix([1]) == {"w0": 1, "w1": 1}
    assert store.match_prefix([5, 6]) == {}
    assert store.match_prefix([]) == {}


def test_prefix_index_evicts_least_recently_recorded() -> None:
    store = InMemoryStateStore(max_prefix_blocks=4)
    store.record_prefix([1, 2], "w0")
    store.record_prefix([3, 4], "w1")
    store.record_prefix([1], "w2")  # refreshes block 1
    store.record_prefix([5], "w3")  # over capacity: block 2 (oldest) goes
    assert store.match_prefix([1]) == {"w0": 1, "w2": 1}
    assert "w0" not in store.match_prefix([2])
    assert store.match_prefix([5]) == {"w3": 1}
    store.record_prefix([6, 7], "w3")  # blocks 3 and 4 go
    assert store.match_prefix([3, 4]) == {}


def test_load_counters() -> None:
    store = InMemoryStateStore()
    store.add_load("w0", 2, 500)
    store.add_load("w0", -1, -200)
    assert (store.load("w0").requests, store.load("w0").tokens) == (1, 300)
    assert (store.load("unknown").requests, store.load("unknown").tokens) == (0, 0)


hash_lists = st.lists(st.integers(0, 30), max_size=12)


@settings(max_examples=300, database=None, deadline=None)
@given(
    records=st.lists(st.tuples(hash_lists, st.sampled_from(["w0", "w1", "w2"])), max_size=10),
    query=hash_lists,
    capacity=st.integers(1, 40),
)
def test_match_prefix_counts_are_bounded(
    records: list[tuple[list[int], str]], query: list[int], capacity: int
) -> None:
    store = InMemoryStateStore(max_prefix_blocks=capacity)
    for hashes, worker in records:
        store.record_prefix(hashes, worker)
    matched = store.match_prefix(query)
    recorded_workers = {w for hs, w in records if hs}
    assert set(matched) <= recorded_workers
    for worker, count in matched.items():
        assert 1 <= count <= len(query)
        # The count points at a block the worker was recorded for.
        assert query[count - 1] in {h for hs, w in records if w == worker for h in hs}
