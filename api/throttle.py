"""Failed attempts per client address per minute, counted in Redis so every web process shares the count.

One home for the rule both doors use: SCIM's failed authentications
(SCIM_AUTH_FAILURE_LIMIT) and the admin page's failed sign-ins
(WEB_SIGNIN_FAILURE_LIMIT). The window is the wall-clock minute; past the
limit an address is told to wait until the minute ends (Retry-After). A Redis
that fails makes the count fail open: an outage must not lock anyone out.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Protocol

import redis.asyncio as aredis

WINDOW_SECONDS = 60
MAX_REMEMBERED = 10_000
REDIS_ERRORS = (aredis.RedisError, OSError, asyncio.TimeoutError)


class LoopRedis(Protocol):
    """The event loop's Redis client, quiet for a while after a failure (api.scim.ratelimit.RedisPerLoop)."""

    def get(self) -> aredis.Redis: ...

    def available(self) -> bool: ...

    def failed(self) -> None: ...


class FailureWindow:
    """Counts one kind of failed attempt per address and minute; ``limit`` 0 (or no Redis) turns it off."""

    def __init__(
        self, redis: LoopRedis | None, namespace: str, kind: str, limit: int,
        *, wall: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.prefix = f"{namespace}:{kind}"
        self.limit = limit
        self.wall = wall
        # address → the window it is over the limit in: answered without Redis until the window ends
        self._blocked: dict[str, int] = {}

    @property
    def on(self) -> bool:
        return self.redis is not None and self.limit > 0

    def _now(self) -> tuple[int, int]:
        """The current window and the seconds left in it."""
        now = int(self.wall())
        return now // WINDOW_SECONDS, WINDOW_SECONDS - now % WINDOW_SECONDS

    async def blocked(self, address: str | None) -> int | None:
        """Seconds to wait when this address is over the limit in this window (its next attempt is refused)."""
        if not self.on or not self.redis.available():  # type: ignore[union-attr]
            return None
        window, retry_after = self._now()
        address = address or "-"
        if self._blocked.get(address) == window:
            return retry_after
        try:
            count = await self.redis.get().get(self._key(address, window))  # type: ignore[union-attr]
        except REDIS_ERRORS:
            self.redis.failed()  # type: ignore[union-attr]
            return None
        if count is None or int(count) < self.limit:
            return None
        self._remember(address, window)
        return retry_after

    async def failed(self, address: str | None) -> int | None:
        """Count one failure of this address; returns the seconds to wait once it is past the limit."""
        if not self.on or not self.redis.available():  # type: ignore[union-attr]
            return None
        window, retry_after = self._now()
        address = address or "-"
        if self._blocked.get(address) == window:
            return retry_after
        key = self._key(address, window)
        try:
            async with self.redis.get().pipeline(transaction=False) as pipe:  # type: ignore[union-attr]
                pipe.incr(key)
                pipe.expire(key, WINDOW_SECONDS * 2)
                count, _ = await pipe.execute()
        except REDIS_ERRORS:
            self.redis.failed()  # type: ignore[union-attr]
            return None
        if int(count) <= self.limit:
            return None
        self._remember(address, window)
        return retry_after

    def _key(self, address: str, window: int) -> str:
        return f"{self.prefix}:{address}:{window}"

    def _remember(self, address: str, window: int) -> None:
        if len(self._blocked) >= MAX_REMEMBERED:
            self._blocked.clear()
        self._blocked[address] = window
