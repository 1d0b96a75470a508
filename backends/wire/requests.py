"""From a validated OpenAI request to what a backend is asked for: one context-length check
and one :class:`~backends.base.GenerationParams` builder, used by the gateway's API, the
emulated backend server and the simulation alike.

Example::

    body = ChatCompletionRequest.model_validate(data)
    params = generation_params(
        body, data, prompt_tokens=counter.chat(data["messages"]), request_id="r1",
        model="llama-3.1-8b", default_max_tokens=256, max_context=8192,
        seed=lambda: secrets.randbits(63),
    )   # raises ContextLengthExceeded when the prompt and max_tokens do not fit
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from backends.base import GenerationParams
from backends.wire.schemas import ChatCompletionRequest, CompletionRequest


class ContextLengthExceeded(ValueError):
    """The prompt plus the tokens asked for exceed the model's context window.

    Callers render it in their own dialect (the gateway's OpenAI envelope, vLLM's message on
    the backend server, a rejection in the simulation); the numbers are on the exception."""

    def __init__(self, limit: int, prompt_tokens: int, max_tokens: int) -> None:
        self.limit = limit
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        super().__init__(
            f"this model's maximum context length is {limit} tokens; the request has "
            f"{prompt_tokens} prompt tokens and asks for {max_tokens} more"
        )


def check_context(prompt_tokens: int, max_tokens: int, limit: int) -> None:
    """Raise :class:`ContextLengthExceeded` unless ``prompt_tokens + max_tokens <= limit``."""
    if prompt_tokens + max_tokens > limit:
        raise ContextLengthExceeded(limit, prompt_tokens, max_tokens)


def generation_params(
    body: ChatCompletionRequest | CompletionRequest,
    raw: Mapping[str, Any],
    *,
    prompt_tokens: int,
    request_id: str,
    model: str,
    default_max_tokens: int,
    max_context: int,
    seed: Callable[[], int],
    block_hashes: tuple[int, ...] = (),
) -> GenerationParams:
    """The request as a backend sees it, after the context check.

    ``model`` is the backend's name for the model (a catalog profile); ``seed`` draws one when
    the client set none; ``raw`` is the request body as received (real upstreams forward it).
    """
    max_tokens = body.requested_max_tokens() or default_max_tokens
    check_context(prompt_tokens, max_tokens, max_context)
    return GenerationParams(
        request_id=request_id,
        model=model,
        api="chat" if isinstance(body, ChatCompletionRequest) else "completions",
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        seed=body.seed if body.seed is not None else seed(),
        stop=body.stop_list(),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        sampling=body.sampling(),
        body=raw,
        block_hashes=block_hashes,
    )
