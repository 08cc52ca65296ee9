"""Broker set-up: the one place that binds Dramatiq to Redis, before any actor module loads."""

from __future__ import annotations

import importlib
import logging

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

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


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)


def make_broker(settings: Settings, url: str, middleware: list | None = None) -> RedisBroker:
    """A Redis broker in our namespace, with our queues declared."""
    broker = RedisBroker(
        url=url,
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
