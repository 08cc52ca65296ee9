"""The mass-deprovision circuit breaker: a sync that would take access from too many users at once is held.

An IdP that deletes a mapped group, or a bad sync that deactivates half the
directory, must not lock a customer out of Sally in one reconcile. When the
removals of access a reconcile would apply (plus those applied within the
window before it) exceed ``max(min_users, percent % of the active users)``,
those removals are held: the users keep their access and license, their status
is ``held`` with the reason, and an alert waits for the admin, who confirms
(the removals are applied) or reverts (the users keep access until the IdP
next changes them). While a hold is open, every further removal joins it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlmodel import Session

from models.db import chunks
from models.directory.events import record_event
from models.settings import Settings
from models.tables import ACCOUNT_HELD, HOLD_CONFIRM, HOLD_KEEP, Account, Alert, ScimUser, Tenant, as_utc

log = logging.getLogger(__name__)

ALERT_KIND = "mass_deprovision"


@dataclass(frozen=True)
class HoldPolicy:
    """When removals of access are held: more than max(min_users, percent % of active) within window."""

    min_users: int = 10
    percent: int = 20
    window: timedelta = timedelta(hours=1)

    @classmethod
    def for_tenant(cls, tenant: Tenant, settings: Settings) -> HoldPolicy:
        """The tenant's own thresholds where it set them, else the deployment's."""
        return cls(
            min_users=settings.hold_min_users if tenant.hold_min_users is None else tenant.hold_min_users,
            percent=settings.hold_percent if tenant.hold_percent is None else tenant.hold_percent,
            window=timedelta(seconds=settings.hold_window),
        )

    def may_trip(self, removals: int) -> bool:
        """Whether ``removals`` could trip the breaker in a tenant of any size: more than min_users (pure)."""
        return removals > self.min_users

    def trips(self, removals: int, active: int) -> bool:
        """Whether ``removals`` out of ``active`` users is more than max(min_users, percent %) (pure)."""
        return self.may_trip(removals) and removals * 100 > self.percent * active


class Breaker:
    """One reconcile's view of the breaker: which removals are new (to count), which accounts stay as they are."""

    def __init__(
        self,
        accounts: dict[str, Account],
        entitlements: dict[str, Any],
        named: set[str],
        removed_by_admin: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        self.accounts = accounts
        self.entitlements = entitlements
        # Users an event of this batch names one by one: an IdP change about them ends a revert's keep.
        self.named = named
        # Users the admin removed by hand (DELETE …/users/{id}): the admin's own decision, never held.
        self.removed_by_admin = removed_by_admin

    def _kept(self, account: Account) -> bool:
        return account.hold_decision == HOLD_KEEP and account.user_id not in self.named

    def removals(self) -> list[str]:
        """Users who have access, would lose it now, and are neither held already nor decided by the admin."""
        out = []
        for user_id, ent in self.entitlements.items():
            account = self.accounts.get(user_id)
            if account is None or account.role is None or ent.role is not None:
                continue
            if account.status == ACCOUNT_HELD or account.hold_decision == HOLD_CONFIRM or self._kept(account):
                continue
            if user_id in self.removed_by_admin:
                continue
            out.append(user_id)
        return sorted(out)

    def keeps(self, account: Account, ent: Any, held: set[str], reason: str | None, now: datetime) -> bool:
        """Whether this account stays as it is (its removal held, or kept by a revert); marks the newly held."""
        if ent.role is not None or account.role is None or account.hold_decision == HOLD_CONFIRM:
            return False  # access again (any hold ends), nothing to remove, or the admin confirmed
        if account.user_id in self.removed_by_admin:
            account.hold_decision = HOLD_CONFIRM  # removed by hand: applied, and not counted by the breaker
            return False
        if self._kept(account) or account.status == ACCOUNT_HELD:
            return True
        if account.user_id in held:
            account.status = ACCOUNT_HELD
            account.status_reason = (reason or "")[:1024]
            account.held_since = now
            account.updated_at = now
            return True
        return False


def hold_reason(removals: int, active: int, policy: HoldPolicy) -> str:
    """The status_reason of a held user (and the alert's message)."""
    return (
        f"Removal of access held: the directory would remove access from {removals} of {active} active users "
        f"(more than max({policy.min_users}, {policy.percent}%)). An admin must confirm or revert it "
        "(POST …/holds/confirm or …/holds/revert)."
    )


def decide(
    session: Session, tenant: Tenant, policy: HoldPolicy, removals: list[str], now: datetime
) -> tuple[set[str], str | None]:
    """Which of these removals of access to hold, and the reason; records or updates the tenant's alert.

    ``removals`` are users who have access now and would lose it, not held yet
    and not confirmed by the admin. Runs under the tenant's reconcile lock.
    """
    if not removals:
        return set(), None
    open_alert = session.execute(
        select(Alert).where(Alert.tenant_id == tenant.id, Alert.kind == ALERT_KIND, Alert.resolved_at.is_(None))
        .order_by(Alert.created_at).limit(1)
    ).scalars().first()
    # Removals applied a moment ago count too: a mass deletion that arrives as
    # one DELETE per user is reconciled in many small batches.
    recent = session.execute(
        select(func.count()).where(
            Account.tenant_id == tenant.id, Account.access_removed_at.is_not(None),
            Account.access_removed_at > now - policy.window,
        )
    ).scalar_one()
    total = len(removals) + recent
    if open_alert is None and not policy.may_trip(total):
        # Cannot trip whatever the tenant's size: the count of its active users (every
        # account of a 100,000-user tenant) is not needed for one user leaving a group.
        return set(), None
    if open_alert is None:
        active = session.execute(
            select(func.count()).where(Account.tenant_id == tenant.id, Account.role.is_not(None))
        ).scalar_one()
        baseline = active + recent
        if not policy.trips(total, baseline):
            return set(), None
        reason = hold_reason(total, baseline, policy)
        session.add(Alert(
            tenant_id=tenant.id, kind=ALERT_KIND, message=reason[:1024], created_at=now,
            detail={"removals": total, "active": baseline, "min_users": policy.min_users, "percent": policy.percent},
        ))
        log.warning("tenant %s: %d removals of access held for the admin (%d active)", tenant.id, total, baseline)
    else:
        detail = dict(open_alert.detail or {})
        detail["joined"] = int(detail.get("joined", 0)) + len(removals)
        open_alert.detail = detail
        session.add(open_alert)
        reason = open_alert.message
    return set(removals), reason


def holds(session: Session, tenant_id: str) -> dict[str, Any]:
    """What the admin sees: the held users and the open alerts."""
    held = session.execute(
        select(ScimUser.id, ScimUser.user_name, Account.held_since, Account.status_reason)
        .join(Account, Account.user_id == ScimUser.id)
        .where(Account.tenant_id == tenant_id, Account.status == ACCOUNT_HELD)
        .order_by(Account.held_since, ScimUser.id)
    ).all()
    alerts = session.execute(
        select(Alert).where(Alert.tenant_id == tenant_id, Alert.resolved_at.is_(None)).order_by(Alert.created_at)
    ).scalars()
    return {
        "held": [
            {"id": user_id, "userName": name, "since": _iso(since), "reason": reason}
            for user_id, name, since, reason in held
        ],
        "alerts": [
            {"id": a.id, "kind": a.kind, "message": a.message, "created_at": _iso(a.created_at), "detail": a.detail}
            for a in alerts
        ],
    }


def confirm(session: Session, tenant_id: str, now: datetime) -> list[str]:
    """The admin confirms: the held removals are applied by the next reconcile (a sync event names them)."""
    user_ids = _held(session, tenant_id)
    for chunk in chunks(user_ids):
        session.execute(
            update(Account).where(Account.user_id.in_(chunk), Account.status == ACCOUNT_HELD)
            .values(hold_decision=HOLD_CONFIRM, updated_at=now)
        )
    if user_ids:
        record_event(session, tenant_id, "holds_confirmed", user_ids)
    _resolve(session, tenant_id, "confirmed", now)
    return user_ids


def revert(session: Session, tenant_id: str, now: datetime) -> list[str]:
    """The admin reverts: the held users keep their access (and license) until the IdP next changes them."""
    user_ids = _held(session, tenant_id)
    for chunk in chunks(user_ids):
        for account in session.execute(select(Account).where(Account.user_id.in_(chunk))).scalars():
            account.hold_decision = HOLD_KEEP
            account.held_since = None
            account.status_reason = None
            waiting = account.wanted_tier is not None and account.license != account.wanted_tier
            account.status = "pending_license" if waiting else "active"
            account.updated_at = now
            session.add(account)
    _resolve(session, tenant_id, "reverted", now)
    return user_ids


def _held(session: Session, tenant_id: str) -> list[str]:
    return list(session.execute(
        select(Account.user_id).where(Account.tenant_id == tenant_id, Account.status == ACCOUNT_HELD).order_by(Account.user_id)
    ).scalars())


def _resolve(session: Session, tenant_id: str, resolution: str, now: datetime) -> None:
    session.execute(
        update(Alert).where(Alert.tenant_id == tenant_id, Alert.kind == ALERT_KIND, Alert.resolved_at.is_(None))
        .values(resolved_at=now, resolution=resolution)
    )


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return as_utc(moment).isoformat(timespec="seconds").replace("+00:00", "Z")
