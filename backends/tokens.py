"""Prompt token counting: what a device is charged for and what ``usage`` reports.

Shared by the gateway and the emulated backend server (``pdgate backend``), so both count a
prompt the same way.

With a ``tokenizer`` (a Hugging Face ``tokenizer.json``) in the model's config, text is counted
with that tokenizer. Without one, the documented approximation is one token per four UTF-8
bytes, rounded up (the usual rule of thumb for English BPE vocabularies).

Chat prompts add a fixed framing cost, as chat templates do: ``MESSAGE_OVERHEAD`` tokens per
message (role header and end-of-turn markers) plus ``REPLY_PRIMER`` for the assistant header
that starts the reply.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

MESSAGE_OVERHEAD = 4
REPLY_PRIMER = 3


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
