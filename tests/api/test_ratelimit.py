"""The gate in front of every SCIM request (api/scim/ratelimit.py): token cache, per-token rate."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from api.scim.errors import TooManyRequestsError, UnauthorizedError
from api.scim.ratelimit import Gate, RedisPerLoop
from api.tokens import token_digest


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _gate(redis_url: str | None, namespace: str, clock: Clock, lookups: list[str], limit: int = 200) -> Gate:
    async def lookup(digest: str) -> tuple[str, bool] | None:
        lookups.append(digest)
        return ("t1", True) if digest == token_digest("good") else None

    return Gate(lookup, RedisPerLoop(redis_url) if redis_url else None, namespace,
                rate_limit=limit, auth_failure_limit=0, clock=clock, wall=clock)


def test_two_hundred_requests_a_second_pass_and_then_429(base_settings):
    """Given the default limit (200/s per token) shared in Redis by two web processes,
    when they admit 200 requests of one token within one second, then the process that last added to
    the shared count refuses the next with a 429, the other one after at most 5 % of the limit more
    (it adds its count in slices of 10); in the next second the token is admitted again."""
    clock, lookups = Clock(), []
    namespace = f"{base_settings.redis_namespace}rl{uuid.uuid4().hex[:6]}"
    first = _gate(base_settings.redis_url, namespace, clock, lookups)
    second = _gate(base_settings.redis_url, namespace, clock, lookups)

    async def run() -> int:
        for i in range(200):
            await (first if i % 2 else second).admit("t1", "Bearer good", "127.0.0.1")
        with pytest.raises(TooManyRequestsError) as refused:
            await first.admit("t1", "Bearer good", "127.0.0.1")
        assert refused.value.headers == {"Retry-After": "1"}
        extra = 0
        with pytest.raises(TooManyRequestsError):
            for _ in range(11):
                await second.admit("t1", "Bearer good", "127.0.0.1")
                extra += 1
        clock.now += 1
        await first.admit("t1", "Bearer good", "127.0.0.1")
        return extra

    assert asyncio.run(run()) <= 10


def test_a_known_token_is_looked_up_once_per_moment_and_a_wrong_one_every_time():
    """Given a gate without Redis, when the same good token comes 50 times within a second,
    then the database is asked once; a wrong token is asked about each time and refused with 401,
    and another tenant's URL with the good token is refused too."""
    clock, lookups = Clock(), []
    gate = _gate(None, "x", clock, lookups, limit=0)

    async def run() -> None:
        for _ in range(50):
            await gate.admit("t1", "Bearer good", None)
        assert len(lookups) == 1
        for _ in range(3):
            with pytest.raises(UnauthorizedError):
                await gate.admit("t1", "Bearer bad", None)
        with pytest.raises(UnauthorizedError):
            await gate.admit("t2", "Bearer good", None)
        with pytest.raises(UnauthorizedError):
            await gate.admit("t1", None, None)
        clock.now += 3
        await gate.admit("t1", "Bearer good", None)

    asyncio.run(run())
    assert len(lookups) == 1 + 3 + 1 + 1


def test_a_cached_token_on_a_non_ascii_tenant_url_is_a_401():
    """Given a good token the gate remembers, when it comes on a Tenant URL with non-ASCII characters,
    then the answer is a 401 (not a crash comparing the ids)."""
    clock, lookups = Clock(), []
    gate = _gate(None, "x", clock, lookups, limit=0)

    async def run() -> None:
        await gate.admit("t1", "Bearer good", None)
        with pytest.raises(UnauthorizedError):
            await gate.admit("tü", "Bearer good", None)

    asyncio.run(run())
