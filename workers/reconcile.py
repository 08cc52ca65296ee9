"""reconcile: a tenant's unapplied events → access, role, tier → seats → purchase and invitations."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterable, Sequence

from sqlalchemy import and_, select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from billing.licenses import GroupMapping, entitlement
from billing.locks import try_lock_tenant
from billing.seats import allocate, billed
from models.db import session_scope
from models.settings import Settings
from models.tables import (
    Account,
    GroupMember,
    ScimUser,
    SyncEvent,
    Tenant,
    utcnow,
)
from models.tables import (
    GroupMapping as MappingRow,
)
from workers import deprovision
from workers.invitations import Wanted, queue_invitations, replan_waiting

BATCH_EVENTS = 5000
CHUNK = 500
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
NO_ADDRESS = "No email address: the user has no emails and a userName that is not an address."


@dataclass
class ReconcileResult:
    busy: bool = False
    applied: int = 0
    more: bool = False
    purchase_id: str | None = None
    needs_seat_sync: bool = False
    invitation_ids: list[str] = field(default_factory=list)


def invitation_address(user: ScimUser) -> str | None:
    """Primary email, else the first email, else userName when it is an address (CONTRACT.md)."""
    emails = [e for e in user.data.get("emails") or [] if isinstance(e, dict) and isinstance(e.get("value"), str)]
    for email in emails:
        if email.get("primary") is True and email["value"].strip():
            return email["value"].strip()
    for email in emails:
        if email["value"].strip():
            return email["value"].strip()
    return user.user_name if EMAIL.match(user.user_name) else None


def _chunks(items: Sequence[str], size: int = CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def load_tenant(session: Session, tenant_id: str) -> tuple[Tenant | None, GroupMapping]:
    """The tenant and its mapping in ONE statement: one snapshot, so an admin's PUT (which
    writes both in one transaction) is seen whole or not at all, never the new mapping
    with the old auto_invite or seat_cap."""
    tenant: Tenant | None = None
    slots: dict[str, list[str]] = {}
    for row_tenant, group_id, slot in session.execute(
        select(Tenant, MappingRow.group_id, MappingRow.slot)
        # Tombstones of groups the IdP deleted map nothing until the group comes back.
        .outerjoin(MappingRow, and_(MappingRow.tenant_id == Tenant.id, MappingRow.deleted_at.is_(None)))
        .where(Tenant.id == tenant_id)
    ):
        tenant = row_tenant
        if group_id is not None:
            slots.setdefault(slot, []).append(group_id)
    mapping = GroupMapping.from_config(
        {
            "user_groups": slots.get("user", []),
            "admin_groups": slots.get("admin", []),
            "license_groups": {tier: slots.get(tier, []) for tier in ("starter", "team", "enterprise")},
        }
    )
    return tenant, mapping


class Reconciler:
    """Applies a tenant's events one by one (never by watermark), under the tenant's lock."""

    def __init__(
        self,
        engine: Engine,
        *,
        billing_configured: bool,
        clock: Callable[[], datetime] = utcnow,
        settings: Settings | None = None,
    ) -> None:
        self.engine = engine
        self.billing_configured = billing_configured
        self.clock = clock
        # The deployment's defaults of the per-tenant limits (daily invitations, the breaker).
        self.settings = settings or Settings()

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
            events = list(
                session.execute(
                    select(SyncEvent.id, SyncEvent.kind, SyncEvent.user_ids)
                    .where(SyncEvent.tenant_id == tenant_id, SyncEvent.applied_at.is_(None))
                    .order_by(SyncEvent.id)
                    .limit(batch + 1)
                )
            )
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
            named = {uid for _, _, ids in events if ids is not None for uid in ids}
            result.invitation_ids = self._evaluate(session, tenant, mapping, user_ids, now, named)
            if any(kind == "config_changed" for _, kind, _ in events):
                # The daily invitation cap may have changed: the waiting ones are planned again.
                result.invitation_ids += replan_waiting(
                    session, tenant.id, now, daily_cap=tenant.invite_daily_cap or self.settings.invite_daily_cap
                )
            triggers = sorted({kind for _, kind, _ in events})
            allocation = allocate(
                session, tenant, now,
                billing_configured=self.billing_configured,
                trigger="SCIM sync: " + ", ".join(triggers),
            )
            result.purchase_id = allocation.purchase_id
            result.needs_seat_sync = allocation.needs_seat_sync
            ids = [event_id for event_id, _, _ in events]
            for chunk in _chunks(ids):
                session.execute(update(SyncEvent).where(SyncEvent.id.in_(chunk)).values(applied_at=now))
            tenant.last_reconciled_at = now
            session.add(tenant)
            result.applied = len(ids)
        return result

    def _evaluate(
        self,
        session: Session,
        tenant: Tenant,
        mapping: GroupMapping,
        user_ids: list[str] | None,
        now: datetime,
        named: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> list[str]:
        """Recompute role and wanted tier of the given users (None = all); returns new invitation ids.

        ``named``: the users this batch's events name one by one (not "the whole tenant").
        """
        users: dict[str, ScimUser] = {}
        memberships: dict[str, set[str]] = {}
        accounts: dict[str, Account] = {}
        if user_ids is None:
            users = {u.id: u for u in session.execute(select(ScimUser).where(ScimUser.tenant_id == tenant.id)).scalars()}
            for member_id, group_id in session.execute(
                select(GroupMember.member_id, GroupMember.group_id).where(
                    GroupMember.tenant_id == tenant.id, GroupMember.member_type == "User"
                )
            ):
                memberships.setdefault(member_id, set()).add(group_id)
            accounts = {a.user_id: a for a in session.execute(select(Account).where(Account.tenant_id == tenant.id)).scalars()}
        else:
            for chunk in _chunks(user_ids):
                # By primary key alone, the tenant checked here: without planner
                # statistics PostgreSQL may otherwise scan the tenant's userName index.
                users.update(
                    (u.id, u) for u in session.execute(select(ScimUser).where(ScimUser.id.in_(chunk))).scalars()
                    if u.tenant_id == tenant.id
                )
                for member_id, group_id in session.execute(
                    select(GroupMember.member_id, GroupMember.group_id).where(GroupMember.member_id.in_(chunk))
                ):
                    memberships.setdefault(member_id, set()).add(group_id)
                accounts.update(
                    (a.user_id, a) for a in session.execute(select(Account).where(Account.user_id.in_(chunk))).scalars()
                )

        if not (mapping.user_groups or mapping.admin_groups):
            # No group gives access yet (an IdP's first cycle, before the admin maps
            # anything): only users who had an account can change.
            users = {uid: user for uid, user in users.items() if uid in accounts}
        invitations: list[Wanted] = []
        entitlements = {
            user.id: entitlement(user.active and user.deleted_at is None, memberships.get(user.id, set()), mapping)
            for user in users.values()
        }
        breaker = deprovision.Breaker(accounts, entitlements, named)
        held, held_reason = deprovision.decide(
            session, tenant, deprovision.HoldPolicy.for_tenant(tenant, self.settings), breaker.removals(), now
        )
        for user in users.values():
            deleted = user.deleted_at is not None
            ent = entitlements[user.id]
            account = accounts.get(user.id)
            if account is not None and breaker.keeps(account, ent, held, held_reason, now):
                continue
            if account is None:
                if ent.role is None and deleted:
                    continue
                account = Account(user_id=user.id, tenant_id=tenant.id, status="no_access", updated_at=now)
            before = (account.role, account.wanted_tier, account.license, account.status, account.status_reason,
                      account.waiting_since, account.first_access_at, account.invite_error, account.hold_decision)
            if account.role is not None and ent.role is None and account.hold_decision is None:
                # The breaker counts the removals of the last hour.
                account.access_removed_at = now
            account.held_since = account.hold_decision = None
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
                            invitations.append(Wanted(user.id, address))
            after = (account.role, account.wanted_tier, account.license, account.status, account.status_reason,
                     account.waiting_since, account.first_access_at, account.invite_error, account.hold_decision)
            if after != before or account.user_id not in accounts:
                account.updated_at = now
                session.add(account)
        session.flush()
        daily_cap = tenant.invite_daily_cap or self.settings.invite_daily_cap
        return queue_invitations(session, tenant.id, invitations, now, daily_cap=daily_cap)


def seats_need_sync(tenant: Tenant, billing_configured: bool) -> bool:
    return billed(tenant, billing_configured) and tenant.seats_synced_at is None and not tenant.billing_blocked
