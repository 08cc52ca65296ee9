"""Who may make a SCIM request, decided before its body is read: token, failed-auth throttle, rate (RFC 6585 §4).

A stranger's junk costs a header parse and (once its address has failed too
often) nothing more; the IdP's own requests cost no Redis or database round
trip here in the common case: its token is remembered for a moment (the write
itself checks the token again, in the same statement or transaction, so a
revoked token stops working at once), and its rate is counted locally and
added to the shared Redis count in slices.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import redis.asyncio as aredis

from api.scim.errors import TooManyRequestsError, UnauthorizedError
from api.throttle import REDIS_ERRORS, FailureWindow
from api.tokens import bearer, token_digest

log = logging.getLogger(__name__)

TOKEN_CACHE_SECONDS = 2.0
MAX_REMEMBERED = 10_000
# After a Redis failure, Redis is left alone for this long (the limit and the
# failed-auth count fail open, wake-ups fall to the sweep): a stalled Redis then
# costs one request per process one timeout, not every request one each.
QUIET_AFTER_FAILURE_SECONDS = 5.0

# digest → (tenant id, scim_enabled), or None for an unknown token
TokenLookup = Callable[[str], Awaitable[tuple[str, bool] | None]]


@dataclass
class _Rate:
    window: int
    shared: int = 0  # the count in Redis after our last addition (every process's requests)
    unsent: int = 0  # ours since then


class RedisPerLoop:
    """An asyncio Redis client per event loop (a client's connections belong to the loop that made them).

    Bounded like every Redis client (REDIS_CONNECT_TIMEOUT / REDIS_SOCKET_TIMEOUT, no
    retry: redis-py's default of three with backoff would make one stalled Redis cost a
    request four timeouts), and quiet for a few seconds after a failure.
    """

    def __init__(
        self, url: str, *, connect_timeout: float = 1.0, socket_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.socket_timeout = socket_timeout
        self.clock = clock
        self._client: aredis.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._quiet_until = 0.0
        # set_flag's own connection and lock, of the same loop as the client.
        self._flag_connection: Any = None
        self._flag_lock: asyncio.Lock | None = None

    def get(self) -> aredis.Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = aredis.Redis.from_url(
                self.url, socket_timeout=self.socket_timeout, socket_connect_timeout=self.connect_timeout, retry=None,
            )
            self._loop = loop
            self._flag_connection, self._flag_lock = None, None
        return self._client

    async def set_flag(self, key: str, ttl_seconds: int) -> bool:
        """`SET key 1 NX EX ttl`: True when this call set the key, False when it was already set.

        On a connection of its own, one command at a time, without the client's
        per-command machinery (pool checkout and release, retry wrapper,
        telemetry): ~20 µs of CPU instead of ~70 µs, once per batch of SCIM writes.
        The client's URL, credentials and timeouts apply; a failed connection is
        dropped and the next call connects again.
        """
        client = self.get()
        if self._flag_connection is None or self._flag_lock is None:
            self._flag_connection = client.connection_pool.make_connection()
            self._flag_lock = asyncio.Lock()
        connection = self._flag_connection
        async with self._flag_lock:
            try:
                await connection.send_packed_command(
                    connection.pack_command("SET", key, "1", "NX", "EX", ttl_seconds), check_health=False)
                return await connection.read_response() is not None
            except BaseException:
                # Half a command may be on the wire, or a reply unread: never reuse it.
                await connection.disconnect()
                raise

    async def close(self) -> None:
        """Close the client of the running loop (the app's shutdown), so no socket outlives its loop."""
        client, self._client = self._client, None
        connection, self._flag_connection = self._flag_connection, None
        if client is not None and self._loop is asyncio.get_running_loop():
            if connection is not None:
                await connection.disconnect()
            await client.aclose()

    def available(self) -> bool:
        """False for a few seconds after a failure: callers skip Redis (and fail open) meanwhile."""
        return self.clock() >= self._quiet_until

    def failed(self) -> None:
        """Note a Redis failure (timeout, refused, reset)."""
        self._quiet_until = self.clock() + QUIET_AFTER_FAILURE_SECONDS


class Gate:
    """Admits a SCIM request on its headers alone; raises the SCIM 401 or 429 otherwise."""

    def __init__(
        self,
        lookup: TokenLookup,
        redis: RedisPerLoop | None,
        namespace: str,
        *,
        rate_limit: int,
        auth_failure_limit: int,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.lookup = lookup
        self.redis = redis
        self.namespace = namespace
        self.rate_limit = rate_limit
        self.auth_failure_limit = auth_failure_limit
        # Add to the shared count every 5 % of the limit: with P web processes the
        # limit may be overshot by at most 5 % × P within a second, and a token at
        # 200 requests/s costs 20 Redis round trips a second instead of 200.
        self.send_every = max(1, rate_limit // 20)
        self.clock = clock
        self.wall = wall
        self._known: dict[str, tuple[str, float]] = {}
        self._rates: dict[str, _Rate] = {}
        self.auth_failures = FailureWindow(redis, namespace, "authfail", auth_failure_limit, wall=wall)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()

    async def admit(self, tenant_id: str, authorization: str | None, client: str | None) -> str:
        """The digest of the request's token once the token opens this tenant and is within its rate."""
        token = bearer(authorization)
        digest = token_digest(token) if token is not None else None
        known = self._known.get(digest) if digest is not None else None
        # Tenant ids are not secret (they are in the URL): a plain comparison.
        if known is None or known[1] < self.clock() or known[0] != tenant_id:
            await self._check_token(tenant_id, digest, client)
        if self.rate_limit > 0:
            assert digest is not None
            await self._count(digest)
        return digest  # type: ignore[return-value]

    async def _check_token(self, tenant_id: str, digest: str | None, client: str | None) -> None:
        found = await self.lookup(digest) if digest is not None else None
        # Another tenant's valid token is as wrong as no token.
        if found is None or found[0] != tenant_id or not found[1]:
            await self._failed(client)
            raise UnauthorizedError()
        if len(self._known) >= MAX_REMEMBERED:
            self._known.clear()
        self._known[digest] = (tenant_id, self.clock() + TOKEN_CACHE_SECONDS)  # type: ignore[index]

    def forget(self, digest: str) -> None:
        """The write found the token refused: do not let the cache admit it again."""
        self._known.pop(digest, None)

    # ------------------------------------------------------- failed auth

    async def _failed(self, client: str | None) -> None:
        """Count a failed authentication of this address; past the limit, 429 instead of 401.

        Counted only on failure, so a valid token is never throttled for what
        others sent from the same address (a NAT, a proxy); once an address is
        over the limit this process answers it without Redis until the window ends.
        """
        retry_after = await self.auth_failures.failed(client)
        if retry_after is not None:
            raise TooManyRequestsError(
                f"Too many failed authentications from this address; retry in {retry_after} s.",
                retry_after=retry_after,
            )

    # -------------------------------------------------------------- rate

    async def _count(self, digest: str) -> None:
        window = int(self.wall())
        rate = self._rates.get(digest)
        if rate is None or rate.window != window:
            if len(self._rates) >= MAX_REMEMBERED:
                self._rates.clear()
            rate = self._rates[digest] = _Rate(window)
        if rate.shared + rate.unsent >= self.rate_limit:
            raise TooManyRequestsError(f"More than {self.rate_limit} requests per second; retry shortly.", retry_after=1)
        rate.unsent += 1
        if rate.unsent < self.send_every or self.redis is None or not self.redis.available():
            return
        # Keyed by the token's digest, not the tenant id in the URL: a stranger
        # who knows a Tenant URL cannot use up the real IdP's allowance.
        key = f"{self.namespace}:rate:{digest[:32]}:{window}"
        sending, rate.unsent = rate.unsent, 0
        try:
            async with self.redis.get().pipeline(transaction=False) as pipe:
                pipe.incrby(key, sending)
                pipe.expire(key, 2)
                shared, _ = await pipe.execute()
        except REDIS_ERRORS:
            self.redis.failed()
            return
        rate.shared = max(rate.shared, int(shared))
