"""The load generator's parts that do not need locust: prompts, workloads, arrivals, timing.

:mod:`locustfile` wires these into locust users; keeping them here keeps them testable. The
result files are in the format ``pdgate report`` reads, defined beside it
(:data:`gateway.sim.report.REQUEST_COLUMNS`, :func:`~gateway.sim.report.itl_buckets`).

* Prompts are synthetic text sized for the gateway's token approximation (4 UTF-8 bytes per
  token, 4 per chat message and 3 for the reply header), deterministic per seed, so the same
  seed sends the same prompts and shared prefixes are byte-identical.
* Workloads: short chat, long-context RAG (documents from a shared corpus, so popular
  documents make shared prefixes), multi-turn agentic sessions whose prompt grows turn by turn
  on top of a system prompt shared by every session, and Mooncake trace replay (requests
  sharing leading ``hash_ids`` share leading text).
* Arrivals: a :class:`Pacer` turns a rate schedule into Poisson arrivals shared by every user
  of the process (open loop); with no rate each user sends back to back (closed loop).
* Timing: :func:`read_stream` stamps each SSE event as it is read, so TTFT is the first token's
  arrival, not the arrival of whatever buffer held it.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO

from gateway.sim.report import REQUEST_COLUMNS, itl_buckets
from gateway.sim.workload import TRACE_BLOCK_TOKENS, Length, RequestSpec, load_trace, parse_length

BYTES_PER_TOKEN = 4  # the gateway's approximation without a tokenizer
MESSAGE_TOKENS = 4  # chat template tokens per message
REPLY_TOKENS = 3  # chat template tokens for the reply's header

_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "model", "token", "cache",
    "prefill", "decode", "batch", "kernel", "memory", "latency", "tensor", "layer", "attention",
    "router", "gateway", "request", "stream", "device", "pool", "worker", "queue",
)  # fmt: skip

Message = dict[str, str]


# -- prompts ----------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def text(tokens: int, seed: int) -> str:
    """Deterministic words of exactly ``tokens`` tokens (``4 × tokens`` ASCII bytes)."""
    size = max(0, tokens) * BYTES_PER_TOKEN
    rng = random.Random(seed)
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:size].ljust(size, ".")


def padded(s: str) -> str:
    """``s`` padded with spaces to whole tokens, so it counts exactly."""
    return s.ljust(-(-len(s) // BYTES_PER_TOKEN) * BYTES_PER_TOKEN)


def content_tokens(total: int, messages: int) -> int:
    """Tokens left for message text when a chat prompt of ``total`` tokens has ``messages``."""
    return max(1, total - MESSAGE_TOKENS * messages - REPLY_TOKENS)


@dataclass(frozen=True)
class Request:
    """One chat completion to send."""

    kind: str
    messages: list[Message]
    max_tokens: int

    def body(self, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,  # vLLM's extension: real servers then answer exactly max_tokens
        }


class Workload:
    """Makes a user's next request; told each answer (sessions build on them)."""

    kind = "chat"

    def next_request(self) -> Request:
        raise NotImplementedError

    def observe(self, answer: str, ok: bool) -> None:
        return None


class ChatWorkload(Workload):
    """Short single-turn chats: a question, an answer."""

    kind = "chat"

    def __init__(self, prompt: Length, output: Length, rng: random.Random) -> None:
        self._prompt, self._output, self._rng = prompt, output, rng

    def next_request(self) -> Request:
        n = self._prompt.draw(self._rng)
        content = text(content_tokens(n, 1), self._rng.getrandbits(62))
        return Request(
            self.kind, [{"role": "user", "content": content}], self._output.draw(self._rng)
        )


class RagWorkload(Workload):
    """Long-context prompts: retrieved documents from a shared corpus, then a question.

    Documents are drawn with a Zipf-like preference for popular ones and placed first, so
    requests that retrieved the same leading document share a prefix, as in production RAG.
    """

    kind = "rag"
    CORPUS = 64
    DOC_TOKENS = 1024
    SYSTEM = "Answer from the documents below and cite them."

    def __init__(self, prompt: Length, output: Length, rng: random.Random) -> None:
        self._prompt, self._output, self._rng = prompt, output, rng
        self._weights = [1.0 / (rank + 1) for rank in range(self.CORPUS)]

    def next_request(self) -> Request:
        rng = self._rng
        system = padded(self.SYSTEM)
        budget = content_tokens(self._prompt.draw(rng), 2) - len(system) // BYTES_PER_TOKEN
        question = min(64, max(1, budget // 10))
        docs: list[str] = []
        left = budget - question
        while left > 0:
            doc = rng.choices(range(self.CORPUS), self._weights)[0]
            size = min(self.DOC_TOKENS, left)
            docs.append(text(size, 1_000_000 + doc))
            left -= size
        user = "".join(docs) + text(question, rng.getrandbits(62))
        return Request(
            self.kind,
            [{"role": "system", "content": system}, {"role": "user", "content": user}],
            self._output.draw(rng),
        )


class AgentWorkload(Workload):
    """Multi-turn agentic sessions on a growing shared prefix.

    Every session starts with the same system prompt (tool definitions, ``system_tokens``);
    each turn resends the whole conversation plus the last answer and a tool result, so turn
    ``k`` extends turn ``k − 1``'s prompt. Prefix-aware routing keeps a session on the worker
    that holds its KV; the shared system prompt is a prefix of every session.
    """

    kind = "agent"

    def __init__(
        self,
        output: Length,
        rng: random.Random,
        *,
        turns: int = 6,
        system_tokens: int = 1024,
        tool_tokens: int = 256,
    ) -> None:
        self._output, self._rng, self._turns = output, rng, turns
        self._system = text(content_tokens(system_tokens, 1), 7)
        self._tool_tokens = tool_tokens
        self._messages: list[Message] = []

    def next_request(self) -> Request:
        if not self._messages or self._answered() >= self._turns:
            task = text(64, self._rng.getrandbits(62))
            self._messages = [
                {"role": "system", "content": self._system},
                {"role": "user", "content": "Task: " + task},
            ]
        return Request(self.kind, list(self._messages), self._output.draw(self._rng))

    def observe(self, answer: str, ok: bool) -> None:
        if not ok:  # start over: a failed turn leaves no answer to build on
            self._messages = []
            return
        tool = "Tool result: " + text(self._tool_tokens, self._rng.getrandbits(62))
        self._messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": tool},
        ]

    def _answered(self) -> int:
        """Turns of this session already answered (each adds an answer and a tool result)."""
        return (len(self._messages) - 2) // 2


class TraceWorkload(Workload):
    """Mooncake trace replay: lengths from the trace, text shared where ``hash_ids`` are.

    Each hash id stands for one 512-token block whose text is derived from the id, so two
    requests whose leading ids agree send the same leading text. The arrival process hands
    each request its trace line (:meth:`assign`) before :meth:`next_request`.
    """

    kind = "trace"

    def __init__(self) -> None:
        self._spec: RequestSpec | None = None

    def assign(self, spec: RequestSpec) -> None:
        self._spec = spec

    def next_request(self) -> Request:
        spec = self._spec
        if spec is None:
            raise RuntimeError("no trace line assigned")
        content = trace_prompt(spec)
        return Request(self.kind, [{"role": "user", "content": content}], spec.output_tokens)


def trace_prompt(spec: RequestSpec) -> str:
    """Text of ``spec.prompt_tokens`` tokens (as one chat message) made of its hash blocks."""
    total = content_tokens(spec.prompt_tokens, 1)
    parts: list[str] = []
    left = total
    for h in spec.block_hashes:
        if left <= 0:
            break
        size = min(TRACE_BLOCK_TOKENS, left)
        parts.append(text(size, 2_000_000_000 + h))
        left -= size
    if left > 0:  # a trace line whose hash ids do not cover its length
        parts.append(text(left, spec.prompt_tokens))
    return "".join(parts)


WORKLOADS = ("chat", "rag", "agent")
MIX_WEIGHTS = {"chat": 6, "rag": 2, "agent": 2}


@dataclass(frozen=True)
class WorkloadOptions:
    prompt: Length = field(default_factory=lambda: parse_length("lognormal:256,128"))
    output: Length = field(default_factory=lambda: parse_length("lognormal:128,64"))
    rag_prompt: Length = field(default_factory=lambda: parse_length("uniform:3000,8000"))
    agent_turns: int = 6
    agent_system_tokens: int = 1024
    agent_tool_tokens: int = 256


def make_workload(kind: str, options: WorkloadOptions, rng: random.Random) -> Workload:
    """One user's workload; ``mix`` picks chat, rag or agent by :data:`MIX_WEIGHTS`."""
    if kind == "mix":
        kind = rng.choices(list(MIX_WEIGHTS), list(MIX_WEIGHTS.values()))[0]
    if kind == "chat":
        return ChatWorkload(options.prompt, options.output, rng)
    if kind == "rag":
        return RagWorkload(options.rag_prompt, options.output, rng)
    if kind == "agent":
        return AgentWorkload(
            options.output,
            rng,
            turns=options.agent_turns,
            system_tokens=options.agent_system_tokens,
            tool_tokens=options.agent_tool_tokens,
        )
    raise ValueError(f"unknown workload '{kind}'; use chat, rag, agent, mix or trace")


# -- arrivals ---------------------------------------------------------------------------------


class Pacer:
    """Poisson arrivals at a rate that may change over time, shared by a process's users.

    A free user claims the next arrival time and sleeps until it; if no user was free when an
    arrival fell due, the request goes out late and the lateness is recorded (add users).
    ``rate`` None means closed loop: no pacing.
    """

    def __init__(self, seed: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self._rng = random.Random(seed)
        self._clock = clock
        self.rate: float | None = None
        self._next: float | None = None

    def set_rate(self, rate: float | None) -> None:
        if rate == self.rate:
            return
        self.rate = rate
        # Memorylessness: restarting the process at a rate change keeps it Poisson.
        self._next = None if not rate else self._clock() + self._rng.expovariate(rate)

    def claim(self) -> float | None:
        """The absolute (clock) time of the next arrival, or None when closed loop."""
        if not self.rate or self._next is None:
            return None
        at = self._next
        self._next = at + self._rng.expovariate(self.rate)
        return at


class TraceArrivals:
    """A trace's own arrival times (scaled by ``speedup``), looping when it runs out."""

    def __init__(
        self,
        specs: list[RequestSpec],
        speedup: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not specs:
            raise ValueError("empty trace")
        self._specs = sorted(specs, key=lambda s: s.arrival_s or 0.0)
        self._speedup = speedup
        self._clock = clock
        self._start: float | None = None
        self._i = 0
        span = (self._specs[-1].arrival_s or 0.0) / speedup
        self._period = span + span / max(1, len(self._specs) - 1)  # keep the mean gap at the seam

    def claim(self) -> tuple[float, RequestSpec]:
        if self._start is None:
            self._start = self._clock()
        lap, i = divmod(self._i, len(self._specs))
        self._i += 1
        spec = self._specs[i]
        return self._start + lap * self._period + (spec.arrival_s or 0.0) / self._speedup, spec

    @property
    def mean_rate(self) -> float:
        return len(self._specs) / self._period if self._period > 0 else math.inf


@dataclass(frozen=True)
class Schedule:
    """Offered load over time: ``rate_at(t)`` requests per second, None once it is over.

    * ``steady``: ``rate`` for ever (locust's ``--run-time`` ends it);
    * ``step``: ``rate``, then ``step_rate`` more every ``step_every`` s, ``steps`` steps;
    * ``spike``: ``rate``, ``spike_rate`` from ``spike_at`` for ``spike_for`` s, then ``rate``
      again until ``spike_at + 2 × spike_for``... ended by ``--run-time``;
    * ``closed``: no rate: ``-u`` users send back to back.
    """

    shape: str = "closed"
    rate: float = 1.0
    step_rate: float = 1.0
    step_every: float = 30.0
    steps: int = 5
    spike_rate: float = 10.0
    spike_at: float = 30.0
    spike_for: float = 10.0

    def __post_init__(self) -> None:
        if self.shape not in ("closed", "steady", "step", "spike"):
            raise ValueError(f"unknown shape '{self.shape}'; use closed, steady, step or spike")

    def rate_at(self, t: float) -> float | None:
        """The offered rate at ``t`` s into the test (0.0 for closed loop), None when done."""
        if self.shape == "closed":
            return 0.0
        if self.shape == "steady":
            return self.rate
        if self.shape == "step":
            k = int(t // self.step_every)
            return None if k >= self.steps else self.rate + k * self.step_rate
        in_spike = self.spike_at <= t < self.spike_at + self.spike_for
        return self.spike_rate if in_spike else self.rate


# -- measuring one stream ---------------------------------------------------------------------


@dataclass
class StreamResult:
    """What one streamed completion looked like from the client."""

    sent: float  # perf_counter when the request was sent
    stamps: list[float] = field(default_factory=list)  # perf_counter of each content event
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.stamps[0] - self.sent if self.stamps else None

    @property
    def gaps(self) -> list[float]:
        """Gaps between content events (one token per event unless the server coalesced)."""
        s = self.stamps
        return [b - a for a, b in itertools.pairwise(s)]

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.stamps)

    @property
    def tpot(self) -> float | None:
        """(last token − first token) / (tokens − 1): the request's mean inter-token time."""
        if self.tokens < 2 or len(self.stamps) < 2:
            return None
        return (self.stamps[-1] - self.stamps[0]) / (self.tokens - 1)

    @property
    def decode_tokens_per_s(self) -> float | None:
        tpot = self.tpot
        return 1.0 / tpot if tpot else None


def read_stream(
    lines: Iterable[bytes], sent: float, clock: Callable[[], float] = time.perf_counter
) -> StreamResult:
    """Consume an OpenAI SSE stream line by line, stamping each content event on arrival."""
    out = StreamResult(sent)
    parts: list[str] = []
    for line in lines:
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        now = clock()
        try:
            event = json.loads(payload)
        except ValueError:
            out.error = f"malformed event: {payload[:100]!r}"
            break
        if "error" in event:
            out.error = str(event["error"].get("message", event["error"]))
            break
        piece = _content(event)
        if piece:
            out.stamps.append(now)
            parts.append(piece)
        usage = event.get("usage")
        if usage:
            out.prompt_tokens = usage.get("prompt_tokens")
            out.completion_tokens = usage.get("completion_tokens")
    out.text = "".join(parts)
    if out.error is None and not out.stamps:
        out.error = "no tokens in the stream"
    return out


def _content(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return piece or ""


# -- results ----------------------------------------------------------------------------------


class ItlHistogram:
    """Every inter-token gap of a run, in log buckets: exact enough, constant memory."""

    def __init__(self) -> None:
        self.bounds = itl_buckets()
        self.counts = [0] * len(self.bounds)

    def add(self, gap: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, gap)] += 1

    def write(self, path: Path) -> None:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["le_s", "count"])
            for bound, count in zip(self.bounds, self.counts, strict=True):
                w.writerow(["+Inf" if math.isinf(bound) else f"{bound:.6g}", count])


class RequestLog:
    """Appends one CSV row per finished request (streamed, so long runs stay flat in memory)."""

    def __init__(self, path: Path) -> None:
        self._file: TextIO = path.open("w", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerow(REQUEST_COLUMNS)
        self._rows = 0

    def add(self, row: dict[str, Any]) -> None:
        self._csv.writerow([_cell(row.get(c)) for c in REQUEST_COLUMNS])
        self._rows += 1
        if self._rows % 100 == 0:
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(round(value, 6))  # microseconds, and whole Unix timestamps
    return str(value)


def load_trace_specs(path: Path, limit: int | None = None) -> list[RequestSpec]:
    return load_trace(path, limit=limit)
