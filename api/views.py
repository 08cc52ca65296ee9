"""What the admin reads: users with their access, seats per tier, purchases, sync state."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterator

from sqlalchemy import Row, Select, func, not_, or_, select
from sqlmodel import Session

from api.scim.render import iso
from billing.ledger import ledger_rows
from models.directory import events
from models.directory.users import address_of
from models.settings import TIERS
from models.tables import (
    ACCOUNT_HELD,
    HOLD_KEEP,
    Account,
    Invitation,
    Purchase,
    ScimUser,
    SeatCount,
    Tenant,
    as_utc,
    utcnow,
)


def _iso(moment: Any) -> str | None:
    return iso(moment) if moment is not None else None


def _user_filter(tenant_id: str, search: str | None, user_ids: list[str] | None) -> list[Any]:
    where: list[Any] = [ScimUser.tenant_id == tenant_id]
    if user_ids is not None:
        where.append(ScimUser.id.in_(user_ids))
    if search and search.strip():
        # userName_key is casefolded already; displayName and externalId are
        # compared lower-cased (SQLite's lower() is ASCII-only: good enough to search).
        term = "%" + search.strip().casefold().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append(
            or_(
                ScimUser.user_name_key.like(term, escape="\\"),
                func.lower(ScimUser.display_name).like(term, escape="\\"),
                func.lower(ScimUser.external_id).like(term, escape="\\"),
            )
        )
    return where


def count_users(session: Session, tenant_id: str, search: str | None = None) -> int:
    """How many users ``user_rows`` would list without a limit."""
    return session.execute(select(func.count()).select_from(ScimUser).where(*_user_filter(tenant_id, search, None))).scalar_one()


# The admin API's list of every user is read and serialised this many rows at a
# time, as columns: as ORM objects (each user's whole SCIM document, held in the
# session until the list was done) 17,000 users took ~100 MiB at once, and the
# web process kept much of it as fragmented heap afterwards (bench/rss.py).
USER_PAGE_ROWS = 1000

_USER_COLUMNS = (
    ScimUser.id, ScimUser.user_name, ScimUser.data, ScimUser.display_name, ScimUser.active, ScimUser.deleted_at,
    Account.user_id.label("account_user_id"), Account.role, Account.license, Account.status.label("account_status"),
    Account.status_reason, Account.invited_at, Account.invite_error, Account.hold_decision,
    Invitation.status.label("invite_status"), Invitation.send_day, Invitation.wait_reason,
)


def _user_query(tenant_id: str, search: str | None, user_ids: list[str] | None) -> Select:
    return (
        select(*_USER_COLUMNS)
        .join(Account, Account.user_id == ScimUser.id, isouter=True)
        .join(Invitation, Invitation.user_id == ScimUser.id, isouter=True)
        .where(*_user_filter(tenant_id, search, user_ids))
        .order_by(ScimUser.created_at, ScimUser.id)
    )


def _user_row(row: Row, now: datetime) -> dict[str, Any]:
    has_account = row.account_user_id is not None
    waiting = row.invite_status == "pending" and row.send_day is not None and as_utc(row.send_day) > now
    status = "deleted" if row.deleted_at is not None else (row.account_status if has_account else "no_access")
    if has_account and row.role is not None and (
        row.account_status == ACCOUNT_HELD or (row.hold_decision == HOLD_KEEP and row.deleted_at is not None)
    ):
        # The breaker keeps this user's access (held, or kept by the admin's revert), deleted by the IdP or not.
        status = row.account_status
    return {
        "id": row.id,
        "userName": row.user_name,
        "email": address_of(row.data, row.user_name),
        "displayName": row.display_name,
        "active": row.active,
        "role": row.role if has_account and status != "deleted" else None,
        "license": row.license if has_account and status != "deleted" else None,
        "status": status,
        "status_reason": row.status_reason if has_account and status in ("pending_license", ACCOUNT_HELD) else None,
        "invited_at": _iso(row.invited_at) if has_account else None,
        "invite_error": row.invite_error if has_account else None,
        # Past the tenant's daily invitation cap: why it waits and until when.
        "invite_waiting": row.wait_reason if waiting else None,
    }


def user_rows(
    session: Session,
    tenant_id: str,
    *,
    search: str | None = None,
    user_ids: list[str] | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Users with their access (every user unless searched, narrowed or paged), oldest first."""
    now = utcnow()
    query = _user_query(tenant_id, search, user_ids)
    if limit is not None:
        query = query.limit(limit).offset(offset)
    return [_user_row(row, now) for row in session.execute(query)]


def user_pages(session: Session, tenant_id: str, rows: int | None = None) -> Iterator[list[dict[str, Any]]]:
    """Every user of a tenant as `user_rows` lists them, `rows` (USER_PAGE_ROWS) at a time from one query."""
    now = utcnow()
    result = session.execute(_user_query(tenant_id, None, None).execution_options(yield_per=rows or USER_PAGE_ROWS))
    for partition in result.partitions():
        yield [_user_row(row, now) for row in partition]


def purchased_seats(session: Session, tenant_id: str) -> dict[str, int]:
    seats = {tier: 0 for tier in TIERS}
    for tier, purchased in session.execute(
        select(SeatCount.tier, SeatCount.purchased).where(SeatCount.tenant_id == tenant_id)
    ):
        seats[tier] = purchased
    return seats


def assigned_seats(session: Session, tenant_id: str) -> dict[str, int]:
    seats = {tier: 0 for tier in TIERS}
    for tier, count in session.execute(
        select(Account.license, func.count())
        .where(Account.tenant_id == tenant_id, Account.license.is_not(None))
        .group_by(Account.license)
    ):
        seats[tier] = count
    return seats


def licenses(session: Session, tenant: Tenant) -> dict[str, Any]:
    purchased = purchased_seats(session, tenant.id)
    assigned = assigned_seats(session, tenant.id)
    return {tier: {"purchased": purchased[tier], "assigned": assigned[tier]} for tier in TIERS}


def purchase_row(p: Purchase) -> dict[str, Any]:
    """One purchase as the admin API shows it (amounts in the currency's minor unit, as Stripe gives them)."""
    return {
        "id": p.id,
        "created_at": _iso(p.created_at),
        "status": p.status,
        "trigger": p.trigger,
        "quantities_before": p.quantities_before,
        "quantities_after": p.quantities_after,
        "demand": p.demand,
        "stripe_invoice_id": p.stripe_invoice_id,
        "invoice_status": p.invoice_status,
        "payment_status": p.payment_status,
        "amount_due": p.amount_due,
        "amount_paid": p.amount_paid,
        "currency": p.currency,
        "paid_at": _iso(p.paid_at),
        "settled_at": _iso(p.settled_at),
        "hold_reason": p.hold_reason if p.status == "awaiting_approval" else None,
        "approved_at": _iso(p.approved_at),
        "error": p.error,
    }


def purchases(session: Session, tenant_id: str, since: datetime | None = None) -> list[dict[str, Any]]:
    return [purchase_row(p) for p in ledger_rows(session, tenant_id, since)]


def billing(tenant: Tenant) -> dict[str, Any]:
    """The tenant's Stripe link and what the worker found when it checked it."""
    return {
        "stripe_customer_id": tenant.stripe_customer_id,
        "stripe_subscription_id": tenant.stripe_subscription_id,
        "status": tenant.billing_status or "not_linked",
        "detail": tenant.billing_detail,
        "linked_at": _iso(tenant.billing_linked_at),
        "seats_read_at": _iso(tenant.seats_synced_at),
        "seats_lowered_by_hand": tenant.seats_lowered,
    }


def sync_state(session: Session, tenant: Tenant) -> dict[str, Any]:
    total, applied = events.counts(session, tenant.id)
    pending_purchases = session.execute(
        select(func.count()).where(Purchase.tenant_id == tenant.id, Purchase.status == "pending")
    ).scalar_one()
    now = utcnow()
    due = or_(Invitation.send_day.is_(None), Invitation.send_day <= now)
    pending_invitations, waiting_invitations = session.execute(
        select(
            func.count().filter(due),
            func.count().filter(not_(due)),
        ).where(Invitation.tenant_id == tenant.id, Invitation.status.in_(("pending", "sending")))
    ).one()
    held = session.execute(
        select(func.count()).where(Account.tenant_id == tenant.id, Account.status == ACCOUNT_HELD)
    ).scalar_one()
    return {
        "events_total": total,
        "events_applied": applied,
        "pending_purchases": pending_purchases,
        "pending_invitations": pending_invitations,
        # Held back by the daily invitation cap until their day (not pending work).
        "waiting_invitations": waiting_invitations,
        # Removals of access the mass-deprovision breaker holds for the admin (GET …/holds).
        "held_users": held,
        "last_reconciled_at": _iso(tenant.last_reconciled_at),
        # A poison tenant (reconcile failed SALLY_QUARANTINE_AFTER times in a row) waits until
        # quarantined_until; last_error says why (a class and a safe reason, never SQL).
        "reconcile_failures": tenant.reconcile_failures or 0,
        "quarantined_until": _iso(tenant.quarantined_until),
        "last_error": tenant.last_error,
    }
