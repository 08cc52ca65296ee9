"""Broker set-up: the one place that binds Dramatiq to Redis, before any actor module loads."""

from __future__ import annotations

import importlib
import logging

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from redis.backoff import NoBackoff
from redis.retry import Retry

from models.settings import Settings
from workers.embedded_redis import EmbeddedRedis
from workers.names import QUEUES

log = logging.getLogger(__name__)

_embedded: dict[str, EmbeddedRedis] = {}


def resolve_redis_url(settings: Settings) -> str:
    """REDIS_URL, or the embedded Redis of SALLY_VAR_DIR (started or attached to)."""
    if settings.redis_url:
        return settings.redis_url
    key = str(settings.var_dir.resolve())
    server = _embedded.get(key)
    if server is None:
        server = _embedded[key] = EmbeddedRedis(settings.var_dir)
    return server.attach()


def release_embedded_redis() -> None:
    """Detach from every embedded Redis this process attached to."""
    for server in _embedded.values():
        server.detach()
    _embedded.clear()


class StalledRedisError(redis.ConnectionError, redis.TimeoutError):
    """A Redis command that timed out, told to Dramatiq as a lost connection."""


class BrokerRedis(redis.Redis):
    """The broker's client. Dramatiq handles a lost connection (an ack is tried again until Redis
    answers, a consumer reconnects) but not a timeout: a timed-out ack would leave its message in
    the worker's ack set until the worker restarts, and then run it a second time."""

    def execute_command(self, *args, **options):
        try:
            return super().execute_command(*args, **options)
        except redis.TimeoutError as error:
            if isinstance(error, redis.ConnectionError):
                raise
            raise StalledRedisError(*error.args) from error


def redis_client(url: str, settings: Settings, client_class: type[redis.Redis] = redis.Redis) -> redis.Redis:
    """A Redis client that gives up quickly: Settings' connect and read timeouts, one retry at most.

    redis-py retries a failed command three times with backoff by default, so one
    stalled Redis would cost a request four timeouts. Here a dropped connection (a
    restarted Redis) is retried once at once, and a timeout not at all: the caller
    falls back (the write is committed, the sweep re-sends).
    """
    return client_class.from_url(
        url,
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        health_check_interval=30,
    )


def make_broker(settings: Settings, url: str, middleware: list | None = None) -> RedisBroker:
    """A Redis broker in our namespace, with our queues declared."""
    broker = RedisBroker(
        # Our client, with timeouts: Dramatiq's own (from the URL) would wait forever on a stalled Redis.
        client=redis_client(url, settings, BrokerRedis),
        namespace=f"{settings.redis_namespace}-dramatiq",
        middleware=middleware,
        # A worker that dies without acking loses its messages for this long
        # before another worker takes them over (DESIGN: a killed job is redelivered).
        heartbeat_timeout=30_000,
    )
    for queue in QUEUES:
        broker.declare_queue(queue)
    return broker


def setup_worker_broker(settings: Settings) -> RedisBroker:
    """Set the global broker from Settings, then import the actors so they bind to it."""
    url = resolve_redis_url(settings)
    broker = make_broker(settings, url)
    dramatiq.set_broker(broker)
    importlib.import_module("workers.actors")
    return broker
