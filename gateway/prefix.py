"""Prompt block hashes for prefix-aware routing and prefix caches.

The whole conversation — every message's role and text, in order, not only the first one — is
cut into blocks of ``BLOCK_CHARS`` characters (about 64 tokens at ~4 bytes per token) and hashed
in a chain: hash ``i`` covers blocks ``0..i``, so two prompts share hash ``i`` exactly when they
share that whole prefix. Hashes are stable across processes (BLAKE2b, not Python's salted
``hash``), so gateway replicas agree on them. The last, partial block is not hashed: a prefix
cache can only reuse whole blocks.

Example::

    chat_block_hashes([{"role": "user", "content": "..."}])   # (h0, h1, ...)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from backends.tokens import message_texts

BLOCK_CHARS = 256
_SEP_FIELD = "\x1f"
_SEP_MESSAGE = "\x1e"


def block_hashes(text: str, block_chars: int = BLOCK_CHARS) -> tuple[int, ...]:
    """Chained 64-bit hashes of the whole ``block_chars`` blocks of ``text``."""
    out: list[int] = []
    prev = b""
    data = text.encode()
    step = block_chars
    for start in range(0, len(data) - step + 1, step):
        digest = hashlib.blake2b(prev + data[start : start + step], digest_size=8).digest()
        out.append(int.from_bytes(digest, "big") >> 1)  # 63 bits: fits signed 64-bit stores
        prev = digest
    return tuple(out)


def chat_block_hashes(messages: Iterable[dict[str, Any]]) -> tuple[int, ...]:
    parts = [f"{m.get('role', '')}{_SEP_FIELD}{''.join(message_texts(m))}" for m in messages]
    return block_hashes(_SEP_MESSAGE.join(parts))


def prompt_block_hashes(prompt: str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(prompt, str):
        return block_hashes(prompt)
    return block_hashes(",".join(map(str, prompt)))
