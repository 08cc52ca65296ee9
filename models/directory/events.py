"""Sync events: every change that may alter access, appended in the writer's transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Iterable, Sequence

from sqlalchemy import String, cast, func, insert, select, update
from sqlmodel import Session

from models.db import chunks
from models.tables import SyncEvent, utcnow


def record_event(session: Session, tenant_id: str, kind: str, user_ids: Iterable[str] | None) -> None:
    """Append a sync event in the caller's transaction; None means every user of the tenant."""
    # Core on the table, not the ORM entity: this runs on every SCIM write.
    session.connection().execute(
        insert(SyncEvent.__table__).values(
            tenant_id=tenant_id,
            kind=kind,
            user_ids=None if user_ids is None else sorted(set(user_ids)),
            created_at=utcnow(),
        )
    )


def unapplied(session: Session, tenant_id: str, limit: int) -> list[tuple[int, str, list[str] | None]]:
    """Up to `limit` of the tenant's unapplied events, oldest first: (id, kind, user ids or None)."""
    return [
        (event_id, kind, user_ids)
        for event_id, kind, user_ids in session.execute(
            select(SyncEvent.id, SyncEvent.kind, SyncEvent.user_ids)
            .where(SyncEvent.tenant_id == tenant_id, SyncEvent.applied_at.is_(None))
            .order_by(SyncEvent.id)
            .limit(limit)
        )
    ]


def mark_applied(session: Session, event_ids: Sequence[int], now: datetime) -> None:
    """Mark these events applied (by id, never by watermark)."""
    for chunk in chunks(list(event_ids)):
        session.execute(update(SyncEvent).where(SyncEvent.id.in_(chunk)).values(applied_at=now))


def oldest_unapplied(session: Session) -> list[tuple[str, datetime]]:
    """(tenant id, oldest unapplied event's time) of every tenant with events left to apply."""
    return [
        (tenant_id, oldest)
        for tenant_id, oldest in session.execute(
            select(SyncEvent.tenant_id, func.min(SyncEvent.created_at))
            .where(SyncEvent.applied_at.is_(None))
            .group_by(SyncEvent.tenant_id)
        )
    ]


def counts(session: Session, tenant_id: str) -> tuple[int, int]:
    """(events recorded, events applied) of a tenant."""
    total, applied = session.execute(
        select(func.count(), func.count(SyncEvent.applied_at)).where(SyncEvent.tenant_id == tenant_id)
    ).one()
    return total, applied


def naming_user(session: Session, tenant_id: str, user_id: str, limit: int) -> list[tuple[str, datetime, datetime | None]]:
    """The newest `limit` events that name this user: (kind, created_at, applied_at), newest first.

    A read for the admin's user page, never on the SCIM path: user_ids is a JSON
    list, so its text holds the id in quotes; the tenant's index narrows the scan.
    """
    pattern = '%"' + user_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + '"%'
    return [
        (kind, created_at, applied_at)
        for kind, created_at, applied_at in session.execute(
            select(SyncEvent.kind, SyncEvent.created_at, SyncEvent.applied_at)
            .where(SyncEvent.tenant_id == tenant_id, cast(SyncEvent.user_ids, String).like(pattern, escape="\\"))
            .order_by(SyncEvent.id.desc())
            .limit(limit)
        )
    ]
