"""Coalesced wake-up calls: after a commit, one reconcile message per tenant at a time."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import redis
from dramatiq import Message
from dramatiq.broker import Broker

from workers.names import QUEUE_OF, RECONCILE_TENANT

log = logging.getLogger(__name__)

# A pending flag older than this is stale (its message was lost); the sweep
# would deliver the work anyway, this only bounds how long writes stay quiet.
PENDING_TTL_SECONDS = 30
# After a Redis failure, wake-ups are skipped (answered False at once) for this long:
# a stalled Redis then costs one request per process one timeout, not every request
# one each. The writes are committed; the sweep sends what was skipped.
QUIET_AFTER_FAILURE_SECONDS = 5.0


def pending_key(namespace: str, tenant_id: str) -> str:
    return f"{namespace}:reconcile-pending:{tenant_id}"


class Waker:
    """Enqueue reconcile_tenant by actor name, at most one pending per tenant."""

    def __init__(
        self, broker: Broker, client: redis.Redis, namespace: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.broker = broker
        self.client = client
        self.namespace = namespace
        self.clock = clock
        self._quiet_until = 0.0

    def available(self) -> bool:
        """False for a few seconds after a Redis failure: wake-ups are skipped meanwhile."""
        return self.clock() >= self._quiet_until

    def wake(self, tenant_id: str) -> bool:
        """Ask for a reconcile; never raises: the write is committed and the sweep is the fallback."""
        if not self.available():
            return False
        key = pending_key(self.namespace, tenant_id)
        try:
            if not self.client.set(key, "1", nx=True, ex=PENDING_TTL_SECONDS):
                return False
        except (redis.RedisError, OSError) as exc:
            self._failed(tenant_id, exc)
            return False
        return self.send_claimed(tenant_id)

    def send_claimed(self, tenant_id: str) -> bool:
        """Send the message whose pending flag the caller just set; never raises (the flag is released on failure)."""
        try:
            self.send(tenant_id)
            return True
        except (redis.RedisError, OSError) as exc:
            self._failed(tenant_id, exc)
            if not isinstance(exc, redis.TimeoutError):
                # Redis answers but the enqueue failed: free the flag so the next write
                # tries again. After a timeout Redis is stalled; the flag's TTL frees it.
                try:
                    self.client.delete(pending_key(self.namespace, tenant_id))
                except (redis.RedisError, OSError):
                    pass
            return False

    def _failed(self, tenant_id: str, exc: BaseException) -> None:
        self._quiet_until = self.clock() + QUIET_AFTER_FAILURE_SECONDS
        log.warning("could not enqueue reconcile for tenant %s (%s); the sweep will", tenant_id, type(exc).__name__)

    def send(self, tenant_id: str) -> None:
        """Enqueue a reconcile of the tenant, coalesced or not."""
        self.enqueue(RECONCILE_TENANT, tenant_id)

    def enqueue(self, actor_name: str, *args: Any) -> None:
        """Send a message to an actor by its name: no actor module is imported (the broker binds them)."""
        self.broker.enqueue(
            Message(queue_name=QUEUE_OF[actor_name], actor_name=actor_name, args=args, kwargs={}, options={})
        )
