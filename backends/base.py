"""The ``Backend`` protocol: what the gateway asks of a prefill, decode or aggregated worker.

A disaggregated request is two legs::

    result = await prefill_backend.prefill(params)        # first token + KV handle
    async for chunk in decode_backend.decode(params, result.kv):
        ...                                               # tokens 2..n

An aggregated request is one: ``async for chunk in backend.generate(params)``.

Streams are async generators; the caller closes them (``contextlib.aclosing``) on every exit
path, and closing a stream aborts its request on the device. A :class:`KVHandle`'s
``release()`` frees the prefill side's KV blocks and may be called any number of times.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from backends.emulator.timing import Link
from backends.frozen import fast_init

Api = Literal["chat", "completions"]


@fast_init
@dataclass(frozen=True, slots=True)
class GenerationParams:
    """One request as a backend sees it.

    ``prompt_tokens`` is what the device is charged for; ``body`` is the validated OpenAI
    request (for upstreams that need the original messages); ``sampling`` holds the fields a
    real engine would apply (temperature, top_p, ...).
    """

    request_id: str
    model: str
    api: Api
    prompt_tokens: int
    max_tokens: int
    seed: int
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    sampling: Mapping[str, Any] = field(default_factory=dict)
    body: Mapping[str, Any] = field(default_factory=dict)
    # Chained hashes of the prompt's leading blocks (hash i covers blocks 0..i), for prefix
    # caches and prefix-aware routing; empty when unknown.
    block_hashes: tuple[int, ...] = ()
    # Tokens per hashed block, which emulated prefix caches need: 64 matches the gateway's
    # 256-character blocks (gateway/prefix.py) at its 4-bytes-per-token approximation; the
    # Mooncake traces use 512.
    hash_block_tokens: int = 64


@fast_init
@dataclass(frozen=True, slots=True)
class LegStats:
    """Where a leg's time went, in seconds, as the backend saw it."""

    queue_s: float = 0.0
    compute_s: float = 0.0
    transfer_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens a prefix cache served instead of computing


@dataclass(frozen=True, slots=True)
class ReportedUsage:
    """Prompt accounting an upstream reported (real engines count with their own tokenizer)."""

    prompt_tokens: int
    cached_tokens: int | None = None
    # The upstream usage's other fields (completion_tokens_details, ...), relayed to the client.
    details: dict[str, Any] | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Text of one or more tokens; the last chunk of a stream has ``finish_reason`` set.

    ``usage``: set on a last chunk by backends whose upstream reports its own prompt count.
    ``choices``: the upstream's choice objects of this chunk's events when one of them carried
    more than text (tool calls, logprobs, reasoning...), to be relayed unchanged
    (:mod:`backends.wire.relay`); ``text`` still holds all of their text.
    """

    text: str
    tokens: int
    finish_reason: str | None = None
    stats: LegStats | None = None
    usage: ReportedUsage | None = None
    choices: tuple[dict[str, Any], ...] = ()


def nothing_to_release() -> None:
    return None


@dataclass(slots=True)
class KVHandle:
    """The prefill side's KV for one request, ready to be pulled by a decode instance."""

    source: str
    prompt_tokens: int
    kv_bytes: float
    descriptors: int
    link: Link | None
    first_token: str
    release: Callable[[], None] = nothing_to_release
    pending_text: str = ""  # text the prefill held back: it may begin a stop string
    params: dict[str, Any] = field(default_factory=dict)
    # When the prefill side produced the first token, and how long its prefill computed (the
    # window a layer-wise transfer overlaps); known for emulated prefills.
    first_token_at: float | None = None
    prefill_compute_s: float = 0.0


@dataclass(frozen=True, slots=True)
class PrefillResult:
    first: TokenChunk
    kv: KVHandle
    stats: LegStats


@dataclass(frozen=True, slots=True)
class BackendLoad:
    """A snapshot of an instance's engine state (emulated instances fill every field)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # share of KV blocks the running sequences hold
    waiting_tokens: int = 0  # prompt tokens queued behind them, not yet holding KV
    max_running: int | None = None  # the most sequences its batch runs at once


class Backend(Protocol):
    """A worker the gateway can send legs to."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def healthy(self) -> bool: ...

    def describe(self) -> dict[str, Any]:
        """What this worker is, for operators (``GET /admin/workers``): ``type`` (``emulated``,
        ``http``, ...) and what identifies it of that type (device, URL and protocol, ...)."""
        ...

    def load(self) -> BackendLoad: ...

    def capacity_tokens(self) -> int | None:
        """The most tokens (prompt + output) one request can hold here; None if unknown."""
        ...

    def estimate_prefill_s(self, prompt_tokens: int) -> float | None:
        """Predicted time until a prompt of this length would finish prefilling here, counting
        the work already queued; None when the backend cannot predict (real upstreams)."""
        ...

    async def prefill(self, params: GenerationParams) -> PrefillResult: ...

    def decode(
        self, params: GenerationParams, kv: KVHandle
    ) -> AsyncGenerator[TokenChunk, None]: ...

    def generate(self, params: GenerationParams) -> AsyncGenerator[TokenChunk, None]: ...
