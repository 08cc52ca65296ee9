"""The spend guard: how many seats one purchase may add before the admin must approve it.

`hold_reason` is a pure rule (no I/O); the functions below it change a
purchase's state for the admin API, in the caller's transaction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, select
from sqlmodel import Session

from models.settings import TIERS
from models.tables import Purchase, Tenant

HELD = "awaiting_approval"
OPEN_STATUSES = ("pending", HELD)
# Settled purchases that bought (or recorded) seats: after one, a purchase is no longer the first.
BOUGHT = ("succeeded", "not_billed")


class PurchaseStateError(Exception):
    """The purchase's state does not allow what the admin asked (approve a settled one, cancel one in flight)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class GuardPolicy:
    """A tenant's growth limit: max(min_seats, percent % of the seats bought) per tier and purchase."""

    enabled: bool = True
    min_seats: int = 10
    percent: int = 25
    first_purchase: int = 10_000

    @classmethod
    def of(cls, tenant: Tenant) -> GuardPolicy:
        return cls(tenant.guard_enabled, tenant.guard_min_seats, tenant.guard_percent, tenant.guard_first_purchase)

    def limit(self, current: int, *, first: bool) -> int:
        """Seats one purchase may add to a tier holding ``current`` without approval."""
        usual = max(self.min_seats, math.ceil(current * self.percent / 100))
        # The first purchase after linking covers the IdP's first sync, whose seats the
        # admin mapped on purpose: it may add up to `first_purchase` (DESIGN decision, README).
        return max(usual, self.first_purchase) if first else usual


def hold_reason(
    policy: GuardPolicy,
    before: Mapping[str, int],
    after: Mapping[str, int],
    *,
    first: bool,
    lowered: Mapping[str, int] | None = None,
) -> str | None:
    """Why a purchase raising ``before`` to ``after`` needs the admin's approval, or None when it does not."""
    reasons = []
    for tier in TIERS:
        current, target = int(before.get(tier, 0)), int(after.get(tier, 0))
        if target <= current:
            continue
        if lowered and tier in lowered and target > lowered[tier]:
            # Finance lowered it by hand: buying it back is a decision, never automatic.
            reasons.append(
                f"{tier} {current} → {target}: finance lowered {tier} to {lowered[tier]} by hand in Stripe"
            )
        elif policy.enabled and target - current > policy.limit(current, first=first):
            reasons.append(
                f"{tier} {current} → {target} adds {target - current} seats, more than the "
                f"{policy.limit(current, first=first)} allowed without approval"
            )
    if not reasons:
        return None
    return "Spend guard: " + "; ".join(reasons) + "."


def is_first_purchase(session: Session, tenant: Tenant) -> bool:
    """No purchase has bought seats since billing was linked (or ever, for a ledger-only tenant)."""
    query = select(Purchase.id).where(Purchase.tenant_id == tenant.id, Purchase.status.in_(BOUGHT))
    if tenant.billing_linked_at is not None:
        query = query.where(Purchase.created_at >= tenant.billing_linked_at)
    return not session.execute(select(exists(query))).scalar()


def _open(session: Session, tenant: Tenant, purchase_id: str) -> Purchase:
    purchase = session.get(Purchase, purchase_id)
    if purchase is None or purchase.tenant_id != tenant.id:
        raise LookupError(purchase_id)
    return purchase


def approve(session: Session, tenant: Tenant, purchase_id: str, now: datetime) -> Purchase:
    """The admin approves a held purchase: it goes ahead for the demand it showed (re-read before buying)."""
    purchase = _open(session, tenant, purchase_id)
    if purchase.status != HELD:
        raise PurchaseStateError("not_awaiting_approval", f"Purchase {purchase.id} is {purchase.status}, not awaiting approval.")
    purchase.status = "pending"
    purchase.approved_at = now
    purchase.enqueued_at = now
    purchase.error = None
    # The admin decided: tiers finance lowered may be raised again, up to this purchase.
    tenant.seats_lowered = None
    session.add_all([purchase, tenant])
    session.flush()
    return purchase


def stop(session: Session, tenant: Tenant, purchase_id: str, now: datetime, *, rejected: bool) -> Purchase:
    """Reject (held only) or cancel (held, or pending and not yet sent to Stripe) a purchase."""
    purchase = _open(session, tenant, purchase_id)
    if rejected and purchase.status != HELD:
        raise PurchaseStateError("not_awaiting_approval", f"Purchase {purchase.id} is {purchase.status}, not awaiting approval.")
    if purchase.status not in OPEN_STATUSES:
        raise PurchaseStateError("already_settled", f"Purchase {purchase.id} is already {purchase.status}.")
    if purchase.request_body is not None:
        # Frozen: the update may be on its way to Stripe (or done). Only Stripe's
        # answer settles it; cancelling now could hide a charge.
        raise PurchaseStateError(
            "in_flight", f"Purchase {purchase.id} was already sent to Stripe and can no longer be cancelled."
        )
    what = "rejected" if rejected else "cancelled"
    purchase.status = "cancelled"
    purchase.error = f"{what} by the admin"
    purchase.settled_at = now
    # No new purchase for the same seats until the demand grows past them or the
    # admin saves the mapping again (the same rule as a purchase Stripe refused).
    targets = {tier: max(int((purchase.quantities_before or {}).get(tier, 0)), int(purchase.demand.get(tier, 0)))
               for tier in TIERS}
    tenant.billing_blocked = {"reason": f"the admin {what} the seat purchase", "targets": targets, "by": "admin"}
    session.add_all([purchase, tenant])
    session.flush()
    return purchase
