"""reconcile: a tenant's unapplied events → access, role, tier → seats → purchase and invitations."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from sqlalchemy import and_, insert, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from billing.gateway import Gateway
from billing.licenses import Entitlement, GroupMapping, entitlement
from billing.locks import try_lock_tenant
from billing.seats import allocate, change_held
from models.db import chunks, session_scope
from models.directory import events as directory_events
from models.directory.members import group_ids_of_users
from models.directory.users import NO_ADDRESS, invitation_address, users_by_id
from models.settings import TIERS, Settings
from models.tables import ACCOUNT_HELD, Account, AccountHistory, ScimUser, Tenant, as_utc, utcnow
from models.tables import GroupMapping as MappingRow
from workers import deprovision
from workers.invitations import Wanted, queue_invitations, replan_waiting

BATCH_EVENTS = 5000
CONFIG_CHANGED = "config_changed"
USER_REMOVED = "user_removed"


def history_row(account: Account, now: datetime) -> dict[str, Any]:
    """One AccountHistory row: the account's outcome as the pipeline just left it."""
    return {
        "tenant_id": account.tenant_id, "user_id": account.user_id, "created_at": now,
        "role": account.role, "license": account.license, "status": account.status,
        "status_reason": account.status_reason,
    }


@dataclass
class ReconcileResult:
    busy: bool = False
    applied: int = 0
    more: bool = False
    purchase_id: str | None = None
    needs_seat_sync: bool = False
    invitation_ids: list[str] = field(default_factory=list)


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
            "license_groups": {tier: slots.get(tier, []) for tier in TIERS},
        }
    )
    return tenant, mapping


@dataclass(frozen=True)
class _Batch:
    """The events one run applies, as (id, kind, user ids or None for the whole tenant)."""

    events: list[tuple[int, str, list[str] | None]]

    @property
    def ids(self) -> list[int]:
        return [event_id for event_id, _, _ in self.events]

    @property
    def kinds(self) -> list[str]:
        return sorted({kind for _, kind, _ in self.events})

    @property
    def user_ids(self) -> list[str] | None:
        """The users to re-evaluate; None when an event is about the whole tenant."""
        if any(ids is None for _, _, ids in self.events):
            return None
        return sorted({uid for _, _, ids in self.events for uid in ids or ()})

    @property
    def removed_by_admin(self) -> set[str]:
        """The users the admin removed by hand (DELETE …/users/{id})."""
        return {uid for _, kind, ids in self.events if kind == USER_REMOVED for uid in ids or ()}

    @property
    def named(self) -> set[str]:
        """The users some event names one by one (an IdP change about them, not a whole-tenant event)."""
        return {uid for _, _, ids in self.events if ids is not None for uid in ids}


@dataclass
class _Directory:
    """The users a batch is about, the groups each is a direct member of, and their accounts."""

    users: dict[str, ScimUser]
    memberships: dict[str, set[str]]
    accounts: dict[str, Account]


class Reconciler:
    """Applies a tenant's events one by one (never by watermark), under the tenant's lock."""

    def __init__(
        self,
        engine: Engine,
        gateway: Gateway,
        clock: Callable[[], datetime] = utcnow,
        settings: Settings | None = None,
    ) -> None:
        self.engine = engine
        self.gateway = gateway
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
            events = directory_events.unapplied(session, tenant_id, batch + 1)
            result.more = len(events) > batch
            work = _Batch(list(events[:batch]))
            if not work.events:
                return result
            tenant, mapping = load_tenant(session, tenant_id)
            if tenant is None:
                return result
            self._apply(session, tenant, mapping, work, self.clock(), result)
        return result

    def _apply(
        self, session: Session, tenant: Tenant, mapping: GroupMapping, work: _Batch, now: datetime,
        result: ReconcileResult,
    ) -> None:
        """One batch, in the caller's transaction: accounts, invitations, seats, then the events marked applied."""
        config_changed = CONFIG_CHANGED in work.kinds
        if config_changed:
            # The admin saved the mapping: a refused purchase may be tried again.
            tenant.billing_blocked = None
        result.invitation_ids = self._evaluate(
            session, tenant, mapping, work.user_ids, now, work.named, work.removed_by_admin
        )
        if config_changed:
            # The daily invitation cap may have changed: the waiting ones are planned again.
            result.invitation_ids += replan_waiting(session, tenant.id, now, daily_cap=self._daily_cap(tenant))
        self._allocate(session, tenant, work, now, result)
        directory_events.mark_applied(session, work.ids, now)
        tenant.last_reconciled_at = now
        session.add(tenant)
        result.applied = len(work.ids)

    def _allocate(self, session: Session, tenant: Tenant, work: _Batch, now: datetime, result: ReconcileResult) -> None:
        """Seats for the accounts as they now are: grants, waiting users, and at most one purchase planned."""
        allocation = allocate(session, tenant, now, gateway=self.gateway, trigger="SCIM sync: " + ", ".join(work.kinds))
        result.purchase_id = allocation.purchase_id
        result.needs_seat_sync = allocation.needs_seat_sync

    def _daily_cap(self, tenant: Tenant) -> int:
        return tenant.invite_daily_cap or self.settings.invite_daily_cap

    def _evaluate(
        self,
        session: Session,
        tenant: Tenant,
        mapping: GroupMapping,
        user_ids: list[str] | None,
        now: datetime,
        named: set[str] | frozenset[str] = frozenset(),
        removed_by_admin: set[str] | frozenset[str] = frozenset(),
    ) -> list[str]:
        """Recompute role and wanted tier of the given users (None = all); returns the invitation ids due now."""
        directory = self._read(session, tenant, mapping, user_ids)
        entitlements = {
            user.id: entitlement(user.active and user.deleted_at is None, directory.memberships.get(user.id, set()),
                                 mapping)
            for user in directory.users.values()
        }
        breaker = deprovision.Breaker(directory.accounts, entitlements, set(named), set(removed_by_admin))
        held, reason = deprovision.decide(
            session, tenant, deprovision.HoldPolicy.for_tenant(tenant, self.settings), breaker.removals(), now
        )
        wanted: list[Wanted] = []
        history: list[dict[str, Any]] = []
        # Seats given back per tier (change_held keeps the count beside the seats bought).
        freed: dict[str, int] = {}
        for user in directory.users.values():
            ent = entitlements[user.id]
            account = directory.accounts.get(user.id)
            if account is None:
                if ent.role is None and user.deleted_at is not None:
                    continue
                account = Account(user_id=user.id, tenant_id=tenant.id, status="no_access", updated_at=now)
            elif breaker.keeps(account, ent, held, reason, now):
                if account.status == ACCOUNT_HELD and account.held_since == now:
                    history.append(history_row(account, now))  # newly held by the breaker
                continue
            outcome_before = (account.role, account.license, account.status, account.status_reason)
            invite = self._update_account(session, tenant, account, user, ent, now, new=user.id not in directory.accounts)
            if outcome_before[1] is not None and outcome_before[1] != account.license:
                # Only ever to None here (allocation grants seats): one fewer held.
                freed[outcome_before[1]] = freed.get(outcome_before[1], 0) - 1
            outcome = (account.role, account.license, account.status, account.status_reason)
            # A user now waiting for a seat is written by allocate(), which decides grant or reason.
            if account.status != "pending_license" and outcome != outcome_before:
                history.append(history_row(account, now))
            if invite is not None:
                wanted.append(invite)
        session.flush()
        change_held(session, tenant.id, freed, now)
        if history:
            session.execute(insert(AccountHistory), history)
        # Oldest user first, whatever order the database read them in: of users sharing an address
        # the first created is the one invited, and a daily cap lets the earliest through first.
        wanted.sort(key=lambda one: (as_utc(directory.users[one.user_id].created_at), one.user_id))
        return queue_invitations(session, tenant.id, wanted, now, daily_cap=self._daily_cap(tenant))

    def _read(self, session: Session, tenant: Tenant, mapping: GroupMapping, user_ids: list[str] | None) -> _Directory:
        """The users to evaluate (None = all of the tenant), their direct groups and their accounts."""
        accounts: dict[str, Account] = {}
        gives_access = bool(mapping.user_groups or mapping.admin_groups)
        if not gives_access and user_ids is not None and not _has_accounts(session, tenant.id):
            # An IdP's first cycle before the admin maps anything: no group gives access
            # and nobody has an account, so no named user can change (below, only users
            # with an account are read). One indexed probe instead of a lookup per named
            # user: a burst of 1,000-member PATCHes costs the worker almost nothing.
            return _Directory({}, {}, {})
        if user_ids is None:
            accounts = {a.user_id: a for a in session.execute(select(Account).where(Account.tenant_id == tenant.id)).scalars()}
        else:
            for chunk in chunks(user_ids):
                accounts.update(
                    (a.user_id, a) for a in session.execute(select(Account).where(Account.user_id.in_(chunk))).scalars()
                )
        if not gives_access:
            # No group gives access yet (an IdP's first cycle, before the admin maps
            # anything): only users who had an account can change, so only they are
            # read; a 1,000-member PATCH then costs the worker no user documents.
            user_ids = sorted(accounts)
        users: dict[str, ScimUser] = users_by_id(session, tenant.id, user_ids)
        memberships = group_ids_of_users(session, tenant.id, user_ids)
        return _Directory(users, memberships, accounts)

    def _update_account(
        self, session: Session, tenant: Tenant, account: Account, user: ScimUser, ent: Entitlement, now: datetime,
        *, new: bool,
    ) -> Wanted | None:
        """Bring one account in line with its entitlement; returns the invitation it now calls for, if any."""
        before = _state(account)
        if ent.role is None:
            _lose_access(account, deleted=user.deleted_at is not None, now=now)
            invite = None
        else:
            invite = _grant_access(account, user, ent, tenant, now)
        if _state(account) != before or new:
            account.updated_at = now
            session.add(account)
        return invite


def _has_accounts(session: Session, tenant_id: str) -> bool:
    """Whether any user of the tenant has an account yet."""
    return session.execute(select(Account.user_id).where(Account.tenant_id == tenant_id).limit(1)).first() is not None


def _state(account: Account) -> tuple:
    return (account.role, account.wanted_tier, account.license, account.status, account.status_reason,
            account.waiting_since, account.first_access_at, account.invite_error, account.hold_decision)


def _lose_access(account: Account, *, deleted: bool, now: datetime) -> None:
    """No role: the license is freed at once (a removal the admin confirmed is not counted by the breaker)."""
    if account.role is not None and account.hold_decision is None:
        # The breaker adds up the removals of its window.
        account.access_removed_at = now
    account.held_since = account.hold_decision = None
    account.role = None
    account.wanted_tier = None
    account.license = None
    account.waiting_since = None
    account.status = "deleted" if deleted else "no_access"
    account.status_reason = None


def _grant_access(account: Account, user: ScimUser, ent: Entitlement, tenant: Tenant, now: datetime) -> Wanted | None:
    """A role, and the tier's seat if held (else waiting for one); the first access calls for an invitation."""
    account.held_since = account.hold_decision = None
    account.role = ent.role
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
    if account.first_access_at is not None:
        return None
    account.first_access_at = now
    if not tenant.auto_invite:
        return None
    address = invitation_address(user)
    if address is None:
        account.invite_error = NO_ADDRESS
        return None
    return Wanted(user.id, address)
