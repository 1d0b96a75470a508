"""API keys, bearer parsing and fixed-window rate limits (local counters)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

import pytest
import redis.asyncio as aioredis

from gateway.auth import (
    WINDOW_S,
    ApiKey,
    Authenticator,
    KeyRing,
    LocalRateLimiter,
    RedisRateLimiter,
    digest,
    resolve_secret,
)
from gateway.errors import Overloaded, Unauthorized


def key(name: str = "team", rpm: int | None = None, tpm: int | None = None) -> ApiKey:
    return ApiKey(name, digest(f"sk-{name}-secret"), rpm, tpm)


def auth(*keys: ApiKey) -> Authenticator:
    return Authenticator(KeyRing(list(keys)), LocalRateLimiter(), enabled=True)


def test_keyring_matches_only_the_right_secret() -> None:
    ring = KeyRing([key("a"), key("b")])
    found = ring.lookup("sk-b-secret")
    assert found is not None
    assert found.name == "b"
    assert ring.lookup("sk-b-secreT") is None
    assert ring.lookup("") is None


def test_only_digests_are_kept() -> None:
    k = key("a")
    assert "sk-a-secret" not in repr(k)
    assert k.digest == digest("sk-a-secret")
    assert len(k.digest) == 64


def test_authenticate_parses_bearer_tokens() -> None:
    a = auth(key("a"))
    found = a.authenticate("Bearer sk-a-secret")
    assert found is not None
    assert found.name == "a"
    assert a.authenticate("bearer   sk-a-secret") == found
    for header in (None, "", "Basic sk-a-secret", "Bearer", "Bearer sk-wrong"):
        with pytest.raises(Unauthorized) as info:
            a.authenticate(header)
        assert info.value.status == 401
        assert info.value.code == "invalid_api_key"
        assert "sk-a-secret" not in info.value.message


def test_disabled_auth_lets_everyone_in_anonymously() -> None:
    a = Authenticator(KeyRing([]), LocalRateLimiter(), enabled=False)
    assert a.authenticate(None) is None


async def test_request_limit_per_window() -> None:
    a = auth(limited := key("a", rpm=3))
    for _ in range(3):
        await a.admit(limited, 10)
    with pytest.raises(Overloaded) as info:
        await a.admit(limited, 10)
    assert info.value.status == 429
    assert info.value.reason == "rate_limit"
    assert 0 < info.value.retry_after_s <= WINDOW_S
    assert int(info.value.headers()["Retry-After"]) >= 1
    await a.admit(key("b", rpm=3), 10)  # other keys have their own counters


async def test_token_limit_counts_prompt_and_completion_tokens() -> None:
    limiter = LocalRateLimiter()
    k = key("a", tpm=1000)
    assert await limiter.admit(k, 600) is None
    await limiter.charge(k, 300)  # completion tokens after the fact: 900 used
    assert await limiter.admit(k, 50) is None  # 900 used: under the limit, now 950
    assert await limiter.admit(k, 50) is None  # 950 used: still under it, now 1000
    assert await limiter.admit(k, 1) is not None  # 1000 used: the limit is reached


def test_window_rolls_over(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000.0 * WINDOW_S + 59.0]
    monkeypatch.setattr("gateway.auth.time.time", lambda: now[0])
    limiter = LocalRateLimiter()
    k = key("a", rpm=1)
    assert limiter.admit_now(k, 1) is None
    wait = limiter.admit_now(k, 1)
    assert wait == pytest.approx(1.0)
    now[0] += 1.5  # the next window
    assert limiter.admit_now(k, 1) is None


def test_secrets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDGATE_TEST_KEY", "sk-from-env")
    assert resolve_secret(None, "PDGATE_TEST_KEY", "k") == "sk-from-env"
    assert resolve_secret("inline", None, "k") == "inline"
    monkeypatch.delenv("PDGATE_TEST_KEY")
    with pytest.raises(ValueError, match="PDGATE_TEST_KEY"):
        resolve_secret(None, "PDGATE_TEST_KEY", "k")


class _ClosingRedis:
    """A Redis client caught as the server goes away: under uvloop, redis-py's write to the
    connection the server just closed raises RuntimeError instead of a Redis error."""

    def register_script(self, script: str) -> Callable[..., Awaitable[int]]:
        async def run(**kw: object) -> int:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

        return run


async def test_a_redis_connection_closing_under_a_request_falls_back_to_local_limits() -> None:
    limiter = RedisRateLimiter(
        cast(aioredis.Redis, _ClosingRedis()), key_prefix="pdgate", op_timeout_s=0.1
    )
    limited = key("limited", rpm=1)
    assert await limiter.admit(limited, 10) is None  # served from the local window
    assert limiter.failures == 1
    assert await limiter.admit(limited, 10) is not None  # and the local window still limits
