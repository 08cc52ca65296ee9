"""Worker counters kept in Redis, so that /metrics of any web process sees every worker."""

from __future__ import annotations

import logging
from typing import Iterable

import redis
from dramatiq.common import dq_name, xq_name

log = logging.getLogger(__name__)


# Stripe refused our API key (401/403): an operator alert, kept for a day unless cleared.
STRIPE_ALERT_SECONDS = 24 * 3600


def stripe_alert_key(namespace: str) -> str:
    return f"{namespace}:alert:stripe-auth"


class Telemetry:
    """Jobs by actor and outcome, Stripe calls by outcome; best effort, never fails a job."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.jobs_key = f"{namespace}:metrics:jobs"
        self.stripe_key = f"{namespace}:metrics:stripe"
        self.alert_key = stripe_alert_key(namespace)

    def job(self, actor: str, outcome: str, count: int = 1) -> None:
        self._incr(self.jobs_key, f"{actor}|{outcome}", count)

    def stripe(self, outcome: str) -> None:
        self._incr(self.stripe_key, outcome)

    def stripe_auth_failed(self, reason: str) -> None:
        """Count it (sally_stripe_calls{outcome="auth_error"}) and raise the alert /readyz shows."""
        self._incr(self.stripe_key, "auth_error")
        try:
            self.client.set(self.alert_key, reason[:500], ex=STRIPE_ALERT_SECONDS)
        except (redis.RedisError, OSError):
            log.debug("Stripe alert not recorded: Redis unavailable")

    def stripe_ok(self) -> None:
        """A Stripe call with our key worked: the auth alert is over."""
        try:
            self.client.delete(self.alert_key)
        except (redis.RedisError, OSError):
            log.debug("Stripe alert not cleared: Redis unavailable")

    def _incr(self, key: str, field: str, count: int = 1) -> None:
        try:
            self.client.hincrby(key, field, count)
        except (redis.RedisError, OSError):
            log.debug("metrics not recorded: Redis unavailable")

    def jobs(self) -> dict[tuple[str, str], int]:
        raw = self.client.hgetall(self.jobs_key)
        out = {}
        for field, value in raw.items():
            actor, _, outcome = field.decode().partition("|")
            out[(actor, outcome)] = int(value)
        return out

    def stripe_calls(self) -> dict[str, int]:
        return {field.decode(): int(value) for field, value in self.client.hgetall(self.stripe_key).items()}


def queue_counts(client: redis.Redis, broker_namespace: str, queues: Iterable[str]) -> dict[str, dict[str, int]]:
    """Per queue: messages waiting, delayed (retry backoff, `.DQ`) and dead (`.XQ`), in one round trip."""
    queues = tuple(queues)
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(f"{broker_namespace}:{queue}")
        pipe.llen(f"{broker_namespace}:{dq_name(queue)}")
        pipe.zcard(f"{broker_namespace}:{xq_name(queue)}")
    values = pipe.execute()
    return {
        kind: {queue: int(values[3 * i + k]) for i, queue in enumerate(queues)}
        for k, kind in enumerate(("waiting", "delayed", "dead"))
    }
