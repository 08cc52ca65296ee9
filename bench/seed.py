"""A reconciled tenant of N users written straight into the database, and the cost of one membership change in it.

Used by bench/compare.py for the goal "reconcile of one membership change in a
100,000-user tenant costs at most 2x the same in a 1,000-user tenant": going
through the SCIM API would take minutes to build the big tenant, and what is
measured is the reconcile, not the writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, text
from sqlalchemy.engine import Engine

from models.db import session_scope
from models.tables import (
    Account,
    GroupMapping,
    GroupMember,
    ScimGroup,
    ScimUser,
    SeatCount,
    SyncEvent,
    Tenant,
    new_id,
    utcnow,
)

ROWS_PER_STATEMENT = 5000


@dataclass
class Seeded:
    tenant_id: str
    user_group: str
    license_group: str
    probe_user: str
    size: int


def _insert(engine: Engine, table: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        for start in range(0, len(rows), ROWS_PER_STATEMENT):
            conn.execute(insert(table), rows[start:start + ROWS_PER_STATEMENT])


def seed_tenant(engine: Engine, size: int, *, analyze: bool = True) -> Seeded:
    """`size` users, all in a user group and a starter license group, each holding a starter seat,
    every event applied; plus one probe user in no group (no account yet). `analyze=False` leaves
    PostgreSQL without planner statistics, as a tenant just written by its IdP is before autovacuum."""
    now = utcnow()
    tenant_id = new_id()
    user_group, license_group = new_id(), new_id()
    with engine.begin() as conn:
        conn.execute(insert(Tenant.__table__), {
            "id": tenant_id, "name": f"seed {size}", "created_at": now, "scim_enabled": False,
            "auto_invite": False, "last_reconciled_at": now,
        })
        for gid, name in ((user_group, "Users"), (license_group, "Starter")):
            conn.execute(insert(ScimGroup.__table__), {
                "id": gid, "tenant_id": tenant_id, "display_name": name, "display_name_key": name.casefold(),
                "external_id": None, "data": {}, "version": 1, "created_at": now, "updated_at": now,
            })
        conn.execute(insert(GroupMapping.__table__), [
            {"tenant_id": tenant_id, "group_id": user_group, "slot": "user"},
            {"tenant_id": tenant_id, "group_id": license_group, "slot": "starter"},
        ])
        conn.execute(insert(SeatCount.__table__), [
            {"tenant_id": tenant_id, "tier": tier, "purchased": size + 10 if tier == "starter" else 0, "updated_at": now,
             **({"assigned": size if tier == "starter" else 0} if "assigned" in SeatCount.__table__.c else {})}
            for tier in ("starter", "team", "enterprise")
        ])
    users = [
        {
            "id": new_id(), "tenant_id": tenant_id, "user_name": f"u{i}@seed.example", "user_name_key": f"u{i}@seed.example",
            "external_id": f"x{i}", "display_name": f"User {i}", "active": True,
            "data": {"active": True, "emails": [{"value": f"u{i}@seed.example", "primary": True}]},
            "version": 1, "created_at": now, "updated_at": now, "deleted_at": None,
        }
        for i in range(size + 1)
    ]
    probe = users[-1]["id"]
    _insert(engine, ScimUser.__table__, users)
    members = [u["id"] for u in users[:-1]]
    _insert(engine, GroupMember.__table__, [
        {"group_id": gid, "member_id": mid, "tenant_id": tenant_id, "member_type": "User"}
        for gid in (user_group, license_group) for mid in members
    ])
    _insert(engine, Account.__table__, [
        {"user_id": mid, "tenant_id": tenant_id, "role": "user", "wanted_tier": "starter", "license": "starter",
         "status": "active", "status_reason": None, "waiting_since": None, "first_access_at": now,
         "invited_at": None, "invite_error": None, "updated_at": now}
        for mid in members
    ])
    if analyze and engine.dialect.name == "postgresql":
        # Production runs autovacuum, which analyzes a table after this many new rows.
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("ANALYZE scim_user, group_member, account, sync_event, seat_count")
            )
    return Seeded(tenant_id, user_group, license_group, probe, size)


def _reconciler(engine: Engine) -> Any:
    from billing.gateway import LedgerGateway
    from workers.reconcile import Reconciler

    # Ledger-only billing: the seeded tenants have no Stripe subscription.
    return Reconciler(engine, LedgerGateway())


def _change(engine: Engine, seeded: Seeded, add: bool) -> None:
    """The probe user joins (or leaves) the user and license groups, with its sync event, as a SCIM PATCH would."""
    now = utcnow()
    with session_scope(engine) as session:
        conn = session.connection()
        if add:
            conn.execute(insert(GroupMember.__table__), [
                {"group_id": gid, "member_id": seeded.probe_user, "tenant_id": seeded.tenant_id, "member_type": "User"}
                for gid in (seeded.user_group, seeded.license_group)
            ])
        else:
            conn.execute(delete(GroupMember.__table__).where(GroupMember.__table__.c.member_id == seeded.probe_user))
        conn.execute(insert(SyncEvent.__table__), {
            "tenant_id": seeded.tenant_id, "kind": "group_updated", "user_ids": [seeded.probe_user], "created_at": now,
        })


def time_one_change(engine: Engine, seeded: Seeded, samples: int) -> list[float]:
    """Seconds per reconcile of one membership change (join and leave alternately), after two unmeasured ones."""
    reconciler = _reconciler(engine)
    out: list[float] = []
    for index in range(samples + 2):
        _change(engine, seeded, add=index % 2 == 0)
        started = time.perf_counter()
        result = reconciler.run(seeded.tenant_id)
        elapsed = time.perf_counter() - started
        if result.applied != 1:
            raise RuntimeError(f"reconcile applied {result.applied} events, expected 1")
        if index >= 2:
            out.append(elapsed)
    return out
