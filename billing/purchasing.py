"""The purchase protocol: freeze the Stripe body and key, call, settle — exactly once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from billing.gateway import Gateway
from billing.licenses import raised_to
from billing.locks import lock_tenant
from billing.seats import Allocation, allocate, set_purchased_seats
from billing.stripe_gateway import PermanentBillingError
from models.db import session_scope
from models.settings import TIERS
from models.tables import Purchase, SeatCount, Tenant, utcnow

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a purchase job did; `next_purchase_id` must be enqueued after the commit."""

    status: str
    next_purchase_id: str | None = None
    stripe_called: bool = False


NEEDS_STRIPE = (
    "This purchase was sent to Stripe by a worker with STRIPE_API_KEY; "
    "it settles only on such a worker, and this one has no key."
)


def idempotency_key(purchase_id: str) -> str:
    return f"sally-purchase-{purchase_id}"


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


class PurchaseRunner:
    """Runs one purchase through the protocol in DESIGN.md; safe to run twice, late or concurrently."""

    def __init__(
        self,
        engine: Engine,
        gateway: Gateway,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.gateway = gateway
        self.clock = clock

    def _load(self, session: Session, purchase_id: str) -> tuple[Purchase | None, Tenant | None]:
        purchase = session.get(Purchase, purchase_id)
        if purchase is None:
            return None, None
        lock_tenant(session, purchase.tenant_id)
        session.refresh(purchase)
        tenant = session.get(Tenant, purchase.tenant_id)
        return purchase, tenant

    def run(self, purchase_id: str) -> Outcome:
        # 1. Settled already, or not billed in Stripe: finish under the lock.
        with session_scope(self.engine) as session:
            purchase, tenant = self._load(session, purchase_id)
            if purchase is None or tenant is None:
                return Outcome("missing")
            if purchase.status != "pending":
                return Outcome("already_settled")
            if not self.gateway.bills(tenant):
                if purchase.request_body is not None:
                    # Frozen by a worker that has Stripe: the update may have run and been
                    # charged. Recording it as not billed would hide that; it waits, visibly,
                    # for a worker with STRIPE_API_KEY (the sweep re-sends it).
                    purchase.error = NEEDS_STRIPE
                    session.add(purchase)
                    return Outcome("waiting_for_stripe")
                return self._settle_not_billed(session, tenant, purchase)
            frozen = purchase.request_body is not None
            subscription_id = tenant.stripe_subscription_id
        assert subscription_id

        # 2. Read the subscription (outside the lock), then freeze body and key.
        if not frozen:
            try:
                state = self.gateway.read_subscription(subscription_id)
            except PermanentBillingError as error:
                return self._settle_failed(purchase_id, error.reason)
            with session_scope(self.engine) as session:
                purchase, tenant = self._load(session, purchase_id)
                if purchase is None or tenant is None or purchase.status != "pending":
                    return Outcome("already_settled")
                if purchase.request_body is None:
                    before = dict(state.quantities)
                    after = raised_to(before, purchase.demand)
                    if after == before:
                        # The subscription already has the seats (finance raised it by
                        # hand, or they were simply not read yet): nothing to buy.
                        return self._nothing_to_buy(session, tenant, purchase, before, state.prices)
                    record_seat_prices(session, tenant.id, state.prices)
                    try:
                        body = self.gateway.build_update(state, after, metadata_for(purchase, before, after))
                    except PermanentBillingError as error:
                        return self._settle(session, tenant, purchase, "failed", before, after, None, error.reason)
                    purchase.quantities_before = before
                    purchase.quantities_after = after
                    purchase.subscription_id = subscription_id
                    purchase.request_body = body
                    purchase.idempotency_key = idempotency_key(purchase.id)
                    session.add(purchase)
                body = purchase.request_body
                key = purchase.idempotency_key
                subscription_id = purchase.subscription_id or subscription_id
        else:
            with session_scope(self.engine) as session:
                purchase = session.get(Purchase, purchase_id)
                assert purchase is not None
                body, key = purchase.request_body, purchase.idempotency_key
                subscription_id = purchase.subscription_id or subscription_id
        assert body is not None and key

        # 3. Call Stripe with the stored body and key; every retry replays them verbatim.
        self._count_attempt(purchase_id)
        try:
            invoice_id = self.gateway.apply_update(subscription_id, body, key)
        except PermanentBillingError as error:
            outcome = self._settle_failed(purchase_id, error.reason)
            outcome.stripe_called = True
            return outcome
        except Exception as error:
            self._note_error(purchase_id, f"{type(error).__name__}: {getattr(error, 'reason', error)}")
            raise

        # 4. Settle: seats bought, licenses handed out, next purchase planned — one commit.
        with session_scope(self.engine) as session:
            purchase, tenant = self._load(session, purchase_id)
            if purchase is None or tenant is None or purchase.status != "pending":
                return Outcome("already_settled", stripe_called=True)
            outcome = self._settle(
                session, tenant, purchase, "succeeded",
                purchase.quantities_before or {}, purchase.quantities_after or {}, invoice_id, None,
            )
            outcome.stripe_called = True
            return outcome

    def _nothing_to_buy(
        self, session: Session, tenant: Tenant, purchase: Purchase, seats: dict[str, int],
        prices: dict[str, tuple[int | None, str | None]],
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

    def _note_error(self, purchase_id: str, error: str) -> None:
        """A transient failure stays visible on the row while the job is retried."""
        with session_scope(self.engine) as session:
            purchase = session.get(Purchase, purchase_id)
            if purchase is not None and purchase.status == "pending":
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
        after = raised_to(before, purchase.demand)
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
        invoice_id: str | None,
        error: str | None,
    ) -> Outcome:
        now = self.clock()
        purchase.status = status
        purchase.quantities_before = {tier: int(before.get(tier, 0)) for tier in TIERS}
        purchase.quantities_after = {tier: int(after.get(tier, 0)) for tier in TIERS}
        purchase.stripe_invoice_id = invoice_id
        purchase.error = error
        purchase.settled_at = now
        session.add(purchase)
        if status in ("succeeded", "not_billed"):
            set_purchased_seats(session, tenant.id, purchase.quantities_after, now)
            if status == "succeeded":
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


def record_seat_prices(session: Session, tenant_id: str, prices: dict[str, tuple[int | None, str | None]]) -> None:
    """Keep each tier's price as read from the subscription (for the admin's preview), seats untouched."""
    if not prices:
        return
    rows = {row.tier: row for row in session.execute(select(SeatCount).where(SeatCount.tenant_id == tenant_id)).scalars()}
    for tier, (amount, currency) in prices.items():
        row = rows.get(tier) or SeatCount(tenant_id=tenant_id, tier=tier, purchased=0, updated_at=utcnow())
        row.unit_amount, row.currency = amount, currency
        session.add(row)
    session.flush()


def sync_seats(engine: Engine, gateway: Gateway, tenant_id: str, clock: Callable[[], datetime] = utcnow) -> Allocation | None:
    """Read the seats bought from Stripe (when billing is linked), then allocate under the lock.

    Only until the seats are known: once read (or set by a settled purchase,
    which reads the subscription itself), a repeated or late message does
    nothing, and returns None when it made no Stripe call.
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
        state, failure = None, error.reason
    with session_scope(engine) as session:
        lock_tenant(session, tenant_id)
        tenant = session.execute(select(Tenant).where(Tenant.id == tenant_id)).scalar_one()
        if tenant.seats_synced_at is not None:
            # Another read, or a purchase that settled while we read, got there first:
            # our quantities may be older than theirs and must not be written back.
            return Allocation()
        now = clock()
        if state is not None:
            set_purchased_seats(session, tenant_id, state.quantities, now, state.prices)
            tenant.seats_synced_at = now
        else:
            tenant.billing_blocked = {"reason": f"the Stripe subscription could not be read: {failure}", "targets": None}
        session.add(tenant)
        session.flush()
        return allocate(session, tenant, now, gateway=gateway, trigger="seats read from Stripe")
