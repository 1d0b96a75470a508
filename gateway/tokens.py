"""Prompt token counting; the implementation lives in :mod:`backends.tokens` (shared with the
emulated backend server), re-exported here for the gateway."""

from backends.tokens import (
    MESSAGE_OVERHEAD,
    REPLY_PRIMER,
    HFTokenizerCount,
    TextCounter,
    TokenCounter,
    approximate_count,
    message_texts,
)

__all__ = [
    "MESSAGE_OVERHEAD",
    "REPLY_PRIMER",
    "HFTokenizerCount",
    "TextCounter",
    "TokenCounter",
    "approximate_count",
    "message_texts",
]
