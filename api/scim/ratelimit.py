"""An optional per-tenant request rate for the SCIM API: 429 with Retry-After past it (RFC 6585 §4)."""

from __future__ import annotations

import hashlib
import logging
import time

import redis.asyncio as aredis
from starlette.types import ASGIApp, Receive, Scope, Send

from api.scim.errors import TooManyRequestsError
from api.scim.http import error_response

log = logging.getLogger(__name__)
PREFIX = "/scim/v2/"
# After a Redis failure the limit is not checked for this long (fail open), so a
# stalled Redis does not cost every request a timeout.
SKIP_AFTER_FAILURE_SECONDS = 5.0


class RateLimitMiddleware:
    """A fixed one-second window per bearer token, counted in Redis so every web process shares it.

    Keyed by the token's digest, not the tenant id in the URL: a stranger who
    knows a Tenant URL cannot use up the real IdP's allowance.
    """

    def __init__(
        self, app: ASGIApp, *, limit: int, redis_url: str, namespace: str,
        connect_timeout: float = 1.0, socket_timeout: float = 2.0,
    ) -> None:
        self.app = app
        self.limit = limit
        # No retries: a stalled Redis costs a request one timeout, then the limit is
        # skipped for a few seconds (below), never a hang.
        self.client = aredis.Redis.from_url(
            redis_url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout, retry=None,
        )
        self.namespace = namespace
        self._skip_until = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        token = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = value
                break
        if time.monotonic() < self._skip_until:
            await self.app(scope, receive, send)
            return
        window = int(time.time())
        key = f"{self.namespace}:rate:{hashlib.sha256(token).hexdigest()[:32]}:{window}"
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, 2)
                count, _ = await pipe.execute()
        except (aredis.RedisError, OSError):
            # A Redis outage must not take the SCIM API down with it.
            self._skip_until = time.monotonic() + SKIP_AFTER_FAILURE_SECONDS
            await self.app(scope, receive, send)
            return
        if count > self.limit:
            response = error_response(
                TooManyRequestsError(f"More than {self.limit} requests per second; retry shortly.", retry_after=1)
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
