"""Workloads for simulation: request lengths, arrival processes, Mooncake traces.

A workload is a list of :class:`RequestSpec` — prompt and output lengths, prefix block hashes
and, for open-loop load, an arrival time. Lengths come from a fixed value or a distribution
spec (:func:`parse_length`); arrivals from a Poisson process (:func:`poisson_arrivals`), a
trace's timestamps (:func:`load_trace`), or none at all for closed-loop load, where each of
``concurrency`` clients sends its next request when the previous one finishes.

Everything is deterministic given the seed.

Example::

    isl = parse_length("lognormal:1000,400")
    osl = parse_length("256")
    rng = random.Random(7)
    specs = synthesize(100, isl, osl, rng, arrivals=poisson_arrivals(5.0, 100, rng))
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from backends.frozen import fast_init

TRACE_BLOCK_TOKENS = 512  # the Mooncake traces hash prompts in 512-token blocks


class WorkloadError(ValueError):
    """A bad length spec or trace line; the message says which and why."""


@fast_init
@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One simulated request."""

    prompt_tokens: int
    output_tokens: int
    arrival_s: float | None = None  # None: closed loop (sent when a client is free)
    block_hashes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Length:
    """A token-length distribution: ``fixed``, ``uniform``, ``normal`` or ``lognormal``.

    ``a, b`` are the value (fixed), the bounds (uniform), or the mean and standard deviation of
    the lengths themselves (normal, lognormal). Draws are rounded and clipped at 1.
    """

    kind: str
    a: float
    b: float = 0.0

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            x = self.a
        elif self.kind == "uniform":
            return rng.randint(max(1, int(self.a)), max(1, int(self.b)))
        elif self.kind == "normal":
            x = rng.gauss(self.a, self.b)
        else:  # lognormal with the given mean and std of the lengths (lognormvariate's draw)
            mu, sigma = _lognormal(self.a, self.b)
            x = math.exp(rng.normalvariate(mu, sigma))
        return max(1, round(x))

    @property
    def mean(self) -> float:
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        return self.a

    def __str__(self) -> str:
        return f"{self.a:g}" if self.kind == "fixed" else f"{self.kind}:{self.a:g},{self.b:g}"


@functools.lru_cache(maxsize=64)
def _lognormal(mean: float, std: float) -> tuple[float, float]:
    """The underlying normal's ``(mu, sigma)`` for lengths of this mean and std."""
    sigma2 = math.log1p((std / mean) ** 2)
    return math.log(mean) - sigma2 / 2, math.sqrt(sigma2)


def parse_length(spec: str | int) -> Length:
    """``N``, ``uniform:LO,HI``, ``normal:MEAN,STD`` or ``lognormal:MEAN,STD``."""
    text = str(spec).strip()
    kind, sep, rest = text.partition(":")
    if not sep:
        value = _number(text, text)
        if value < 1:
            raise WorkloadError(f"length '{text}' must be at least 1")
        return Length("fixed", value)
    kind = kind.lower()
    if kind not in ("uniform", "normal", "lognormal"):
        raise WorkloadError(
            f"unknown distribution '{kind}' in '{text}'; use uniform:LO,HI, normal:MEAN,STD "
            "or lognormal:MEAN,STD"
        )
    parts = rest.split(",")
    if len(parts) != 2:
        raise WorkloadError(f"'{text}' needs two numbers after '{kind}:'")
    a, b = (_number(p, text) for p in parts)
    if kind == "uniform" and not 1 <= a <= b:
        raise WorkloadError(f"'{text}': uniform bounds need 1 <= LO <= HI")
    if kind != "uniform" and (a <= 0 or b < 0):
        raise WorkloadError(f"'{text}': {kind} needs MEAN > 0 and STD >= 0")
    return Length(kind, a, b)


def _number(part: str, spec: str) -> float:
    try:
        return float(part)
    except ValueError:
        raise WorkloadError(f"'{part}' in length spec '{spec}' is not a number") from None


def poisson_arrivals(rate: float, count: int, rng: random.Random) -> list[float]:
    """``count`` arrival times of a Poisson process of ``rate`` per second, from 0."""
    if rate <= 0:
        raise WorkloadError(f"rate must be positive, got {rate}")
    t = 0.0
    out = []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def poisson_until(rate: float, duration: float, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process of ``rate`` per second within ``[0, duration)``."""
    if rate <= 0:
        raise WorkloadError(f"rate must be positive, got {rate}")
    out = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def synthesize(
    count: int,
    isl: Length,
    osl: Length,
    rng: random.Random,
    *,
    arrivals: Sequence[float] | None = None,
) -> list[RequestSpec]:
    """``count`` requests with lengths drawn from ``isl``/``osl`` (no shared prefixes)."""
    specs: list[RequestSpec] = []
    for i in range(count):
        at = arrivals[i] if arrivals is not None else None
        specs.append(RequestSpec(isl.draw(rng), osl.draw(rng), at))
    return specs


def load_trace(path: Path, *, limit: int | None = None) -> list[RequestSpec]:
    """Read a Mooncake-format JSONL trace.

    Each line: ``timestamp`` (ms from the start), ``input_length``, ``output_length`` and
    ``hash_ids`` (chained prefix-block hashes, 512 tokens per block). Arrivals are returned in
    seconds, relative to the first request.
    """
    specs: list[RequestSpec] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise WorkloadError(f"cannot read trace {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if limit is not None and len(specs) >= limit:
            break
        specs.append(_trace_request(line, f"{path}:{number}"))
    if not specs:
        raise WorkloadError(f"trace {path} has no requests")
    t0 = min(s.arrival_s or 0.0 for s in specs)
    return [
        RequestSpec(s.prompt_tokens, s.output_tokens, (s.arrival_s or 0.0) - t0, s.block_hashes)
        for s in specs
    ]


def _trace_request(line: str, where: str) -> RequestSpec:
    try:
        row = json.loads(line)
        timestamp = float(row["timestamp"])
        prompt, output = int(row["input_length"]), int(row["output_length"])
        hashes = tuple(int(h) for h in row.get("hash_ids", ()))
    except (ValueError, TypeError, KeyError) as exc:
        raise WorkloadError(f"{where}: not a Mooncake trace line ({exc!r})") from exc
    if prompt < 1 or output < 1:
        raise WorkloadError(f"{where}: input_length and output_length must be at least 1")
    return RequestSpec(prompt, output, timestamp / 1000.0, hashes)


@dataclass(frozen=True)
class Workload:
    """Requests and how they are sent: at their arrival times (open loop) or by
    ``concurrency`` clients (closed loop) until the requests run out or ``stop_after_s``."""

    requests: Iterable[RequestSpec]
    concurrency: int | None
    stop_after_s: float | None
    total: int | None


DEFAULT_REQUESTS = 200


def make_workload(
    *,
    isl: Length | None = None,
    osl: Length | None = None,
    trace: Sequence[RequestSpec] | None = None,
    concurrency: int | None = None,
    rate: float | None = None,
    requests: int | None = None,
    duration: float | None = None,
    seed: int = 0,
) -> Workload:
    """Combine lengths (``isl``/``osl`` or a trace) with a load model.

    * ``rate``: Poisson arrivals — ``requests`` of them, or all within ``duration``;
    * ``concurrency``: closed loop — ``requests`` in all, or until ``duration`` has passed;
    * neither, with a trace: the trace's own arrival times (its first ``requests``, or those
      within ``duration``).

    Without ``requests`` or ``duration``, a synthetic workload has :data:`DEFAULT_REQUESTS`
    requests and a trace all of its lines.
    """
    if concurrency is not None and rate is not None:
        raise WorkloadError("give --concurrency (closed loop) or --rate (Poisson), not both")
    if concurrency is not None and concurrency < 1:
        raise WorkloadError(f"concurrency must be at least 1, got {concurrency}")
    if requests is not None and requests < 1:
        raise WorkloadError(f"requests must be at least 1, got {requests}")
    if duration is not None and duration <= 0:
        raise WorkloadError(f"duration must be positive, got {duration}")
    rng = random.Random(seed)
    if trace is not None:
        if isl is not None or osl is not None:
            raise WorkloadError("a trace brings its own lengths: drop --isl/--osl with --trace")
        # request i, sent at the given time
        spec: Callable[[int, float | None], RequestSpec] = lambda i, at: _at(  # noqa: E731
            trace[i % len(trace)], at
        )
        if concurrency is None and rate is None:
            picked = [r for r in trace if duration is None or (r.arrival_s or 0.0) < duration]
            picked = picked[:requests] if requests is not None else picked
            return Workload(picked, None, None, len(picked))
        default = len(trace)
    else:
        if isl is None or osl is None:
            raise WorkloadError("give --isl/--isl-dist and --osl/--osl-dist, or --trace")
        if concurrency is None and rate is None:
            raise WorkloadError("give a load: --concurrency N (closed loop) or --rate QPS")
        draws = random.Random(seed + 1)
        spec = lambda i, at: RequestSpec(isl.draw(draws), osl.draw(draws), at)  # noqa: E731
        default = DEFAULT_REQUESTS
    if rate is not None:
        if requests is None and duration is not None:
            times = poisson_until(rate, duration, rng)
        else:
            times = poisson_arrivals(rate, requests or default, rng)
        specs = [spec(i, t) for i, t in enumerate(times)]
        return Workload(specs, None, None, len(specs))
    if requests is None and duration is not None:
        return Workload(_endless(spec), concurrency, duration, None)
    count = requests or default
    return Workload([spec(i, None) for i in range(count)], concurrency, None, count)


def _at(r: RequestSpec, arrival: float | None) -> RequestSpec:
    return RequestSpec(r.prompt_tokens, r.output_tokens, arrival, r.block_hashes)


def _endless(spec: Callable[[int, float | None], RequestSpec]) -> Iterator[RequestSpec]:
    i = 0
    while True:
        yield spec(i, None)
        i += 1
