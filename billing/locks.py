"""Per-tenant serialisation of reconcile and purchases."""

from __future__ import annotations

import hashlib

from sqlalchemy import text
from sqlmodel import Session

from models.db import is_postgres


def tenant_lock_key(tenant_id: str) -> int:
    """A stable signed 64-bit key for pg_advisory_xact_lock."""
    return int.from_bytes(hashlib.sha256(f"sally-tenant:{tenant_id}".encode()).digest()[:8], "big", signed=True)


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Hold the tenant's lock until the transaction ends.

    PostgreSQL: a transaction-scoped advisory lock (the tenant row itself
    stays free, so SCIM requests never wait on a reconcile). SQLite: every
    write transaction starts with BEGIN IMMEDIATE (models.db), which already
    serialises writers across threads and processes.
    """
    if is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": tenant_lock_key(tenant_id)})


def try_lock_tenant(session: Session, tenant_id: str) -> bool:
    """Take the tenant's lock if it is free; False when another transaction holds it.

    On SQLite the write transaction already holds the database's one write lock.
    """
    if is_postgres(session):
        return bool(
            session.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": tenant_lock_key(tenant_id)}).scalar()
        )
    return True
