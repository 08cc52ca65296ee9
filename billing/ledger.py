"""The ledger as finance reads it: Stripe's webhook events applied once, and the CSV export.

No Stripe call here: a webhook only stores the event and updates rows; a
subscription change asks the worker to re-read the subscription (the worker
reads Stripe, never the request path).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import insert, or_, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from billing.stripe_gateway import Invoice
from models.settings import TIERS
from models.tables import Purchase, StripeEvent, SyncEvent, Tenant, as_utc, utcnow

SUBSCRIPTION_EVENTS = frozenset(
    {"customer.subscription.updated", "customer.subscription.created", "customer.subscription.deleted"}
)
# invoice.paid and invoice.payment_failed can share a second with invoice.finalized
# (Stripe's `created` is in whole seconds): then the later step of the life cycle wins.
INVOICE_EVENTS = {"invoice.finalized": 1, "invoice.payment_failed": 2, "invoice.paid": 3}
PAYMENT_STATUS = {"invoice.finalized": "open", "invoice.payment_failed": "failed", "invoice.paid": "paid"}
# Stripe's currencies without a minor unit (amounts are already whole units).
ZERO_DECIMAL = frozenset(
    "bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split()
)


class InvalidStripeEventError(ValueError):
    """A signed body that is not a Stripe event we can read."""


@dataclass(frozen=True)
class EventOutcome:
    """What storing one event did; ``tenant_id`` must be woken after the commit."""

    outcome: str
    tenant_id: str | None = None

    @property
    def duplicate(self) -> bool:
        return self.outcome == "duplicate"


def _from_unix(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return datetime.fromtimestamp(value, tz=timezone.utc)


def parse_event(event: Any) -> tuple[str, str, datetime, Mapping[str, Any]]:
    """(id, type, created, data.object) of a Stripe event, or InvalidStripeEventError."""
    if not isinstance(event, Mapping):
        raise InvalidStripeEventError("The body is not a JSON object.")
    event_id, type_, created = event.get("id"), event.get("type"), _from_unix(event.get("created"))
    data = event.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if not isinstance(event_id, str) or not event_id or len(event_id) > 255:
        raise InvalidStripeEventError("'id' must be the event id.")
    if not isinstance(type_, str) or not type_ or len(type_) > 128:
        raise InvalidStripeEventError("'type' must be the event type.")
    if created is None:
        raise InvalidStripeEventError("'created' must be a Unix time.")
    if not isinstance(obj, Mapping) or not isinstance(obj.get("id"), str):
        raise InvalidStripeEventError("'data.object' must be a Stripe object with an id.")
    return event_id, type_, created, obj


def store_event(session: Session, event: Mapping[str, Any], now: datetime | None = None) -> EventOutcome:
    """Store a verified event once (by its id) and apply it; a redelivered event changes nothing."""
    event_id, type_, created, obj = parse_event(event)
    now = now or utcnow()
    row = StripeEvent(id=event_id, type=type_, object_id=obj["id"][:255], created=created, received_at=now)
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        # Stripe delivers at least once: the same event again (or concurrently) is a no-op.
        return EventOutcome("duplicate")
    if type_ in SUBSCRIPTION_EVENTS:
        outcome = _subscription_changed(session, obj, now)
    elif type_ in INVOICE_EVENTS:
        outcome = _invoice_event(session, type_, created, obj)
    else:
        outcome = EventOutcome("ignored: not an event Sally acts on")
    row.tenant_id = outcome.tenant_id
    row.outcome = outcome.outcome[:255]
    session.add(row)
    return outcome


def _subscription_changed(session: Session, obj: Mapping[str, Any], now: datetime) -> EventOutcome:
    """Finance (or anyone) changed a linked subscription: the worker re-reads its seats now.

    The event's own copy of the items is not used: re-reading Stripe gives the
    state after every change, so events arriving late or out of order cannot
    put an older quantity back.
    """
    tenant = session.execute(select(Tenant).where(Tenant.stripe_subscription_id == obj["id"])).scalar_one_or_none()
    if tenant is None:
        return EventOutcome("ignored: no tenant uses this subscription")
    tenant.seats_synced_at = None
    session.add(tenant)
    # An event in the tenant's pipeline: reconcile sees the seats as unread and asks
    # the worker to read them, and …/sync counts it until that is planned.
    session.execute(
        insert(SyncEvent.__table__).values(
            tenant_id=tenant.id, kind="stripe_subscription_changed", user_ids=[], created_at=now
        )
    )
    return EventOutcome("seats re-read requested", tenant.id)


def _purchase_id_of(invoice: Mapping[str, Any]) -> str | None:
    """The Sally purchase that made this invoice: its metadata, or the subscription's snapshot on it."""
    for metadata in (
        invoice.get("metadata"),
        ((invoice.get("parent") or {}).get("subscription_details") or {}).get("metadata"),
        (invoice.get("subscription_details") or {}).get("metadata"),
    ):
        if isinstance(metadata, Mapping) and isinstance(metadata.get("sally_purchase_id"), str):
            return metadata["sally_purchase_id"]
    return None


def _invoice_event(session: Session, type_: str, created: datetime, obj: Mapping[str, Any]) -> EventOutcome:
    """Set a purchase's invoice and payment status; an event older than the last applied one is ignored."""
    purchase = session.execute(
        select(Purchase).where(Purchase.stripe_invoice_id == obj["id"])
    ).scalar_one_or_none()
    if purchase is None:
        # The invoice's events can arrive before the purchase that made it settles.
        purchase_id = _purchase_id_of(obj)
        purchase = session.get(Purchase, purchase_id) if purchase_id else None
        if purchase is not None and purchase.stripe_invoice_id not in (None, obj["id"]):
            purchase = None
    if purchase is None:
        return EventOutcome("ignored: not the invoice of a Sally purchase")
    last = as_utc(purchase.invoice_event_at) if purchase.invoice_event_at else None
    rank = INVOICE_EVENTS[type_]
    if last is not None and (created, rank) < (last, INVOICE_EVENTS.get(_last_type(purchase), 0)):
        return EventOutcome("stale: a newer event of this invoice was applied", purchase.tenant_id)
    invoice = Invoice.from_stripe(obj)
    purchase.stripe_invoice_id = invoice.id
    purchase.invoice_status = invoice.status
    purchase.payment_status = PAYMENT_STATUS[type_]
    if invoice.amount_due is not None:
        purchase.amount_due = invoice.amount_due
    if invoice.amount_paid is not None:
        purchase.amount_paid = invoice.amount_paid
    if invoice.currency:
        purchase.currency = invoice.currency
    if type_ == "invoice.paid":
        purchase.paid_at = _from_unix(invoice.paid_at) or created
    purchase.invoice_event_at = created
    session.add(purchase)
    return EventOutcome(f"applied to purchase {purchase.id}", purchase.tenant_id)


def _last_type(purchase: Purchase) -> str:
    """The event type that set the purchase's payment status (the inverse of PAYMENT_STATUS)."""
    for type_, status in PAYMENT_STATUS.items():
        if status == purchase.payment_status:
            return type_
    return ""


def record_invoice(purchase: Purchase, invoice: Invoice | None) -> None:
    """Put what the purchase's Stripe answer said about its invoice on the row.

    A webhook event may have been applied first (it can arrive before the
    answer): its status is as new or newer, so it is kept.
    """
    if invoice is None:
        return
    purchase.stripe_invoice_id = invoice.id
    if purchase.invoice_event_at is not None:
        return
    purchase.invoice_status = invoice.status
    purchase.amount_due = invoice.amount_due
    purchase.amount_paid = invoice.amount_paid
    purchase.currency = invoice.currency
    purchase.paid_at = _from_unix(invoice.paid_at)
    purchase.payment_status = {"paid": "paid", "open": "open"}.get(invoice.status or "")


# -- finance's CSV -------------------------------------------------------------------

CSV_COLUMNS = (
    "purchase_id", "tenant_id", "tenant_name", "created_at", "settled_at", "status",
    "stripe_subscription_id", "stripe_invoice_id", "invoice_status", "payment_status", "currency",
    "amount_due", "amount_paid", "amount_due_minor", "amount_paid_minor", "paid_at",
    *(f"{tier}_before" for tier in TIERS), *(f"{tier}_after" for tier in TIERS), "trigger", "error",
)


def format_amount(minor: int | None, currency: str | None) -> str:
    """Minor units as a decimal string in the currency's unit (1999 usd -> 19.99; 500 jpy -> 500)."""
    if minor is None:
        return ""
    if (currency or "").lower() in ZERO_DECIMAL:
        return str(minor)
    sign = "-" if minor < 0 else ""
    return f"{sign}{abs(minor) // 100}.{abs(minor) % 100:02d}"


def _iso(moment: datetime | None) -> str:
    return as_utc(moment).isoformat().replace("+00:00", "Z") if moment else ""


def ledger_rows(session: Session, tenant_id: str, since: datetime | None = None) -> list[Purchase]:
    """A tenant's purchases, oldest first; ``since`` keeps those created or settled at or after it."""
    query = select(Purchase).where(Purchase.tenant_id == tenant_id)
    if since is not None:
        query = query.where(or_(Purchase.created_at >= since, Purchase.settled_at >= since))
    return list(session.execute(query.order_by(Purchase.created_at, Purchase.id)).scalars())


def csv_lines(tenant: Tenant, purchases: Iterable[Purchase]) -> Iterator[str]:
    """The ledger as CSV (RFC 4180), header first: one line per purchase, one per Stripe invoice."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def flush(row: list[Any]) -> str:
        writer.writerow(row)
        line = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return line

    yield flush(list(CSV_COLUMNS))
    for p in purchases:
        before, after = p.quantities_before or {}, p.quantities_after or {}
        yield flush([
            p.id, p.tenant_id, _safe_cell(tenant.name), _iso(p.created_at), _iso(p.settled_at), p.status,
            p.subscription_id or tenant.stripe_subscription_id or "", p.stripe_invoice_id or "",
            p.invoice_status or "", p.payment_status or "", (p.currency or "").upper(),
            format_amount(p.amount_due, p.currency), format_amount(p.amount_paid, p.currency),
            "" if p.amount_due is None else p.amount_due, "" if p.amount_paid is None else p.amount_paid,
            _iso(p.paid_at),
            *(before.get(tier, "") for tier in TIERS), *(after.get(tier, "") for tier in TIERS),
            _safe_cell(p.trigger), _safe_cell(p.error or p.hold_reason or ""),
        ])


def _safe_cell(text: str) -> str:
    # A spreadsheet runs a cell that starts with = + - @ as a formula (CSV injection);
    # the tenant's name, the trigger and the error texts are free text.
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text
