"""Poison tenants: a tenant whose reconcile fails N times in a row waits out a growing backoff.

Without it, a tenant whose data makes reconcile fail is retried by Dramatiq, dead-lettered,
re-sent by the sweep every ~10 s and retried again, forever and unseen. Here the failures are
counted on the tenant row; past SALLY_QUARANTINE_AFTER the tenant is quarantined until a backoff
(doubling from SALLY_QUARANTINE_BACKOFF, capped at SALLY_QUARANTINE_MAX_BACKOFF) has passed,
the sweep leaves it alone meanwhile, and `GET …/sync` shows why. A success clears it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from models.db import database_unavailable, session_scope
from models.settings import Settings
from models.tables import Tenant, as_utc
from workers.deadletters import safe_reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuarantinePolicy:
    after: int = 5
    backoff: float = 60.0
    max_backoff: float = 3600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> QuarantinePolicy:
        return cls(settings.quarantine_after, settings.quarantine_backoff, settings.quarantine_max_backoff)

    def backoff_for(self, failures: int) -> timedelta | None:
        """None below the threshold; else backoff × 2^(failures − after), capped (exponent bounded)."""
        if failures < self.after:
            return None
        seconds = self.backoff * 2 ** min(failures - self.after, 32)
        return timedelta(seconds=min(seconds, self.max_backoff))


@dataclass(frozen=True)
class TenantHealth:
    failures: int
    quarantined_until: datetime | None

    def quarantined(self, now: datetime) -> bool:
        return self.quarantined_until is not None and as_utc(self.quarantined_until) > now


class TenantQuarantined(Exception):
    """A failure put the tenant in quarantine: the reconcile actor raises it and, being in the actor's
    ``throws``, Dramatiq gives the message up at once (a dead letter, with this reason); the sweep sends
    the tenant again once the quarantine is over."""

    def __init__(self, tenant_id: str, until: datetime, cause: str) -> None:
        self.reason = f"tenant {tenant_id} quarantined until {until.isoformat()} after: {cause}"
        super().__init__(self.reason)


def counts_as_poison(error: BaseException) -> bool:
    """An outage (database or Redis unreachable) is nobody's data: it does not count."""
    return not (database_unavailable(error) or isinstance(error, (redis.RedisError, OSError)))


def health(engine: Engine, tenant_id: str) -> TenantHealth:
    with engine.connect() as connection:
        row = connection.execute(
            select(Tenant.reconcile_failures, Tenant.quarantined_until).where(Tenant.id == tenant_id)
        ).first()
    return TenantHealth(row[0] or 0, row[1]) if row else TenantHealth(0, None)


def record_failure(
    engine: Engine, tenant_id: str, error: BaseException, policy: QuarantinePolicy, now: datetime
) -> datetime | None:
    """Count one more failure in a row; returns the end of the quarantine when it starts or grows."""
    reason = safe_reason(error)
    with session_scope(engine) as session:
        tenant = session.get(Tenant, tenant_id)
        if tenant is None:
            return None
        tenant.reconcile_failures = (tenant.reconcile_failures or 0) + 1
        tenant.last_error = reason[:1024]
        wait = policy.backoff_for(tenant.reconcile_failures)
        tenant.quarantined_until = now + wait if wait is not None else None
        session.add(tenant)
        failures, until = tenant.reconcile_failures, tenant.quarantined_until
    if until is not None:
        log.error("tenant %s quarantined until %s after %d failed reconciles in a row: %s",
                  tenant_id, until.isoformat(), failures, reason)
    else:
        log.warning("reconcile of tenant %s failed (%d in a row): %s", tenant_id, failures, reason)
    return until


def clear(engine: Engine, tenant_id: str) -> None:
    """A reconcile succeeded: the tenant is healthy again."""
    with session_scope(engine) as session:
        session.execute(
            update(Tenant).where(Tenant.id == tenant_id)
            .values(reconcile_failures=0, quarantined_until=None, last_error=None)
        )
    log.info("tenant %s reconciles again; quarantine cleared", tenant_id)
