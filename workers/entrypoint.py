"""What `sally-scim worker` hands to Dramatiq: settings → broker → runtime → actors."""

from __future__ import annotations

import dramatiq
from dramatiq.middleware import CurrentMessage

from models.redaction import install_secret_masking
from models.settings import Settings
from workers import runtime
from workers.broker import resolve_redis_url, setup_worker_broker
from workers.deadletters import FailureRecorder
from workers.purchase_pool import PurchaseWorkerMiddleware
from workers.sweep import SweepMiddleware


def setup(settings: Settings) -> dramatiq.Broker:
    """Set the broker from Settings, import the actors, install the runtime and the sweep."""
    broker = setup_worker_broker(settings)
    broker.add_middleware(CurrentMessage())
    broker.add_middleware(SweepMiddleware(settings.sweep_interval))
    broker.add_middleware(PurchaseWorkerMiddleware(settings.purchase_threads))
    runtime.install(runtime.build(settings, broker, resolve_redis_url(settings)))
    broker.add_middleware(FailureRecorder(runtime.current().redis, settings.redis_namespace))
    return broker


_settings = Settings.from_env()
install_secret_masking(_settings.secrets())
broker = setup(_settings)
