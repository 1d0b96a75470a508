"""Prompt token counting: what a device is charged for and what ``usage`` reports.

Shared by the gateway and the emulated backend server (``pdgate backend``), so both count a
prompt the same way.

With a ``tokenizer`` (a Hugging Face ``tokenizer.json``) in the model's config, text is counted
with that tokenizer. Without one, the documented approximation is one token per four UTF-8
bytes, rounded up (the usual rule of thumb for English BPE vocabularies).

Chat prompts add a fixed framing cost, as chat templates do: ``MESSAGE_OVERHEAD`` tokens per
message (role header and end-of-turn markers) plus ``REPLY_PRIMER`` for the assistant header
that starts the reply.

Images are charged too (a vision model turns each into hundreds of prompt tokens, and a limit
that counts them as nothing can be walked past with a megabyte of pixels). Without decoding
them, the estimate is ``IMAGE_TOKENS`` per image part — OpenAI's charge for one 1024×1024
high-detail image (85 base + 4 tiles × 170, platform.openai.com/docs/guides/vision, 2026-12) —
and, for an inline ``data:`` URL, at least one token per ``IMAGE_BYTES_PER_TOKEN`` bytes of the
decoded image (a 1 MB data URL: about 3,000 tokens, close to a 2048×1536 image at Qwen2-VL's
28×28 pixels per token). Other non-text parts (audio, files) are charged the same way by size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

MESSAGE_OVERHEAD = 4
REPLY_PRIMER = 3
IMAGE_TOKENS = 765  # one image part, whatever its size (see the module docstring)
IMAGE_BYTES_PER_TOKEN = 256  # an inline image: at least one token per this many decoded bytes


class TextCounter(Protocol):
    def __call__(self, text: str) -> int: ...


def approximate_count(text: str) -> int:
    """``ceil(utf8_bytes / 4)``."""
    return -(-len(text.encode()) // 4)


class HFTokenizerCount:
    """Counts with a Hugging Face ``tokenizers`` tokenizer loaded from ``tokenizer.json``."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def __call__(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)


class TokenCounter:
    """Counts chat and completion prompts for one model."""

    def __init__(self, tokenizer: Path | None = None) -> None:
        self._count: TextCounter = HFTokenizerCount(tokenizer) if tokenizer else approximate_count

    def text(self, text: str) -> int:
        return self._count(text)

    def chat(self, messages: Iterable[dict[str, Any]]) -> int:
        total = REPLY_PRIMER
        for message in messages:
            total += MESSAGE_OVERHEAD + sum(self._count(t) for t in message_texts(message))
            total += media_tokens(message)
        return total

    def prompt(self, prompt: str | Sequence[int]) -> int:
        """A completions prompt: text, or token ids (counted as given)."""
        return self._count(prompt) if isinstance(prompt, str) else len(prompt)


def message_texts(message: dict[str, Any]) -> Iterable[str]:
    """The text parts of a chat message (string content or a list of text parts)."""
    content = message.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]
    name = message.get("name")
    if isinstance(name, str):
        yield name


def media_tokens(message: dict[str, Any]) -> int:
    """The estimated prompt tokens of a message's non-text parts (see the module docstring)."""
    content = message.get("content")
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if isinstance(part, dict) and part.get("type") not in (None, "text"):
            total += max(IMAGE_TOKENS, _inline_bytes(part) // IMAGE_BYTES_PER_TOKEN)
    return total


def _inline_bytes(part: dict[str, Any]) -> int:
    """Decoded bytes of the base64 data a part carries inline (0 for a remote URL)."""
    biggest = 0
    for value in part.values():
        if isinstance(value, dict):
            value = value.get("url") or value.get("data") or value.get("file_data")
        if isinstance(value, str) and len(value) > 64:
            payload = value.partition(",")[2] if value.startswith("data:") else value
            biggest = max(biggest, len(payload) * 3 // 4)
    return biggest
