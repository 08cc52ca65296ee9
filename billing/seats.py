"""Seat allocation per tenant: hand bought seats to waiting users, plan the next purchase."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Sequence

from sqlalchemy import DateTime, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from billing.gateway import Gateway
from billing.guard import HELD, OPEN_STATUSES, GuardPolicy, hold_reason, is_first_purchase
from billing.licenses import TierPlan, plan_tier, purchase_targets, raised_to
from models.db import chunks
from models.settings import TIERS
from models.tables import ACCOUNT_HELD, Account, AccountHistory, Purchase, SeatCount, Tenant, new_id

REASON_BUYING = "Waiting for the {tier} seat purchase in progress."
REASON_SYNCING = "Waiting for the seats bought to be read from Stripe."
REASON_CAP = "The {tier} seat cap ({cap}) is reached; the admin can raise it."
REASON_REFUSED = "Stripe refused the seat purchase: {reason}"
REASON_HELD = "Waiting for the admin to approve the seat purchase. {reason}"
REASON_STOPPED = "Waiting: {reason}; more demand, or saving the mapping again, plans a new one."
REASON_LOWERED = "The {tier} seats in Stripe were lowered to {seats}; this user's seat went with them."


@dataclass
class Allocation:
    """What an allocation pass did, and what must be sent after its commit."""

    granted: dict[str, int] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)
    purchase_id: str | None = None
    needs_seat_sync: bool = False




def purchased_seats(session: Session, tenant_id: str) -> dict[str, int]:
    seats = dict.fromkeys(TIERS, 0)
    for tier, purchased in session.execute(
        select(SeatCount.tier, SeatCount.purchased).where(SeatCount.tenant_id == tenant_id)
    ):
        seats[tier] = purchased
    return seats


def seats_of(session: Session, tenant_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """Seats bought and seats held per tier, from the tenant's seat_count rows (one short query)."""
    purchased, held = dict.fromkeys(TIERS, 0), dict.fromkeys(TIERS, 0)
    for tier, bought, assigned in session.execute(
        select(SeatCount.tier, SeatCount.purchased, SeatCount.assigned).where(SeatCount.tenant_id == tenant_id)
    ):
        purchased[tier], held[tier] = bought, assigned
    return purchased, held


def change_held(session: Session, tenant_id: str, deltas: dict[str, int], now: datetime) -> None:
    """Add to the seats held per tier; every change of an account's license goes through here."""
    table = SeatCount.__table__
    for tier, delta in deltas.items():
        if not delta:
            continue
        changed = session.execute(
            update(table)
            .where(table.c.tenant_id == tenant_id, table.c.tier == tier)
            .values(assigned=table.c.assigned + delta, updated_at=now)
        ).rowcount
        if not changed:
            # Callers hold the tenant's lock: nobody else inserts this row meanwhile.
            session.execute(insert(table).values(tenant_id=tenant_id, tier=tier, purchased=0, assigned=delta, updated_at=now))


def set_purchased_seats(
    session: Session,
    tenant_id: str,
    quantities: dict[str, int],
    now: datetime,
    prices: Mapping[str, tuple[int | None, str | None]] | None = None,
) -> None:
    """Record the seats bought per tier (Stripe's item quantities, or a not_billed purchase).

    ``prices`` (tier → unit_amount, currency, as read from the subscription's
    items) is stored beside them when given; a tier without an item keeps none.
    """
    existing = {row.tier: row for row in session.execute(
        select(SeatCount).where(SeatCount.tenant_id == tenant_id)
    ).scalars()}
    for tier in TIERS:
        row = existing.get(tier) or SeatCount(tenant_id=tenant_id, tier=tier)
        row.purchased = int(quantities.get(tier, 0))
        row.updated_at = now
        if prices is not None and tier in prices:
            row.unit_amount, row.currency = prices[tier]
        session.add(row)
    session.flush()


def pending_purchase(session: Session, tenant_id: str) -> Purchase | None:
    """The tenant's one open purchase: in flight, or held by the spend guard."""
    return session.execute(
        select(Purchase).where(Purchase.tenant_id == tenant_id, Purchase.status.in_(OPEN_STATUSES))
    ).scalar_one_or_none()


def guard_check(session: Session, tenant: Tenant, before: dict[str, int], after: dict[str, int]) -> str | None:
    """The spend guard's verdict on raising ``before`` to ``after`` for this tenant (None: go ahead)."""
    return hold_reason(
        GuardPolicy.of(tenant), before, after,
        first=is_first_purchase(session, tenant), lowered=tenant.seats_lowered,
    )


def seat_needs(session: Session, tenant: Tenant) -> dict[str, int]:
    """Seats the users need per tier now (holders and waiting users, within the cap): re-read before a freeze."""
    _, holders = seats_of(session, tenant.id)
    waiting = dict.fromkeys(TIERS, 0)
    for tier, count in session.execute(
        select(Account.wanted_tier, func.count())
        .where(
            Account.tenant_id == tenant.id,
            Account.role.is_not(None),
            Account.wanted_tier.is_not(None),
            Account.license.is_(None),
        )
        .group_by(Account.wanted_tier)
    ):
        waiting[tier] = count
    caps = tenant.seat_cap or {}
    return {
        tier: holders[tier] + waiting[tier] if caps.get(tier) is None
        else min(holders[tier] + waiting[tier], caps[tier])
        for tier in TIERS
    }


def _review_held(
    session: Session,
    tenant: Tenant,
    held: Purchase,
    purchased: dict[str, int],
    needed: dict[str, int],
    targets: dict[str, int] | None,
    now: datetime,
) -> tuple[Purchase | None, str | None]:
    """Re-check a held purchase against today's demand: (still open purchase, id to send now)."""
    if targets is None:
        held.status = "cancelled"
        held.error = "no longer needed: the users it was for no longer need the seats"
        held.settled_at = now
        session.add(held)
        session.flush()
        return None, None
    held.demand = dict(needed)
    held.quantities_before = dict(purchased)
    after = raised_to(purchased, needed)
    held.hold_reason = guard_check(session, tenant, purchased, after)
    if held.hold_reason is None:
        held.status = "pending"
        held.enqueued_at = now
        session.add(held)
        session.flush()
        return None, held.id
    session.add(held)
    session.flush()
    return held, None


def allocate(
    session: Session, tenant: Tenant, now: datetime, *, gateway: Gateway, trigger: str
) -> Allocation:
    """Give free seats to the longest-waiting users, mark the rest, plan one purchase if short.

    Runs under the tenant's lock, in the caller's transaction: settling a
    purchase and planning the next one happen in the same commit.
    """
    result = Allocation()
    # Seats held are kept beside the seats bought (change_held), not counted from
    # the accounts: the cost of one change does not grow with the tenant.
    purchased, holders = seats_of(session, tenant.id)
    if gateway.bills(tenant) and tenant.seats_synced_at is not None:
        holders = _revoke_beyond(session, tenant.id, purchased, holders, now)
    waiting, shown = _waiting_users(session, tenant.id)
    caps = tenant.seat_cap or {}
    plans: dict[str, TierPlan] = {
        tier: plan_tier(purchased[tier], holders[tier], len(waiting[tier]), caps.get(tier)) for tier in TIERS
    }
    # The seats the users need per tier, within the cap. A purchase asks for these,
    # not for `targets` (which are at least the seats we last saw bought): the job
    # raises each tier to max(the subscription's current quantity, this), so a tier
    # finance lowered by hand since our last read is not bought back unneeded.
    needed = {
        tier: holders[tier] + len(waiting[tier]) if caps.get(tier) is None
        else min(holders[tier] + len(waiting[tier]), caps[tier])
        for tier in TIERS
    }
    # Read before the purchase step, which may change them.
    blocked = tenant.billing_blocked or None
    syncing = gateway.bills(tenant) and tenant.seats_synced_at is None
    in_flight = _settle_purchase(session, tenant, purchase_targets(purchased, plans), purchased, needed, now,
                                 trigger, result, blocked=blocked, syncing=syncing)
    for tier in TIERS:
        grant, rest = waiting[tier][:plans[tier].grant], waiting[tier][plans[tier].grant:]
        _update_accounts(session, grant, now, license=tier, status="active", status_reason=None, waiting_since=None)
        result.granted[tier] = len(grant)
        change_held(session, tenant.id, {tier: len(grant)}, now)
        result.waiting[tier] = len(rest)
        # The users the cap keeps out are the last in line.
        buying_count = len(rest) - plans[tier].over_cap
        for reason, ids in (
            (_waiting_reason(tier, in_flight, result.purchase_id, blocked=blocked, syncing=syncing),
             rest[:buying_count]),
            (REASON_CAP.format(tier=tier, cap=caps.get(tier)), rest[buying_count:]),
        ):
            # Only rows whose reason changes: a tenant with many waiting users is
            # re-allocated on every reconcile, and rewriting them all each time (or
            # asking the database which changed, 500 at a time) made a burst's cost
            # grow with the square of its size: removing 97,000 users waiting behind
            # the spend guard took minutes. Only those users get a history row too.
            changed = [uid for uid in ids if shown[uid] != ("pending_license", reason)]
            _update_accounts(session, changed, now, status="pending_license", status_reason=reason)
    session.flush()
    return result


def _waiting_users(
    session: Session, tenant_id: str
) -> tuple[dict[str, list[str]], dict[str, tuple[str | None, str | None]]]:
    """The users waiting for a seat per tier, longest waiting first, and the status and reason each shows now
    (read in the same pass: only those whose reason changes are written)."""
    waiting: dict[str, list[str]] = {tier: [] for tier in TIERS}
    shown: dict[str, tuple[str | None, str | None]] = {}
    for user_id, tier, status, reason in session.execute(
        select(Account.user_id, Account.wanted_tier, Account.status, Account.status_reason)
        .where(
            Account.tenant_id == tenant_id,
            Account.role.is_not(None),
            Account.wanted_tier.is_not(None),
            Account.license.is_(None),
            # A user whose removal of access the breaker holds waits for the admin, not for a seat.
            Account.status != ACCOUNT_HELD,
        )
        .order_by(Account.waiting_since, Account.user_id)
    ):
        waiting[tier].append(user_id)
        shown[user_id] = (status, reason)
    return waiting, shown


def _settle_purchase(
    session: Session, tenant: Tenant, targets: dict[str, int] | None, purchased: dict[str, int],
    needed: dict[str, int], now: datetime, trigger: str, result: Allocation, *, blocked: dict[str, Any] | None,
    syncing: bool,
) -> Purchase | None:
    """The purchase this allocation leads to: a held one reviewed against the demand, or a new one planned.

    Sets `result.purchase_id` (a purchase to run now) and `result.needs_seat_sync`;
    returns the purchase still in flight (pending or held), if any, that the waiting users wait for.
    """
    in_flight = pending_purchase(session, tenant.id)
    if targets is not None and blocked is not None:
        ceiling = blocked.get("targets")
        # After a refusal, plan again only for demand beyond what was refused.
        if ceiling is None or all(needed[t] <= ceiling.get(t, 0) for t in TIERS):
            targets = None
    if in_flight is not None and in_flight.status == HELD:
        # A held purchase follows the demand until the admin answers: it lets go
        # once it fits the guard, and ends once nothing is needed any more.
        in_flight, result.purchase_id = _review_held(session, tenant, in_flight, purchased, needed, targets, now)
    elif targets is not None and in_flight is None:
        # Also while the seats bought are not read yet: the purchase job reads the
        # subscription before it buys, and …/sync counts it as pending meanwhile.
        in_flight = _plan_purchase(session, tenant, purchased, needed, now, trigger)
        if in_flight is not None and in_flight.status == "pending":
            result.purchase_id = in_flight.id
            in_flight = None
    held = in_flight is not None and in_flight.status == HELD
    # A held purchase does not wait for the read: the read may show it fits after all.
    result.needs_seat_sync = syncing and blocked is None and result.purchase_id is None and (in_flight is None or held)
    return in_flight


def _waiting_reason(
    tier: str, in_flight: Purchase | None, purchase_id: str | None, *, blocked: dict[str, Any] | None, syncing: bool
) -> str:
    """Why the users of a tier within its cap still wait: a held purchase, a refused or stopped one, the first
    read of the seats bought, or a purchase on its way."""
    if in_flight is not None and in_flight.status == HELD:
        return REASON_HELD.format(reason=in_flight.hold_reason)
    if blocked is not None and purchase_id is None and in_flight is None:
        if blocked.get("by") == "admin":
            return REASON_STOPPED.format(reason=blocked.get("reason"))
        return REASON_REFUSED.format(reason=blocked.get("reason", "unknown reason"))
    if syncing and in_flight is None and purchase_id is None:
        return REASON_SYNCING
    return REASON_BUYING.format(tier=tier)


def _revoke_beyond(
    session: Session, tenant_id: str, purchased: dict[str, int], holders: dict[str, int], now: datetime
) -> dict[str, int]:
    """Seats Stripe no longer has (finance lowered a quantity by hand) are taken back at once.

    The users licensed last give theirs back first and wait as pending_license
    with the reason, like anyone waiting for a seat: a license Stripe does not
    bill is never kept silently (issue 9). Returns the seats held afterwards.
    """
    held = dict(holders)
    for tier in TIERS:
        extra = held[tier] - purchased[tier]
        if extra <= 0:
            continue
        ids = session.execute(
            select(Account.user_id)
            .where(Account.tenant_id == tenant_id, Account.license == tier)
            .order_by(Account.updated_at.desc(), Account.user_id.desc())
            .limit(extra)
        ).scalars().all()
        reason = REASON_LOWERED.format(tier=tier, seats=purchased[tier])
        _update_accounts(session, ids, now, license=None, status="pending_license", status_reason=reason,
                         waiting_since=now)
        change_held(session, tenant_id, {tier: -len(ids)}, now)
        held[tier] -= len(ids)
    session.flush()
    return held
def _update_accounts(session: Session, user_ids: Sequence[str], now: datetime, **values: object) -> None:
    """Set these accounts' outcome, 500 at a time, and copy it into account_history, in the caller's transaction."""
    for chunk in chunks(user_ids):
        session.execute(update(Account).where(Account.user_id.in_(chunk)).values(**values, updated_at=now))
        _write_history(session, chunk, now)


def _write_history(session: Session, user_ids: Sequence[str], now: datetime) -> None:
    """Copy these accounts' outcome into account_history, in the caller's transaction."""
    if not user_ids:
        return
    session.execute(
        insert(AccountHistory).from_select(
            ["tenant_id", "user_id", "created_at", "role", "license", "status", "status_reason"],
            select(Account.tenant_id, Account.user_id, literal(now, DateTime(timezone=True)), Account.role,
                   Account.license, Account.status, Account.status_reason)
            .where(Account.user_id.in_(user_ids)),
        )
    )


def _plan_purchase(
    session: Session, tenant: Tenant, purchased: dict[str, int], needed: dict[str, int], now: datetime, trigger: str
) -> Purchase | None:
    """Insert the tenant's one open purchase: pending, or held when the spend guard says so.

    Checked here, with the seats last read, so a held purchase costs no Stripe
    call at all; the purchase job checks again against the subscription it reads.
    """
    after = raised_to(purchased, needed)
    reason = guard_check(session, tenant, purchased, after)
    purchase = Purchase(
        id=new_id(),
        tenant_id=tenant.id,
        created_at=now,
        status=HELD if reason else "pending",
        hold_reason=reason,
        trigger=trigger[:255],
        demand=dict(needed),
        quantities_before=dict(purchased),
        enqueued_at=now,
    )
    try:
        with session.begin_nested():
            session.add(purchase)
            session.flush()
    except IntegrityError:
        # Another open purchase exists (the unique index says so): it settles first.
        return None
    return purchase
