"""The sweep: every ~10 s, one worker at a time re-sends what a lost message left behind."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from dramatiq.middleware import Middleware
from sqlalchemy import func, or_, select, update
from sqlmodel import Session

from models.db import chunks, session_scope
from models.directory import events as directory_events
from models.tables import Purchase, Tenant, as_utc, utcnow
from workers import invitations, runtime
from workers.names import PURCHASE_SEATS, SEND_INVITATION, SYNC_SEATS
from workers.purchase_pool import is_purchase_worker

log = logging.getLogger(__name__)

# A purchase job is idempotent (its body and key are frozen), so a duplicate
# message costs one lock and a Stripe replay at most; a lost one costs this long.
RESEND_AFTER = timedelta(seconds=30)
# Unapplied events this old mean the tenant's wake-up was lost (a worker died
# holding it): send again, whatever the coalescing flag says.
STALE_EVENTS = timedelta(seconds=15)
# One seat read per tenant per minute at most while Stripe is unreachable.
SEAT_SYNC_EVERY_SECONDS = 60
BATCH = 1000


class Sweeper:
    def __init__(self, rt: runtime.Runtime) -> None:
        self.rt = rt
        self.lock_key = f"{rt.settings.redis_namespace}:sweep-lock"

    def run_once(self) -> dict[str, int]:
        """One pass, if no other worker is sweeping; returns what it re-sent."""
        if not self._take_turn():
            return {}
        now = utcnow()
        with session_scope(self.rt.engine) as session:
            left = Left(
                tenants=self._tenants_behind(session, now),
                purchases=self._purchases_lost(session, now),
                seat_syncs=self._seat_reads_due(session, now),
                invitations=self._invitations_due(session, now),
            )
        sent = {
            "tenants": self._send_tenants(left.tenants, now),
            "purchases": self._send_purchases(left.purchases),
            "seat_syncs": self._send_seat_syncs(left.seat_syncs),
            "invitations": self._send_invitations(left.invitations),
        }
        if any(sent.values()):
            log.info("sweep re-sent %s", sent)
        return sent

    # -- the steps: find (one transaction), then send (after its commit) ----------------

    def _take_turn(self) -> bool:
        """One worker sweeps at a time: the lock lasts about one interval."""
        interval_ms = int(self.rt.settings.sweep_interval * 1000)
        try:
            return bool(self.rt.redis.set(self.lock_key, "1", nx=True, px=max(1000, interval_ms - 500)))
        except (redis.RedisError, OSError):
            return False

    @staticmethod
    def _tenants_behind(session: Session, now: datetime) -> list[tuple[str, datetime]]:
        """Tenants with unapplied events (and the oldest), but a quarantined (poison) one waits out its backoff."""
        quarantined = set(session.execute(
            select(Tenant.id).where(Tenant.quarantined_until.is_not(None), Tenant.quarantined_until > now)
        ).scalars())
        return [(t, oldest) for t, oldest in directory_events.oldest_unapplied(session) if t not in quarantined]

    @staticmethod
    def _purchases_lost(session: Session, now: datetime) -> list[str]:
        """Pending purchases whose message is older than RESEND_AFTER, marked as enqueued now."""
        stale = now - RESEND_AFTER
        purchases = [p for (p,) in session.execute(
            select(Purchase.id)
            .where(
                Purchase.status == "pending",
                func.coalesce(Purchase.enqueued_at, stale) <= stale,
                # A worker is calling Stripe for it (its lease runs): re-sending it
                # would only make a second worker wait for the first.
                or_(Purchase.lease_until.is_(None), Purchase.lease_until <= now),
            )
            .limit(BATCH)
        )]
        if purchases:
            session.execute(update(Purchase).where(Purchase.id.in_(purchases)).values(enqueued_at=now))
        return purchases

    def _seat_reads_due(self, session: Session, now: datetime) -> list[str]:
        """Billed tenants whose seats are to be read from Stripe (never read, or due for a re-read)."""
        if not self.rt.settings.stripe_webhook_secret:
            # No webhooks tell us what finance changes by hand: re-read each linked
            # subscription every STRIPE_RESYNC_INTERVAL (the seat read below sends it).
            due_before = now - timedelta(seconds=self.rt.settings.stripe_resync_interval)
            stale_reads = [t.id for t in session.execute(
                select(Tenant).where(
                    Tenant.stripe_subscription_id.is_not(None),
                    Tenant.seats_synced_at <= due_before,
                    Tenant.billing_blocked.is_(None),
                    ~Tenant.id.in_(select(Purchase.tenant_id).where(Purchase.status == "pending")),
                )
            ).scalars() if self.rt.gateway.bills(t)]
            for chunk in chunks(stale_reads):
                session.execute(update(Tenant).where(Tenant.id.in_(chunk)).values(seats_synced_at=None))
        return [t.id for t in session.execute(
            select(Tenant).where(
                Tenant.stripe_subscription_id.is_not(None),
                Tenant.seats_synced_at.is_(None),
                Tenant.billing_blocked.is_(None),
            )
        ).scalars() if self.rt.gateway.bills(t)]

    @staticmethod
    def _invitations_due(session: Session, now: datetime) -> list[str]:
        due = invitations.due_invitations(session, now, limit=BATCH)
        invitations.mark_enqueued(session, due, now)
        return due

    def _send_tenants(self, tenants: list[tuple[str, datetime]], now: datetime) -> int:
        sent = 0
        for tenant_id, oldest in tenants:
            if as_utc(oldest) <= now - STALE_EVENTS:
                self.rt.waker.send(tenant_id)
                sent += 1
            else:
                # Coalesced: a tenant whose message is still queued is not sent again.
                sent += int(self.rt.waker.wake(tenant_id))
        return sent

    def _send_purchases(self, purchases: list[str]) -> int:
        for purchase_id in purchases:
            self.rt.waker.enqueue(PURCHASE_SEATS, purchase_id)
        return len(purchases)

    def _send_seat_syncs(self, tenant_ids: list[str]) -> int:
        sent = 0
        # Never throttled longer than the periodic re-read's own interval.
        every = max(1, int(min(SEAT_SYNC_EVERY_SECONDS, self.rt.settings.stripe_resync_interval)))
        for tenant_id in tenant_ids:
            key = f"{self.rt.settings.redis_namespace}:seat-sync-sent:{tenant_id}"
            if self.rt.redis.set(key, "1", nx=True, ex=every):
                self.rt.waker.enqueue(SYNC_SEATS, tenant_id)
                sent += 1
        return sent

    def _send_invitations(self, due: list[str]) -> int:
        for batch in invitations.batches(due, spread=self.rt.settings.worker_threads):
            self.rt.waker.enqueue(SEND_INVITATION, *batch)
        return len(due)


@dataclass(frozen=True)
class Left:
    """What lost messages left behind, found in one transaction and sent after it."""

    tenants: list[tuple[str, datetime]]
    purchases: list[str]
    seat_syncs: list[str]
    invitations: list[str]


class SweepMiddleware(Middleware):
    """Runs the sweep in a thread of every worker process, from boot (covers start-up) to shutdown."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def after_worker_boot(self, broker, worker) -> None:
        if is_purchase_worker(worker):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sally-sweep", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker, worker) -> None:
        if is_purchase_worker(worker):
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                Sweeper(runtime.current()).run_once()
            except Exception:  # noqa: BLE001 - the sweep must outlive a bad pass
                log.exception("sweep pass failed")
            self._stop.wait(self.interval)
