"""Dead letters: the jobs Dramatiq gave up on (after their last retry, or at once for an error in the actor's
`throws`), listed and re-queued.

Dramatiq's Redis broker keeps each queue's dead letters in a sorted set
`{ns}:{queue}.XQ` (scored by the time it gave up, in ms) and their bodies in
the hash `{ns}:{queue}.XQ.msgs`; it purges them after seven days. The error of
the last attempt is not in the body (the Retries middleware stores the one
before it), so FailureRecorder keeps it beside, for as long.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

import redis
from dramatiq import Message
from dramatiq.broker import Broker
from dramatiq.brokers.redis import DEFAULT_DEAD_MESSAGE_TTL
from dramatiq.common import xq_name
from dramatiq.middleware import Middleware
from sqlalchemy.exc import SQLAlchemyError

from workers.names import OPERATOR_RETRY

log = logging.getLogger(__name__)

# Options a retried message must not carry over: a fresh set of retries, a new Redis id.
_RESET_OPTIONS = ("retries", "traceback", "redis_message_id", "eta")


def requeued(message: Message) -> Message:
    """The dead letter as `jobs retry` re-queues it: a fresh set of retries, on its own queue, marked as an
    operator's retry (OPERATOR_RETRY)."""
    options = {k: v for k, v in message.options.items() if k not in _RESET_OPTIONS}
    options[OPERATOR_RETRY] = True
    # A delayed message's queue is `name.DQ`; it goes back to its own queue.
    # dataclasses.replace, not Message.copy, which merges options (keeping "retries").
    return dataclasses.replace(message, queue_name=message.queue_name.removesuffix(".DQ"), options=options)


def error_key(namespace: str, redis_message_id: str) -> str:
    return f"{namespace}:dead-error:{redis_message_id}"


def safe_reason(error: BaseException) -> str:
    """What an operator may read: the class, and our own errors' `reason`, or the text of a plain
    Python error; never str() of a database or Redis error (it can hold SQL, rows or an address)."""
    reason = getattr(error, "reason", None)
    if isinstance(reason, str) and reason:
        text = f"{type(error).__name__}: {reason}"
    elif isinstance(error, (SQLAlchemyError, redis.RedisError, OSError)) or not str(error):
        text = type(error).__name__
    else:
        text = f"{type(error).__name__}: {error}"
    return text[:500]


class FailureRecorder(Middleware):
    """Keeps the error of a job's last attempt when Dramatiq dead-letters it, and logs it."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    def before_nack(self, broker: Broker, message: Any) -> None:
        error = getattr(message, "_exception", None)
        reason = safe_reason(error) if error is not None else "unknown"
        # After its last retry, or at once for an error in the actor's `throws` (a quarantined tenant).
        log.error("job %s(%s) given up: %s; it is a dead letter now (`sally-scim jobs failed`)",
                  message.actor_name, ", ".join(map(str, message.args)), reason)
        try:
            self.client.set(error_key(self.namespace, message.options["redis_message_id"]), reason,
                            px=DEFAULT_DEAD_MESSAGE_TTL)
        except (redis.RedisError, OSError, KeyError):
            pass  # the dead letter itself is what matters; its error is a courtesy


@dataclass(frozen=True)
class DeadLetter:
    id: str
    queue: str
    actor: str
    args: tuple[Any, ...]
    failed_at: datetime
    error: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "queue": self.queue, "actor": self.actor, "args": list(self.args),
                "failed_at": self.failed_at.isoformat(), "error": self.error}


class DeadLetters:
    """Read and re-queue the dead letters of our queues on one broker."""

    def __init__(self, broker: Any, client: redis.Redis, namespace: str, queues: Iterable[str]) -> None:
        self.broker = broker
        self.client = client
        self.namespace = namespace
        self.queues = tuple(queues)

    def _xq(self, queue: str) -> str:
        return f"{self.broker.namespace}:{xq_name(queue)}"

    def list(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        out: list[DeadLetter] = []
        for queue in self.queues:
            entries = self.client.zrange(self._xq(queue), 0, -1, withscores=True)
            if not entries:
                continue
            ids = [raw.decode() for raw, _ in entries]
            bodies = self.client.hmget(self._xq(queue) + ".msgs", ids)
            errors = self.client.mget([error_key(self.namespace, i) for i in ids])
            for message_id, (_, score), body, error in zip(ids, entries, bodies, errors, strict=True):
                if body is None:
                    continue
                message = Message.decode(body)
                out.append(DeadLetter(
                    id=message_id,
                    queue=queue,
                    actor=message.actor_name,
                    args=tuple(message.args),
                    failed_at=datetime.fromtimestamp(score / 1000, tz=timezone.utc),
                    error=error.decode() if error else "unknown",
                ))
        return sorted(out, key=lambda letter: letter.failed_at)

    def retry(self, ids: Iterable[str] | None = None) -> list[str]:
        """Re-queue the given dead letters (all when None) with a fresh set of retries; returns their ids."""
        wanted = None if ids is None else set(ids)
        done: list[str] = []
        for queue in self.queues:
            xq = self._xq(queue)
            for raw in self.client.zrange(xq, 0, -1):
                message_id = raw.decode()
                if wanted is not None and message_id not in wanted:
                    continue
                body = self.client.hget(xq + ".msgs", message_id)
                # ZREM first: of two operators retrying at once, one re-queues it.
                if body is None or not self.client.zrem(xq, message_id):
                    continue
                try:
                    self.broker.enqueue(requeued(Message.decode(body)))
                except Exception:
                    self.client.zadd(xq, {message_id: float(self.client.time()[0] * 1000)})
                    raise
                self.client.hdel(xq + ".msgs", message_id)
                self.client.delete(error_key(self.namespace, message_id))
                done.append(message_id)
        return done
