"""reconcile: a tenant's unapplied events → access, role, tier → seats → purchase and invitations."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from billing.gateway import Gateway
from billing.licenses import GroupMapping, entitlement
from billing.locks import try_lock_tenant
from billing.seats import allocate, change_held
from models.db import chunks, insert_ignore, session_scope
from models.directory import events as directory_events
from models.directory.members import group_ids_of_users
from models.directory.users import NO_ADDRESS, invitation_address, users_by_id
from models.settings import TIERS
from models.tables import (
    Account,
    AccountHistory,
    Invitation,
    ScimUser,
    Tenant,
    utcnow,
)
from models.tables import (
    GroupMapping as MappingRow,
)
from workers.mailer import message_id

BATCH_EVENTS = 5000


@dataclass
class ReconcileResult:
    busy: bool = False
    applied: int = 0
    more: bool = False
    purchase_id: str | None = None
    needs_seat_sync: bool = False
    invitation_ids: list[str] = field(default_factory=list)


def history_row(account: Account, now: datetime) -> dict[str, Any]:
    """One AccountHistory row: the account's outcome as the pipeline just left it."""
    return {
        "tenant_id": account.tenant_id, "user_id": account.user_id, "created_at": now,
        "role": account.role, "license": account.license, "status": account.status,
        "status_reason": account.status_reason,
    }


def load_tenant(session: Session, tenant_id: str) -> tuple[Tenant | None, GroupMapping]:
    """The tenant and its mapping in ONE statement: one snapshot, so an admin's PUT (which
    writes both in one transaction) is seen whole or not at all, never the new mapping
    with the old auto_invite or seat_cap."""
    tenant: Tenant | None = None
    slots: dict[str, list[str]] = {}
    for row_tenant, group_id, slot in session.execute(
        select(Tenant, MappingRow.group_id, MappingRow.slot)
        .outerjoin(MappingRow, MappingRow.tenant_id == Tenant.id)
        .where(Tenant.id == tenant_id)
    ):
        tenant = row_tenant
        if group_id is not None:
            slots.setdefault(slot, []).append(group_id)
    mapping = GroupMapping.from_config(
        {
            "user_groups": slots.get("user", []),
            "admin_groups": slots.get("admin", []),
            "license_groups": {tier: slots.get(tier, []) for tier in TIERS},
        }
    )
    return tenant, mapping


class Reconciler:
    """Applies a tenant's events one by one (never by watermark), under the tenant's lock."""

    def __init__(self, engine: Engine, gateway: Gateway, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.gateway = gateway
        self.clock = clock

    def run(
        self, tenant_id: str, batch: int = BATCH_EVENTS, on_locked: Callable[[], None] | None = None
    ) -> ReconcileResult:
        """Apply up to `batch` events; `busy` when another reconcile of the tenant holds its lock."""
        result = ReconcileResult()
        with session_scope(self.engine) as session:
            if not try_lock_tenant(session, tenant_id):
                # Waiting here would tie up a worker thread per queued message
                # during a burst; the caller sends the message again, a bit later.
                result.busy = True
                return result
            if on_locked is not None:
                on_locked()
            # The events first, then what they refer to (the tenant's settings, the
            # mapping, the users): under READ COMMITTED every statement sees all the
            # commits before it, so an admin change whose event we apply is one whose
            # auto_invite and seat_cap we also see. Read the other way round, a mapping
            # saved in between would be applied with the old settings and marked done.
            # (SQLite's BEGIN IMMEDIATE serialises writers: there the order is moot.)
            events = directory_events.unapplied(session, tenant_id, batch + 1)
            result.more = len(events) > batch
            events = events[:batch]
            if not events:
                return result
            tenant, mapping = load_tenant(session, tenant_id)
            if tenant is None:
                return result
            now = self.clock()
            if any(kind == "config_changed" for _, kind, _ in events):
                # The admin saved the mapping: a refused purchase may be tried again.
                tenant.billing_blocked = None
            everyone = any(user_ids is None for _, _, user_ids in events)
            user_ids = None if everyone else sorted({uid for _, _, ids in events for uid in ids})
            result.invitation_ids = self._evaluate(session, tenant, mapping, user_ids, now)
            triggers = sorted({kind for _, kind, _ in events})
            allocation = allocate(
                session, tenant, now,
                gateway=self.gateway,
                trigger="SCIM sync: " + ", ".join(triggers),
            )
            result.purchase_id = allocation.purchase_id
            result.needs_seat_sync = allocation.needs_seat_sync
            ids = [event_id for event_id, _, _ in events]
            directory_events.mark_applied(session, ids, now)
            tenant.last_reconciled_at = now
            session.add(tenant)
            result.applied = len(ids)
        return result

    def _evaluate(
        self, session: Session, tenant: Tenant, mapping: GroupMapping, user_ids: list[str] | None, now: datetime
    ) -> list[str]:
        """Recompute role and wanted tier of the given users (None = all); returns new invitation ids."""
        users: dict[str, ScimUser] = users_by_id(session, tenant.id, user_ids)
        memberships = group_ids_of_users(session, tenant.id, user_ids)
        accounts: dict[str, Account] = {}
        if user_ids is None:
            accounts = {a.user_id: a for a in session.execute(select(Account).where(Account.tenant_id == tenant.id)).scalars()}
        else:
            for chunk in chunks(user_ids):
                accounts.update(
                    (a.user_id, a) for a in session.execute(select(Account).where(Account.user_id.in_(chunk))).scalars()
                )

        if not (mapping.user_groups or mapping.admin_groups):
            # No group gives access yet (an IdP's first cycle, before the admin maps
            # anything): only users who had an account can change.
            users = {uid: user for uid, user in users.items() if uid in accounts}
        invitations: list[dict[str, Any]] = []
        history: list[dict[str, Any]] = []
        freed: dict[str, int] = {}
        for user in users.values():
            deleted = user.deleted_at is not None
            ent = entitlement(user.active and not deleted, memberships.get(user.id, set()), mapping)
            account = accounts.get(user.id)
            if account is None:
                if ent.role is None and deleted:
                    continue
                account = Account(user_id=user.id, tenant_id=tenant.id, status="no_access", updated_at=now)
            before = (account.role, account.wanted_tier, account.license, account.status,
                      account.status_reason, account.waiting_since, account.first_access_at, account.invite_error)
            account.role = ent.role
            if ent.role is None:
                # Losing access frees the license at once.
                account.wanted_tier = None
                account.license = None
                account.waiting_since = None
                account.status = "deleted" if deleted else "no_access"
                account.status_reason = None
            else:
                if ent.tier != account.wanted_tier:
                    account.waiting_since = None
                account.wanted_tier = ent.tier
                if account.license is not None and account.license != ent.tier:
                    # A tier change gives back the old seat; the new one is allocated below.
                    account.license = None
                if ent.tier is None or account.license == ent.tier:
                    account.status = "active"
                    account.status_reason = None
                    account.waiting_since = None
                else:
                    account.waiting_since = account.waiting_since or now
                    account.status = "pending_license"
                if account.first_access_at is None:
                    account.first_access_at = now
                    if tenant.auto_invite:
                        address = invitation_address(user)
                        if address is None:
                            account.invite_error = NO_ADDRESS
                        else:
                            invitations.append({"user_id": user.id, "address": address})
            after = (account.role, account.wanted_tier, account.license, account.status,
                     account.status_reason, account.waiting_since, account.first_access_at, account.invite_error)
            if before[2] is not None and before[2] != account.license:
                # Only ever to None here (allocation grants seats): one fewer held.
                freed[before[2]] = freed.get(before[2], 0) - 1
            if after != before or account.user_id not in accounts:
                account.updated_at = now
                session.add(account)
                outcome = (account.role, account.license, account.status, account.status_reason)
                # A user now waiting for a seat is written by allocate(), which decides grant or reason.
                if account.status != "pending_license" and outcome != (before[0], before[2], before[3], before[4]):
                    history.append(history_row(account, now))
        session.flush()
        change_held(session, tenant.id, freed, now)
        if history:
            session.execute(insert(AccountHistory), history)
        return self._queue_invitations(session, tenant.id, invitations, now)

    def _queue_invitations(self, session: Session, tenant_id: str, wanted: list[dict[str, Any]], now: datetime) -> list[str]:
        """Invitation rows in this commit (once per user for the tenant's life, by a unique index)."""
        if not wanted:
            return []
        created: list[str] = []
        rows = [
            {
                "id": f"inv{row['user_id']}",
                "tenant_id": tenant_id,
                "user_id": row["user_id"],
                "status": "pending",
                "address": row["address"][:512],
                "message_id": message_id(tenant_id, row["user_id"]),
                "attempts": 0,
                "created_at": now,
                "enqueued_at": now,
            }
            for row in wanted
        ]
        for chunk in chunks(rows):
            statement = (
                insert_ignore(session)(Invitation)
                .values(list(chunk))
                .on_conflict_do_nothing(index_elements=["tenant_id", "user_id"])
                .returning(Invitation.id)
            )
            created.extend(inv_id for (inv_id,) in session.execute(statement))
        return created

