"""The purchase protocol: freeze the Stripe body and key, call, settle — exactly once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from billing.gateway import Gateway
from billing.ledger import record_invoice
from billing.licenses import raised_to
from billing.locks import lock_tenant
from billing.seats import (
    Allocation,
    allocate,
    guard_check,
    purchased_seats,
    seat_needs,
    set_purchased_seats,
)
from billing.stripe_gateway import Invoice, PermanentBillingError, SubscriptionState
from models.db import session_scope
from models.settings import TIERS
from models.tables import Purchase, Tenant, as_utc, utcnow

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a purchase job did; `next_purchase_id` must be enqueued after the commit.

    ``retry_in``: seconds after which the same purchase must be sent again
    (Stripe's per-subscription pace). A refused API key is raised, not returned.
    """

    status: str
    next_purchase_id: str | None = None
    stripe_called: bool = False
    retry_in: float | None = None


NEEDS_STRIPE = (
    "This purchase was sent to Stripe by a worker with STRIPE_API_KEY; "
    "it settles only on such a worker, and this one has no key."
)
# Stripe keeps an idempotency key for 24 hours; past that a replay would run as a
# new request. We never replay one older than this: we re-read and re-plan instead.
KEY_MAX_AGE = timedelta(hours=20)
# A worker calling Stripe for a purchase renews its lease every third of this;
# a worker that died stops renewing, and the lease lapses this long after.
LEASE_TTL = timedelta(seconds=30)


def idempotency_key(purchase_id: str, generation: int = 0) -> str:
    """The key of a purchase's update; a re-plan after the key expired gets a new generation."""
    return f"sally-purchase-{purchase_id}" if generation == 0 else f"sally-purchase-{purchase_id}-r{generation}"


def _quantities(q: dict[str, int]) -> str:
    return ",".join(f"{tier}={q.get(tier, 0)}" for tier in TIERS)


def metadata_for(purchase: Purchase, before: dict[str, int], after: dict[str, int]) -> dict[str, str]:
    """What finance reads on the subscription and the invoice: who, what, when, why."""
    grown = [tier for tier in TIERS if after.get(tier, 0) > before.get(tier, 0)]
    return {
        "sally_tenant_id": purchase.tenant_id,
        "sally_purchase_id": purchase.id,
        "sally_trigger": purchase.trigger[:500] or "seat demand",
        "sally_tiers": ",".join(grown),
        "sally_quantities_before": _quantities(before),
        "sally_quantities_after": _quantities(after),
        "sally_planned_at": purchase.created_at.isoformat(),
    }


@dataclass(frozen=True)
class Frozen:
    """The exact request a purchase sends (and every retry replays)."""

    subscription_id: str
    body: dict
    key: str


class PurchaseRunner:
    """Runs one purchase through the protocol in DESIGN.md; safe to run twice, late or concurrently.

    ``pace(subscription_id, idempotency_key)`` answers how many seconds to wait
    before the next update of that subscription (0: go now, and the slot is taken).
    """

    def __init__(
        self,
        engine: Engine,
        gateway: Gateway,
        clock: Callable[[], datetime] = utcnow,
        pace: Callable[[str, str], float] | None = None,
        lease: timedelta = LEASE_TTL,
    ) -> None:
        self.engine = engine
        self.gateway = gateway
        self.clock = clock
        self.pace = pace
        self.lease = lease

    def _load(self, session: Session, purchase_id: str) -> tuple[Purchase | None, Tenant | None]:
        purchase = session.get(Purchase, purchase_id)
        if purchase is None:
            return None, None
        lock_tenant(session, purchase.tenant_id)
        session.refresh(purchase)
        tenant = session.get(Tenant, purchase.tenant_id)
        return purchase, tenant

    def run(self, purchase_id: str) -> Outcome:
        """Claim the purchase, freeze its request (once), send it to Stripe, record the answer."""
        claimed = self._claim(purchase_id)
        if isinstance(claimed, Outcome):
            return claimed
        with self._lease_kept(purchase_id):
            frozen = claimed or self._freeze(purchase_id)
            if isinstance(frozen, Outcome):
                return frozen
            invoice = self._send(purchase_id, frozen)
            if isinstance(invoice, Outcome):
                return invoice
            return self._record(purchase_id, invoice)

    @contextmanager
    def _lease_kept(self, purchase_id: str) -> Iterator[None]:
        """Renew the lease while this worker talks to Stripe (a call may take minutes when
        Stripe does not answer); if the process dies, the lease lapses within LEASE_TTL."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease.total_seconds() / 3):
                try:
                    with self.engine.begin() as connection:
                        connection.execute(
                            update(Purchase)
                            .where(Purchase.id == purchase_id, Purchase.status == "pending",
                                   Purchase.lease_until.is_not(None))
                            .values(lease_until=self.clock() + self.lease)
                        )
                except Exception:  # noqa: BLE001 - a missed renewal only shortens the lease
                    log.warning("purchase %s: lease not renewed", purchase_id)

        renewer = threading.Thread(target=renew, name=f"lease-{purchase_id[:8]}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()

    # -- 1. claim ---------------------------------------------------------------------

    def _claim(self, purchase_id: str) -> Outcome | Frozen | None:
        """Under the lock: settle what needs no Stripe, take the lease, and say whether the request is frozen.

        Returns an Outcome when the job is done here, the Frozen request to
        replay, or None when the request must be (re)frozen from a fresh read.
        """
        with session_scope(self.engine) as session:
            purchase, tenant = self._load(session, purchase_id)
            if purchase is None or tenant is None:
                return Outcome("missing")
            if purchase.status != "pending":
                return Outcome("already_settled")
            now = self.clock()
            lease = as_utc(purchase.lease_until) if purchase.lease_until else None
            if lease is not None and lease > now:
                # Another worker is talking to Stripe for it (a duplicate or the sweep's
                # message): it will settle it; a second call would only race it.
                return Outcome("in_flight")
            if not self.gateway.bills(tenant):
                if purchase.request_body is not None:
                    # Frozen by a worker that has Stripe: the update may have run and been
                    # charged. Recording it as not billed would hide that; it waits, visibly,
                    # for a worker with STRIPE_API_KEY (the sweep re-sends it).
                    purchase.error = NEEDS_STRIPE
                    session.add(purchase)
                    return Outcome("waiting_for_stripe")
                return self._settle_not_billed(session, tenant, purchase)
            frozen_at = as_utc(purchase.key_created_at) if purchase.key_created_at else None
            if purchase.request_body is not None and frozen_at is not None and now - frozen_at > KEY_MAX_AGE:
                # Stripe would have forgotten this key (24 h): a replay could buy twice.
                # Drop the frozen request; the freeze below re-reads the subscription
                # (absolute targets: if the old request went through, nothing is left to buy).
                log.warning("purchase %s: idempotency key older than %s, re-planning with a new key",
                            purchase.id, KEY_MAX_AGE)
                purchase.request_body = None
            purchase.lease_until = now + self.lease
            session.add(purchase)
            if purchase.request_body is None:
                return None
            assert purchase.idempotency_key
            return Frozen(purchase.subscription_id or tenant.stripe_subscription_id or "",
                          purchase.request_body, purchase.idempotency_key)

    # -- 2. freeze ------------------------------------------------------------------------

    def _freeze(self, purchase_id: str) -> Outcome | Frozen:
        """Read the subscription, re-read demand and caps, apply the guard, store body and key."""
        with session_scope(self.engine) as session:
            tenant = session.get(Tenant, session.get(Purchase, purchase_id).tenant_id)
            subscription_id = tenant.stripe_subscription_id
        assert subscription_id
        try:
            state = self.gateway.read_subscription(subscription_id)
        except PermanentBillingError as error:
            self._release(purchase_id, error.reason)
            if error.is_auth:
                raise
            return self._settle_failed(purchase_id, error.reason)
        except Exception as error:
            self._release(purchase_id, f"{type(error).__name__}: {getattr(error, 'reason', error)}")
            raise
        with session_scope(self.engine) as session:
            purchase, tenant = self._load(session, purchase_id)
            if purchase is None or tenant is None or purchase.status != "pending":
                return Outcome("already_settled")
            now = self.clock()
            problem = link_problem(tenant, state)
            if problem is not None:
                # Never buy on a subscription that is not this tenant's (or is canceled).
                tenant.billing_status, tenant.billing_detail = "invalid", problem
                purchase.lease_until = None
                return self._settle(session, tenant, purchase, "failed", dict(state.quantities),
                                    dict(state.quantities), None, problem)
            before = dict(state.quantities)
            # What we just read is the truth of the seats bought (finance may have
            # changed it by hand since the last read).
            note_lowered_seats(tenant, purchased_seats(session, tenant.id), before)
            tenant.billing_status, tenant.billing_detail = "verified", None
            set_purchased_seats(session, tenant.id, before, now, state.prices)
            tenant.seats_synced_at = now
            # Demand and caps right now, under the lock: never buy for users who are gone.
            needs = seat_needs(session, tenant)
            if purchase.approved_at is not None:
                # The admin approved the demand shown; anything beyond is the next purchase's.
                needs = {tier: min(needs[tier], int(purchase.demand.get(tier, 0))) for tier in TIERS}
            after = raised_to(before, needs)
            purchase.quantities_before = before
            purchase.demand = needs
            if after == before:
                if purchase.attempts > 0:
                    # An expired key's request was sent before: the seats are there, so
                    # it went through. Settle it with the invoice it made, if any.
                    return self._settle_found(session, tenant, purchase, subscription_id, before)
                # The subscription already has the seats (finance raised it by hand, or
                # the users are gone): nothing to buy.
                return self._nothing_to_buy(session, tenant, purchase, before, state.prices)
            if purchase.approved_at is None:
                reason = guard_check(session, tenant, before, after)
                if reason is not None:
                    return self._hold(session, tenant, purchase, reason)
            try:
                body = self.gateway.build_update(state, after, metadata_for(purchase, before, after))
            except PermanentBillingError as error:
                purchase.lease_until = None
                return self._settle(session, tenant, purchase, "failed", before, after, None, error.reason)
            generation = 0 if purchase.idempotency_key is None else int(now.timestamp())
            purchase.quantities_after = after
            purchase.subscription_id = subscription_id
            purchase.request_body = body
            purchase.idempotency_key = idempotency_key(purchase.id, generation)
            purchase.key_created_at = now
            session.add_all([purchase, tenant])
            return Frozen(subscription_id, body, purchase.idempotency_key)

    # -- 3. send ----------------------------------------------------------------------------

    def _send(self, purchase_id: str, frozen: Frozen) -> Outcome | Invoice | None:
        """Call Stripe with the stored body and key; every retry replays them verbatim."""
        wait = self.pace(frozen.subscription_id, frozen.key) if self.pace is not None else 0.0
        if wait > 0:
            # Stripe limits how fast one subscription may be updated and invoiced.
            self._release(purchase_id, None)
            return Outcome("spaced", retry_in=wait)
        self._count_attempt(purchase_id)
        try:
            return self.gateway.apply_update(frozen.subscription_id, frozen.body, frozen.key)
        except PermanentBillingError as error:
            if error.is_auth:
                # Our API key, not the tenant's purchase: keep it pending and retry.
                self._release(purchase_id, error.reason)
                raise
            outcome = self._settle_failed(purchase_id, error.reason)
            outcome.stripe_called = True
            return outcome
        except Exception as error:
            self._release(purchase_id, f"{type(error).__name__}: {getattr(error, 'reason', error)}")
            raise

    # -- 4. record -------------------------------------------------------------------------

    def _record(self, purchase_id: str, invoice: Invoice | None) -> Outcome:
        """Seats bought, licenses handed out, next purchase planned — one commit."""
        with session_scope(self.engine) as session:
            purchase, tenant = self._load(session, purchase_id)
            if purchase is None or tenant is None or purchase.status != "pending":
                return Outcome("already_settled", stripe_called=True)
            outcome = self._settle(
                session, tenant, purchase, "succeeded",
                purchase.quantities_before or {}, purchase.quantities_after or {}, invoice, None,
            )
            outcome.stripe_called = True
            return outcome

    # -- helpers ------------------------------------------------------------------------

    def _hold(self, session: Session, tenant: Tenant, purchase: Purchase, reason: str) -> Outcome:
        """The spend guard holds it: no Stripe call; the admin approves, rejects or cancels it."""
        purchase.status = "awaiting_approval"
        purchase.hold_reason = reason
        purchase.lease_until = None
        session.add_all([purchase, tenant])
        session.flush()
        allocation = allocate(session, tenant, self.clock(), gateway=self.gateway, trigger="held by the spend guard")
        return Outcome("awaiting_approval", next_purchase_id=allocation.purchase_id)

    def _settle_found(
        self, session: Session, tenant: Tenant, purchase: Purchase, subscription_id: str, seats: dict[str, int]
    ) -> Outcome:
        invoice = self.gateway.find_invoice(subscription_id, purchase.id)
        return self._settle(session, tenant, purchase, "succeeded", purchase.quantities_before or seats,
                            purchase.quantities_after or seats, invoice, None)

    def _nothing_to_buy(
        self, session: Session, tenant: Tenant, purchase: Purchase, seats: dict[str, int],
        prices: dict[str, tuple[int | None, str | None]] | None = None,
    ) -> Outcome:
        """Record the seats read from Stripe and drop the plan: the ledger lists purchases only."""
        now = self.clock()
        set_purchased_seats(session, tenant.id, seats, now, prices)
        tenant.seats_synced_at = now
        tenant.billing_blocked = None
        session.add(tenant)
        session.delete(purchase)
        session.flush()
        allocation = allocate(
            session, tenant, now, gateway=self.gateway, trigger="seats read from Stripe"
        )
        return Outcome("nothing_to_buy", next_purchase_id=allocation.purchase_id)

    def _count_attempt(self, purchase_id: str) -> None:
        with session_scope(self.engine) as session:
            purchase = session.get(Purchase, purchase_id)
            if purchase is not None:
                purchase.attempts += 1
                session.add(purchase)

    def _release(self, purchase_id: str, error: str | None) -> None:
        """Give the lease back (the job is retried); a failure stays visible on the row meanwhile."""
        with session_scope(self.engine) as session:
            purchase = session.get(Purchase, purchase_id)
            if purchase is not None and purchase.status == "pending":
                purchase.lease_until = None
                if error is not None:
                    purchase.error = error[:2048]
                session.add(purchase)

    def _settle_failed(self, purchase_id: str, reason: str) -> Outcome:
        with session_scope(self.engine) as session:
            purchase, tenant = self._load(session, purchase_id)
            if purchase is None or tenant is None or purchase.status != "pending":
                return Outcome("already_settled")
            before = purchase.quantities_before or {}
            # Refused before the body was frozen: what it would have asked for (never below before).
            after = purchase.quantities_after or raised_to(before, purchase.demand)
            return self._settle(session, tenant, purchase, "failed", before, after, None, reason)

    def _settle_not_billed(self, session: Session, tenant: Tenant, purchase: Purchase) -> Outcome:
        before = purchase.quantities_before or {}
        # Demand and caps right now (the users may be gone); an approved purchase at most what was approved.
        needs = seat_needs(session, tenant)
        if purchase.approved_at is not None:
            needs = {tier: min(needs[tier], int(purchase.demand.get(tier, 0))) for tier in TIERS}
        after = raised_to(before, needs)
        purchase.demand = needs
        if after == {tier: before.get(tier, 0) for tier in TIERS}:
            return self._nothing_to_buy(session, tenant, purchase, {tier: before.get(tier, 0) for tier in TIERS})
        if purchase.approved_at is None:
            reason = guard_check(session, tenant, before, after)
            if reason is not None:
                return self._hold(session, tenant, purchase, reason)
        log.warning(
            "tenant %s has no Stripe billing; purchase %s recorded as not_billed", tenant.id, purchase.id
        )
        return self._settle(session, tenant, purchase, "not_billed", before, after, None, None)

    def _settle(
        self,
        session: Session,
        tenant: Tenant,
        purchase: Purchase,
        status: str,
        before: dict[str, int],
        after: dict[str, int],
        invoice: Invoice | None,
        error: str | None,
    ) -> Outcome:
        now = self.clock()
        purchase.status = status
        purchase.quantities_before = {tier: int(before.get(tier, 0)) for tier in TIERS}
        purchase.quantities_after = {tier: int(after.get(tier, 0)) for tier in TIERS}
        record_invoice(purchase, invoice)
        purchase.error = error
        purchase.settled_at = now
        purchase.lease_until = None
        session.add(purchase)
        if status in ("succeeded", "not_billed"):
            set_purchased_seats(session, tenant.id, purchase.quantities_after, now)
            if status == "succeeded" and tenant.seats_synced_at is not None:
                # (None: a webhook asked for a re-read meanwhile; the worker still does it.)
                tenant.seats_synced_at = now
            tenant.billing_blocked = None
        else:
            # Refused for good: the waiting users show the reason, and no new
            # purchase is planned for the same seats until the admin acts.
            tenant.billing_blocked = {"reason": error or "refused", "targets": purchase.quantities_after}
        session.add(tenant)
        session.flush()
        allocation: Allocation = allocate(
            session, tenant, now, gateway=self.gateway, trigger="demand grew while a purchase was settling"
        )
        return Outcome(status, next_purchase_id=allocation.purchase_id)


def sync_seats(engine: Engine, gateway: Gateway, tenant_id: str, clock: Callable[[], datetime] = utcnow) -> Allocation | None:
    """Read the seats bought from Stripe (when billing is linked), check the link, then allocate under the lock.

    Only while the seats are unread (just linked, or a webhook or the periodic
    re-read asked again): a repeated or late message does nothing, and returns
    None when it made no Stripe call. A 401/403 (our API key) propagates as an
    operator alert: the tenant is not blocked for it.
    """
    with session_scope(engine) as session:
        tenant = session.get(Tenant, tenant_id)
        if tenant is None or not gateway.bills(tenant) or tenant.seats_synced_at is not None:
            return None
        subscription_id = tenant.stripe_subscription_id
    try:
        state = gateway.read_subscription(subscription_id)
        failure = None
    except PermanentBillingError as error:
        if error.is_auth:
            raise
        state, failure = None, error.reason
    with session_scope(engine) as session:
        lock_tenant(session, tenant_id)
        tenant = session.execute(select(Tenant).where(Tenant.id == tenant_id)).scalar_one()
        if tenant.seats_synced_at is not None or tenant.stripe_subscription_id != subscription_id:
            # Another read, or a purchase that settled while we read, got there first:
            # our quantities may be older than theirs and must not be written back.
            return Allocation()
        now = clock()
        problem = failure and f"the Stripe subscription could not be read: {failure}"
        if state is not None:
            problem = link_problem(tenant, state)
        if problem is None and state is not None:
            note_lowered_seats(tenant, purchased_seats(session, tenant_id), state.quantities)
            set_purchased_seats(session, tenant_id, state.quantities, now, state.prices)
            tenant.seats_synced_at = now
            tenant.billing_status, tenant.billing_detail = "verified", None
        else:
            tenant.billing_blocked = {"reason": problem, "targets": None}
            if state is not None:
                tenant.billing_status, tenant.billing_detail = "invalid", problem
        session.add(tenant)
        session.flush()
        return allocate(session, tenant, now, gateway=gateway, trigger="seats read from Stripe")


def link_problem(tenant: Tenant, state: SubscriptionState) -> str | None:
    """Why a linked subscription cannot be this tenant's (None when it can)."""
    if state.customer is not None and tenant.stripe_customer_id and state.customer != tenant.stripe_customer_id:
        return (
            f"the Stripe subscription {tenant.stripe_subscription_id} belongs to customer {state.customer}, "
            f"not {tenant.stripe_customer_id}"
        )
    if state.status in ("canceled", "incomplete_expired"):
        return f"the Stripe subscription {tenant.stripe_subscription_id} is {state.status}"
    return None


def note_lowered_seats(tenant: Tenant, known: dict[str, int], read: dict[str, int]) -> None:
    """Remember tiers finance lowered by hand since our last read; forget them once raised again."""
    if tenant.billing_status != "verified":
        return  # The first read after linking: nothing was known to be lowered from.
    lowered = dict(tenant.seats_lowered or {})
    for tier in TIERS:
        quantity = int(read.get(tier, 0))
        if quantity < known.get(tier, 0):
            lowered[tier] = quantity
        elif tier in lowered and quantity > lowered[tier]:
            lowered.pop(tier)
    tenant.seats_lowered = lowered or None
