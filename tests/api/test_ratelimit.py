"""The gate in front of every SCIM request (api/scim/ratelimit.py): token cache, per-token rate."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

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


def test_set_flag_sets_a_key_once_with_its_ttl_and_again_once_it_is_gone(base_settings, redis_client):
    """Given 20 concurrent set_flag calls for one key (the wake-ups of one tenant, RedisPerLoop.set_flag)
    Then exactly one sets it, with the TTL asked for; while it is set every call answers False;
    once it is deleted (the worker took the reconcile) the next call sets it again."""
    key = f"{base_settings.redis_namespace}:flag:{uuid.uuid4().hex[:6]}"
    flags = RedisPerLoop(base_settings.redis_url)

    async def run() -> tuple[list[bool], bool, bool]:
        try:
            first = await asyncio.gather(*(flags.set_flag(key, 30) for _ in range(20)))
            again = await flags.set_flag(key, 30)
            redis_client.delete(key)
            after = await flags.set_flag(key, 30)
            return first, again, after
        finally:
            await flags.close()

    first, again, after = asyncio.run(run())

    assert sorted(first) == [False] * 19 + [True]
    assert again is False and after is True
    assert 0 < redis_client.ttl(key) <= 30
    redis_client.delete(key)


class DroppingProxy:
    """A TCP proxy to Redis that can cut every connection through it (Redis restarts, a network blip)."""

    def __init__(self, target: dict[str, Any]) -> None:
        self.target = target  # the Redis client's connection kwargs: host and port, or a Unix socket's path
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.target.get("path"):
            up_reader, up_writer = await asyncio.open_unix_connection(self.target["path"])
        else:
            up_reader, up_writer = await asyncio.open_connection(self.target["host"], self.target["port"])
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers = []

    async def close(self) -> None:
        self.cut()
        assert self.server is not None
        self.server.close()


def test_set_flag_after_its_connection_was_cut_fails_once_then_connects_again(base_settings, redis_client):
    """Given set_flag's connection cut under it (Redis restarted)
    Then the next call fails with a Redis error (the caller's wake-up falls back to the sweep)
    and the one after connects again and sets the flag."""
    from api.throttle import REDIS_ERRORS

    # The suite's Redis (REDIS_URL's server, or the embedded one on its Unix socket) behind the proxy.
    target = redis_client.connection_pool.connection_kwargs
    key = f"{base_settings.redis_namespace}:flag:{uuid.uuid4().hex[:6]}"

    async def run() -> tuple[bool, BaseException | None, bool]:
        proxy = DroppingProxy(target)
        port = await proxy.start()
        password = f":{target['password']}@" if target.get("password") else ""
        flags = RedisPerLoop(f"redis://{password}127.0.0.1:{port}/{target.get('db', 0)}", socket_timeout=2)
        try:
            before = await flags.set_flag(key, 30)
            proxy.cut()
            redis_client.delete(key)
            await asyncio.sleep(0.05)
            failure = None
            try:
                await flags.set_flag(key, 30)
            except REDIS_ERRORS as exc:
                failure = exc
            return before, failure, await flags.set_flag(key, 30)
        finally:
            await flags.close()
            await proxy.close()

    before, failure, after = asyncio.run(run())

    assert before is True
    assert failure is not None
    assert after is True and redis_client.exists(key)
    redis_client.delete(key)
