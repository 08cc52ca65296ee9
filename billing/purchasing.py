"""The purchase protocol: freeze the Stripe body and key, call, settle — exactly once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Protocol

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from billing.licenses import TIERS
from billing.locks import lock_tenant
from billing.seats import Allocation, allocate, billed, purchased_seats, set_purchased_seats
from billing.ledger import record_invoice
from billing.stripe_gateway import Invoice, PermanentBillingError, SubscriptionState
from models.db import session_scope
from models.tables import Purchase, Tenant, utcnow

log = logging.getLogger(__name__)


class Gateway(Protocol):
    def read_subscription(self, subscription_id: str) -> SubscriptionState: ...
    def build_update(self, state: SubscriptionState, targets: dict[str, int], metadata: dict[str, str]) -> dict: ...
    def apply_update(self, subscription_id: str, params: dict, idempotency_key: str) -> Invoice | None: ...


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
        gateway: Gateway | None,
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
            if self.gateway is None or not billed(tenant, True):
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
        assert self.gateway is not None and subscription_id

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
                    after = {tier: max(before.get(tier, 0), purchase.demand.get(tier, 0)) for tier in TIERS}
                    if after == before:
                        # The subscription already has the seats (finance raised it by
                        # hand, or they were simply not read yet): nothing to buy.
                        return self._nothing_to_buy(session, tenant, purchase, before)
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
            invoice = self.gateway.apply_update(subscription_id, body, key)
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
                purchase.quantities_before or {}, purchase.quantities_after or {}, invoice, None,
            )
            outcome.stripe_called = True
            return outcome

    def _nothing_to_buy(self, session: Session, tenant: Tenant, purchase: Purchase, seats: dict[str, int]) -> Outcome:
        """Record the seats read from Stripe and drop the plan: the ledger lists purchases only."""
        now = self.clock()
        set_purchased_seats(session, tenant.id, seats, now)
        tenant.seats_synced_at = now
        tenant.billing_blocked = None
        session.add(tenant)
        session.delete(purchase)
        session.flush()
        allocation = allocate(
            session, tenant, now, billing_configured=self.gateway is not None, trigger="seats read from Stripe"
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
            after = purchase.quantities_after or {
                tier: max(before.get(tier, 0), purchase.demand.get(tier, 0)) for tier in TIERS
            }
            return self._settle(session, tenant, purchase, "failed", before, after, None, reason)

    def _settle_not_billed(self, session: Session, tenant: Tenant, purchase: Purchase) -> Outcome:
        before = purchase.quantities_before or {}
        after = {tier: max(before.get(tier, 0), purchase.demand.get(tier, 0)) for tier in TIERS}
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
            session, tenant, now, billing_configured=self.gateway is not None, trigger="demand grew while a purchase was settling"
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
        if tenant is None or not tenant.stripe_subscription_id or tenant.seats_synced_at is not None:
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
            set_purchased_seats(session, tenant_id, state.quantities, now)
            tenant.seats_synced_at = now
            tenant.billing_status, tenant.billing_detail = "verified", None
        else:
            tenant.billing_blocked = {"reason": problem, "targets": None}
            if state is not None:
                tenant.billing_status, tenant.billing_detail = "invalid", problem
        session.add(tenant)
        session.flush()
        return allocate(session, tenant, now, billing_configured=True, trigger="seats read from Stripe")


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
