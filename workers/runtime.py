"""What the actors of one worker process work with, built once from Settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy.engine import Engine

from billing.gateway import Gateway, LedgerGateway
from billing.stripe_gateway import StripeGateway
from models.db import engine_from_settings
from models.settings import Settings
from workers.broker import redis_client
from workers.mail.transport import make_mailer
from workers.telemetry import Telemetry
from workers.wakeup import Waker


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    redis: redis.Redis
    waker: Waker
    gateway: Gateway
    mailer: Any
    telemetry: Telemetry


_current: Runtime | None = None


def make_gateway(settings: Settings) -> Gateway:
    """The Stripe gateway, or the ledger-only one when there is no STRIPE_API_KEY."""
    if not settings.stripe_api_key:
        return LedgerGateway()
    return StripeGateway(
        settings.stripe_api_key, settings.stripe_prices, api_base=settings.stripe_api_base,
        timeout=settings.stripe_timeout,
    )


def install(runtime: Runtime) -> None:
    global _current
    _current = runtime


def current() -> Runtime:
    if _current is None:
        raise RuntimeError("the worker runtime is not set up; call workers.entrypoint.setup() first")
    return _current


def build(settings: Settings, broker: Any, redis_url: str) -> Runtime:
    client = redis_client(redis_url, settings)
    return Runtime(
        settings=settings,
        engine=engine_from_settings(settings, pool_size=max(4, settings.worker_threads + 2)),
        redis=client,
        waker=Waker(broker, client, settings.redis_namespace),
        gateway=make_gateway(settings),
        mailer=make_mailer(settings),
        telemetry=Telemetry(client, settings.redis_namespace),
    )
