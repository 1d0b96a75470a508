"""OpenAI request bodies; the models live in :mod:`backends.openai_schemas` (shared with the
emulated backend server), re-exported here for the gateway."""

from backends.openai_schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    StreamOptions,
)

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "StreamOptions"]
