"""API keys and per-key rate limits.

Keys come from config (``auth.api_keys``, each value inline or from an environment variable)
and, optionally, from Redis (``{prefix}:apikeys``, a hash of SHA-256 hex digest → JSON
``{"name", "requests_per_minute", "tokens_per_minute"}``). Only digests are kept in memory and
only key *names* ever reach logs or metrics.

Limits are fixed one-minute windows on requests and tokens (prompt tokens when admitted,
completion tokens when done). With Redis they hold across replicas: a Lua script checks and
counts atomically in one round trip per request (never per token). If Redis does not answer
within ``op_timeout_s``, the replica enforces the limit on its own counts instead, so a Redis
outage loosens limits to per-replica for its duration but never fails a request.

Example::

    keys = KeyRing.from_config(settings.auth)
    key = keys.lookup(bearer_token)           # ApiKey or None
    wait = await limiter.admit(key, prompt_tokens=900)   # None, or seconds until the window ends
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import orjson

from gateway.errors import InvalidRequest, Overloaded, Unauthorized

if TYPE_CHECKING:  # (redis is loaded where a client is made: without one, never)
    import redis.asyncio as aioredis

log = logging.getLogger("pdgate.auth")

WINDOW_S = 60


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


class KeyRing:
    """Known keys by digest; lookups compare digests in constant time."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = {k.digest: k for k in keys}

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: ApiKey) -> None:
        self._keys[key.digest] = key

    def lookup(self, presented: str) -> ApiKey | None:
        d = digest(presented)
        for known, key in self._keys.items():
            if hmac.compare_digest(known, d):
                return key
        return None


def resolve_secret(value: str | None, env: str | None, what: str) -> str | None:
    """A secret given inline or by environment variable name."""
    if env:
        secret = os.environ.get(env)
        if not secret:
            raise ValueError(f"{what}: environment variable {env} is not set")
        return secret
    return value


class RateLimiter(Protocol):
    async def admit(self, key: ApiKey, prompt_tokens: int) -> float | None:
        """Count a request; None if within limits, else seconds until the window resets."""
        ...

    async def charge(self, key: ApiKey, tokens: int) -> None:
        """Add tokens to the key's current window (completion tokens, after the fact)."""
        ...


def _window(now: float) -> tuple[int, float]:
    """The current window's number and the seconds left in it."""
    n = int(now // WINDOW_S)
    return n, (n + 1) * WINDOW_S - now


class LocalRateLimiter:
    """Fixed-window counters of this process."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, int], int] = {}
        self._tokens: dict[tuple[str, int], int] = {}

    async def admit(self, key: ApiKey, prompt_tokens: int) -> float | None:
        return self.admit_now(key, prompt_tokens)

    def admit_now(self, key: ApiKey, prompt_tokens: int) -> float | None:
        window, left = _window(time.time())
        slot = (key.digest, window)
        self._expire(window)
        requests = self._requests.get(slot, 0)
        tokens = self._tokens.get(slot, 0)
        if _over(key, requests, tokens):
            return left
        self._requests[slot] = requests + 1
        self._tokens[slot] = tokens + prompt_tokens
        return None

    async def charge(self, key: ApiKey, tokens: int) -> None:
        slot = (key.digest, _window(time.time())[0])
        self._tokens[slot] = self._tokens.get(slot, 0) + tokens

    def _expire(self, window: int) -> None:
        for table in (self._requests, self._tokens):
            for slot in [s for s in table if s[1] < window]:
                del table[slot]


def _over(key: ApiKey, requests: int, tokens: int) -> bool:
    rpm, tpm = key.requests_per_minute, key.tokens_per_minute
    return (rpm is not None and requests >= rpm) or (tpm is not None and tokens >= tpm)


# KEYS: requests counter, tokens counter. ARGV: rpm (-1 = none), tpm (-1 = none), prompt tokens,
# window TTL. Returns 1 if admitted (and counted), 0 if over a limit (nothing counted).
_ADMIT = """
local r = tonumber(redis.call('GET', KEYS[1]) or '0')
local t = tonumber(redis.call('GET', KEYS[2]) or '0')
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
if (rpm >= 0 and r >= rpm) or (tpm >= 0 and t >= tpm) then return 0 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('INCRBY', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""


class RedisRateLimiter:
    """Limits shared by every replica on one Redis, falling back to local counts."""

    def __init__(self, client: aioredis.Redis, *, key_prefix: str, op_timeout_s: float) -> None:
        from gateway.state_redis import REDIS_DOWN

        self._down = REDIS_DOWN
        self._client = client
        self._p = key_prefix
        self._timeout = op_timeout_s
        self._admit = client.register_script(_ADMIT)
        self._fallback = LocalRateLimiter()
        self.failures = 0

    def _keys(self, key: ApiKey, window: int) -> list[str]:
        base = f"{self._p}:rl:{key.digest[:16]}:{window}"
        return [f"{base}:r", f"{base}:t"]

    async def admit(self, key: ApiKey, prompt_tokens: int) -> float | None:
        window, left = _window(time.time())
        args = [
            -1 if key.requests_per_minute is None else key.requests_per_minute,
            -1 if key.tokens_per_minute is None else key.tokens_per_minute,
            prompt_tokens,
            WINDOW_S + 5,
        ]
        try:
            admitted = await self._admit(keys=self._keys(key, window), args=args)
        except self._down as exc:
            self._failed(exc)
            return self._fallback.admit_now(key, prompt_tokens)
        return None if admitted else left

    async def charge(self, key: ApiKey, tokens: int) -> None:
        if tokens <= 0:
            return
        window = _window(time.time())[0]
        tokens_key = self._keys(key, window)[1]
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.incrby(tokens_key, tokens)
            pipe.expire(tokens_key, WINDOW_S + 5)
            await pipe.execute()
        except self._down as exc:
            self._failed(exc)
            await self._fallback.charge(key, tokens)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 1000 == 0:
            log.warning("rate limits: Redis unavailable (%s); enforcing per replica", exc)


async def load_redis_keys(client: aioredis.Redis, key_prefix: str) -> list[ApiKey]:
    """Keys provisioned in Redis: ``HSET {prefix}:apikeys <sha256 hex> <json>``."""
    out = []
    for d, raw in (await client.hgetall(f"{key_prefix}:apikeys")).items():
        spec = orjson.loads(raw)
        out.append(
            ApiKey(
                name=str(spec.get("name", "redis-key")),
                digest=d.decode() if isinstance(d, bytes) else str(d),
                requests_per_minute=spec.get("requests_per_minute"),
                tokens_per_minute=spec.get("tokens_per_minute"),
            )
        )
    return out


class Authenticator:
    """Checks bearer keys and per-key limits for the API layer.

    Disabled (no keys configured): every request passes, anonymously.
    """

    def __init__(
        self,
        keys: KeyRing,
        limiter: RateLimiter,
        *,
        enabled: bool,
        redis: aioredis.Redis | None = None,
        key_prefix: str = "pdgate",
        refresh_s: float = 5.0,
    ) -> None:
        self.keys = keys
        self.limiter = limiter
        self.enabled = enabled
        self._redis = redis
        self._prefix = key_prefix
        self._refresh_s = refresh_s
        self._pending: list[tuple[ApiKey, int]] = []
        self._flush_soon = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.enabled:
            self._tasks.append(loop.create_task(self._flush(), name="rate-limit-charges"))
        if self._redis is not None:
            self._tasks.append(loop.create_task(self._refresh(self._redis), name="api-keys"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The caller's key, None when auth is off; raises :class:`Unauthorized`."""
        if not self.enabled:
            return None
        key = self.keys.lookup(_bearer(authorization))
        if key is None:
            raise Unauthorized("Incorrect API key provided.")
        return key

    async def admit(self, key: ApiKey | None, prompt_tokens: int, max_tokens: int = 0) -> None:
        """Count a request against its key's limits; :class:`Overloaded` (429) when over them.

        A request that could never fit the key's ``tokens_per_minute`` (its prompt and the
        completion it asks for together exceed it) is refused outright with 400: waiting for
        the next window would not help, and a 429 invites a retry."""
        if key is None:
            return
        tpm = key.tokens_per_minute
        if tpm is not None and prompt_tokens + max_tokens > tpm:
            raise InvalidRequest(
                f"request too large for key '{key.name}': {prompt_tokens} prompt tokens and "
                f"max_tokens {max_tokens} exceed its limit of {tpm} tokens per minute",
                param="max_tokens",
                code="request_too_large_for_limit",
            )
        wait = await self.limiter.admit(key, prompt_tokens)
        if wait is not None:
            raise Overloaded(
                f"rate limit reached for key '{key.name}'", retry_after_s=wait, reason="rate_limit"
            )

    def charge_later(self, key: ApiKey, tokens: int) -> None:
        """Count completion tokens without waiting: flushed in the background."""
        if tokens > 0:
            self._pending.append((key, tokens))
            self._flush_soon.set()

    async def _flush(self) -> None:
        while True:
            await self._flush_soon.wait()
            self._flush_soon.clear()
            pending, self._pending = self._pending, []
            for key, tokens in pending:
                await self.limiter.charge(key, tokens)

    async def _refresh(self, redis: aioredis.Redis) -> None:
        from gateway.state_redis import REDIS_DOWN

        while True:
            try:
                for key in await load_redis_keys(redis, self._prefix):
                    self.keys.add(key)
            except REDIS_DOWN as exc:
                log.debug("api keys: Redis unavailable (%s); keeping the known keys", exc)
            await asyncio.sleep(self._refresh_s)


def _bearer(authorization: str | None) -> str:
    if not authorization:
        return ""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""
