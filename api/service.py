"""The admin's operations, shared by the admin API (api/admin.py) and the admin page (api/web/).

Each function runs in the caller's transaction. Every action that changes
something writes its audit row (who, what, when) in that same transaction,
and every change that can alter access appends a sync event there too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlmodel import Session

from api import tenants, views
from api.scim.render import iso
from api.tenants import TenantError
from billing import guard
from billing.licenses import GroupMapping as MappingRule
from billing.licenses import role_for, tier_for
from billing.locks import lock_tenant
from billing.preview import Member, Preview, Price, format_money, preview_mapping
from models.directory import events as directory_events
from models.directory import groups as directory_groups
from models.directory import users as directory_users
from models.directory.events import record_event
from models.directory.members import group_ids_of_users, groups_of, member_counts
from models.settings import TIERS, Settings
from models.tables import (
    Account,
    AccountHistory,
    AuditLog,
    GroupMapping,
    Invitation,
    Purchase,
    ScimUser,
    SeatCount,
    Tenant,
    as_utc,
    utcnow,
)

SLOTS = ("user", "admin", *TIERS)
API_ACTOR = "admin token"
PAGE_ACTOR = "admin session"
CLI_ACTOR = "command line"

# What a sync event that names a user means, for the user's provisioning history.
EVENT_TEXT = {
    "user_created": "Created by the IdP (SCIM)",
    "user_updated": "Updated by the IdP (SCIM)",
    "user_deleted": "Deleted by the IdP (SCIM)",
    "user_removed": "Removed by an admin",
    "group_created": "Put in a new group by the IdP (SCIM)",
    "group_updated": "Group membership changed by the IdP (SCIM)",
}


class AdminError(TenantError):
    """An admin error: {"error": code, "detail": text} with an HTTP status."""


def _iso(moment: datetime | None) -> str | None:
    return iso(moment) if moment is not None else None


# ------------------------------------------------------------------- audit


def audit(session: Session, tenant_id: str, actor: str, action: str, detail: dict[str, Any] | None = None) -> None:
    """Append one audit row in the caller's transaction (never a secret in ``detail``)."""
    session.execute(
        insert(AuditLog).values(tenant_id=tenant_id, actor=actor, action=action, detail=detail, created_at=utcnow())
    )


def audit_rows(session: Session, tenant: Tenant, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
    """The tenant's audit log, newest first."""
    query = (
        select(AuditLog).where(AuditLog.tenant_id == tenant.id).order_by(AuditLog.id.desc()).offset(offset)
    )
    if limit is not None:
        query = query.limit(limit)
    return [
        {"id": row.id, "at": _iso(row.created_at), "actor": row.actor, "action": row.action, "detail": row.detail}
        for row in session.execute(query).scalars()
    ]


# ----------------------------------------------------------------- tenants


def list_tenants(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(select(Tenant).order_by(Tenant.created_at, Tenant.id)).scalars()
    return [
        {
            "tenant_id": t.id, "name": t.name, "created_at": _iso(t.created_at), "scim_enabled": t.scim_enabled,
            "provider": t.provider, "stripe_customer_id": t.stripe_customer_id,
            "stripe_subscription_id": t.stripe_subscription_id, "last_request_at": _iso(t.last_request_at),
        }
        for t in rows
    ]


def create_tenant(
    session: Session, actor: str, name: Any, customer: Any = None, subscription: Any = None
) -> Tenant:
    """Create a tenant (optionally with billing linked), audited."""
    tenant = tenants.create_tenant(session, name, customer, subscription)
    audit(session, tenant.id, actor, "tenant_created", {"name": tenant.name})
    if subscription:
        audit(session, tenant.id, actor, "billing_linked",
              {"stripe_customer_id": customer, "stripe_subscription_id": subscription})
    return tenant


def link_billing(session: Session, actor: str, tenant: Tenant, customer: Any, subscription: Any) -> dict[str, Any]:
    """Link (or change) the tenant's Stripe customer and subscription: "unverified" until a worker checks it.

    Stripe is never called here (DESIGN.md); one tenant per subscription (409
    subscription_in_use), and no change while a purchase is in flight (409).
    """
    tenants.link_billing(session, tenant, customer, subscription)
    audit(session, tenant.id, actor, "billing_linked",
          {"stripe_customer_id": tenant.stripe_customer_id, "stripe_subscription_id": tenant.stripe_subscription_id})
    return views.billing(tenant)


def billing_state(tenant: Tenant) -> dict[str, Any]:
    """The Stripe link and its verification state (not_linked, unverified, verified, invalid)."""
    return views.billing(tenant)


# ---------------------------------------------------------------- purchases


def parse_since(raw: str) -> datetime:
    """A date (2026-12-01) or an ISO 8601 time; naive means UTC (ValueError otherwise)."""
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"'since' must be a date (YYYY-MM-DD) or an ISO 8601 time, got {raw[:40]!r}.") from None
    return as_utc(moment)


def decide_purchase(session: Session, actor: str, tenant: Tenant, purchase_id: str, decision: str) -> dict[str, Any]:
    """Approve, reject or cancel a purchase the spend guard holds (cancel: also one not yet sent), audited."""
    now = utcnow()
    decide = {
        "approve": lambda: guard.approve(session, tenant, purchase_id, now),
        "reject": lambda: guard.stop(session, tenant, purchase_id, now, rejected=True),
        "cancel": lambda: guard.stop(session, tenant, purchase_id, now, rejected=False),
    }[decision]
    # Under the tenant's lock: a purchase job freezing this purchase meanwhile waits for us.
    lock_tenant(session, tenant.id)
    try:
        purchase = decide()
    except LookupError:
        raise AdminError(404, "not_found", f"Purchase '{purchase_id}' not found.") from None
    except guard.PurchaseStateError as error:
        raise AdminError(409, error.code, error.detail) from None
    # The users' reasons follow the decision at the next reconcile.
    record_event(session, tenant.id, "purchase_decided", [])
    audit(session, tenant.id, actor, f"purchase_{DECIDED[decision]}", {"purchase_id": purchase.id})
    return views.purchase_row(purchase)


DECIDED = {"approve": "approved", "reject": "rejected", "cancel": "cancelled"}


# -------------------------------------------------------------------- SCIM


def scim_state(settings: Settings, tenant: Tenant, now: datetime | None = None) -> dict[str, Any]:
    """The connection as the admin sees it, with how long the IdP has been silent."""
    now = now or utcnow()
    silent_hours = None
    if tenant.last_request_at is not None:
        silent_hours = (now - as_utc(tenant.last_request_at)).total_seconds() / 3600
    return {
        "enabled": tenant.scim_enabled,
        "provider": tenant.provider,
        "tenant_url": tenants.tenant_url(settings.public_base_url, tenant.id),
        "last_request_at": _iso(tenant.last_request_at),
        "silent_hours": silent_hours,
        "stale": bool(tenant.scim_enabled and silent_hours is not None and silent_hours >= settings.scim_stale_hours),
    }


def connect_scim(session: Session, settings: Settings, actor: str, tenant: Tenant, provider: Any) -> tenants.Credentials:
    credentials = tenants.connect_scim(session, tenant, provider, settings.public_base_url)
    audit(session, tenant.id, actor, "scim_connected", {"provider": provider})
    return credentials


def rotate_token(session: Session, settings: Settings, actor: str, tenant: Tenant) -> tenants.Credentials:
    credentials = tenants.rotate_token(session, tenant, settings.public_base_url)
    audit(session, tenant.id, actor, "token_rotated")
    return credentials


def disconnect_scim(session: Session, actor: str, tenant: Tenant) -> None:
    was = tenant.scim_enabled
    tenants.disconnect_scim(session, tenant)
    if was:
        audit(session, tenant.id, actor, "scim_disconnected", {"provider": tenant.provider})


# ----------------------------------------------------------------- mapping


def group_rows(session: Session, tenant: Tenant) -> list[dict[str, Any]]:
    rows = directory_groups.groups_by_name(session, tenant.id)
    counts = member_counts(session, [g.id for g in rows])
    return [
        {"id": g.id, "displayName": g.display_name, "externalId": g.external_id, "members": counts[g.id]}
        for g in rows
    ]


def get_config(session: Session, tenant: Tenant, settings: Settings | None = None) -> dict[str, Any]:
    defaults = settings or Settings()
    slots: dict[str, list[str]] = {slot: [] for slot in SLOTS}
    for group_id, slot in session.execute(
        select(GroupMapping.group_id, GroupMapping.slot)
        # Tombstones of groups the IdP deleted are not mapped (until the group comes back).
        .where(GroupMapping.tenant_id == tenant.id, GroupMapping.deleted_at.is_(None))
        .order_by(GroupMapping.slot, GroupMapping.group_id)
    ):
        slots[slot].append(group_id)
    return {
        "user_groups": slots["user"],
        "admin_groups": slots["admin"],
        "license_groups": {tier: slots[tier] for tier in TIERS},
        "auto_invite": tenant.auto_invite,
        "seat_cap": tenant.seat_cap,
        "spend_guard": {
            "enabled": tenant.guard_enabled,
            "min_seats": tenant.guard_min_seats,
            "percent": tenant.guard_percent,
            "first_purchase_seats": tenant.guard_first_purchase,
        },
        # Per-tenant limits; null = the deployment's default (INVITE_DAILY_CAP,
        # DEPROVISION_HOLD_MIN_USERS, DEPROVISION_HOLD_PERCENT), shown in `effective`.
        "invite_daily_cap": tenant.invite_daily_cap,
        "hold_min_users": tenant.hold_min_users,
        "hold_percent": tenant.hold_percent,
        "effective": {
            "invite_daily_cap": tenant.invite_daily_cap or defaults.invite_daily_cap,
            "hold_min_users": _or(tenant.hold_min_users, defaults.hold_min_users),
            "hold_percent": _or(tenant.hold_percent, defaults.hold_percent),
        },
    }


def _check_groups(session: Session, tenant: Tenant, slots: dict[str, list[str]]) -> None:
    group_ids = sorted({gid for ids in slots.values() for gid in ids})
    known = directory_groups.known_group_ids(session, tenant.id, group_ids)
    unknown = [gid for gid in group_ids if gid not in known]
    if unknown:
        raise AdminError(400, "unknown_group", f"Unknown group id(s) for this tenant: {', '.join(unknown[:10])}.")


def save_config(
    session: Session, actor: str, tenant: Tenant, body: dict[str, Any], settings: Settings | None = None
) -> dict[str, Any]:
    """Replace the mapping; a sync event re-evaluates the whole tenant, in the same transaction."""
    wanted = parse_config(body)
    _check_groups(session, tenant, wanted["slots"])
    # Tombstones of groups the IdP deleted stay: re-creating the group restores its slot.
    session.execute(
        delete(GroupMapping).where(GroupMapping.tenant_id == tenant.id, GroupMapping.deleted_at.is_(None))
    )
    rows = [
        {"tenant_id": tenant.id, "group_id": gid, "slot": slot}
        for slot, ids in wanted["slots"].items()
        for gid in sorted(set(ids))
    ]
    if rows:
        session.execute(insert(GroupMapping), rows)
    tenant.auto_invite = wanted["auto_invite"]
    tenant.seat_cap = wanted["seat_cap"]
    # Replaced like the rest of the config: what is left out takes the default (the guard on).
    spend_guard = {**GUARD_DEFAULTS, **(wanted["spend_guard"] or {})}
    tenant.guard_enabled = spend_guard["enabled"]
    tenant.guard_min_seats = spend_guard["min_seats"]
    tenant.guard_percent = spend_guard["percent"]
    tenant.guard_first_purchase = spend_guard["first_purchase_seats"]
    tenant.invite_daily_cap = wanted["invite_daily_cap"]
    tenant.hold_min_users = wanted["hold_min_users"]
    tenant.hold_percent = wanted["hold_percent"]
    session.add(tenant)
    # A mapping change re-evaluates everyone it touches: the whole tenant.
    record_event(session, tenant.id, "config_changed", None)
    session.flush()
    saved = get_config(session, tenant, settings)
    audit(session, tenant.id, actor, "mapping_saved", saved)
    return saved


def preview_config(
    session: Session, settings: Settings, tenant: Tenant, body: dict[str, Any]
) -> tuple[Preview, dict[str, str]]:
    """What saving ``body`` would do, computed over the current directory; nothing is written.

    Returns the preview and the userName of every user in the directory (for showing the changes).
    """
    wanted = parse_config(body)
    _check_groups(session, tenant, wanted["slots"])
    slots = wanted["slots"]
    rule = MappingRule(
        user_groups=frozenset(slots["user"]),
        admin_groups=frozenset(slots["admin"]),
        license_groups={tier: frozenset(slots[tier]) for tier in TIERS},
    )
    # Core rows, not ORM entities: a tenant of 10,000 users is read in three plain queries.
    connection = session.connection()
    memberships = group_ids_of_users(session, tenant.id, None)
    accounts = {
        user_id: (role, tier)
        for user_id, role, tier in connection.execute(
            select(Account.user_id, Account.role, Account.wanted_tier).where(Account.tenant_id == tenant.id)
        ).all()
    }
    no_account = (None, None)
    names: dict[str, str] = {}
    members = []
    for user_id, user_name, active, present in connection.execute(
        select(ScimUser.id, ScimUser.user_name, ScimUser.active, ScimUser.deleted_at.is_(None))
        .where(ScimUser.tenant_id == tenant.id)
    ).all():
        names[user_id] = user_name
        role, tier = accounts.get(user_id, no_account)
        members.append(Member(user_id, bool(active) and bool(present), frozenset(memberships.get(user_id, ())),
                              role, tier))
    purchased = dict.fromkeys(TIERS, 0)
    prices: dict[str, Price] = {}
    for tier, bought, amount, currency in session.execute(
        select(SeatCount.tier, SeatCount.purchased, SeatCount.unit_amount, SeatCount.currency)
        .where(SeatCount.tenant_id == tenant.id)
    ):
        purchased[tier] = bought
        if amount is not None or currency is not None:
            prices[tier] = Price(amount, currency)
    in_flight = session.execute(
        select(Purchase.demand).where(Purchase.tenant_id == tenant.id, Purchase.status == "pending")
    ).scalar_one_or_none()
    if in_flight:
        # Seats a pending purchase is buying now count as bought: a Save would not buy them twice.
        purchased = {tier: max(purchased[tier], int(in_flight.get(tier, 0))) for tier in TIERS}
    billed = bool(settings.stripe_api_key and tenant.stripe_subscription_id)
    return preview_mapping(members, rule, purchased, wanted["seat_cap"], prices, billed=billed), names


def preview_json(preview: Preview, names: dict[str, str]) -> dict[str, Any]:
    """The preview as the admin API answers it, with user names for the changed users."""

    def change(c: Any) -> dict[str, Any]:
        return {"id": c.user_id, "userName": names.get(c.user_id), "role_before": c.role_before,
                "role_after": c.role_after, "license_before": c.tier_before, "license_after": c.tier_after}

    def changes(rows: list[Any]) -> list[dict[str, Any]]:
        return sorted((change(c) for c in rows), key=lambda c: ((c["userName"] or "").casefold(), c["id"]))

    return {
        "gains_access": changes(preview.gains),
        "loses_access": changes(preview.loses),
        "role_changes": changes(preview.role_changes),
        "license_changes": changes(preview.tier_changes),
        "seats": {
            t.tier: {"demand": t.demand, "purchased": t.purchased, "cap": t.cap, "to_buy": t.to_buy,
                     "over_cap": t.over_cap, "unit_amount": t.unit_amount, "currency": t.currency, "cost": t.cost}
            for t in preview.tiers.values()
        },
        "billing": "stripe" if preview.billed else "ledger_only",
        "total": [{"currency": cur, "amount": amount, "display": format_money(amount, cur)}
                  for cur, amount in sorted(preview.totals.items())],
        "unpriced_tiers": preview.unpriced,
    }


# ------------------------------------------------------------------- users


def remove_user(session: Session, actor: str, tenant: Tenant, user_id: str) -> None:
    """Remove a user by hand (after a disconnect); the pipeline frees the license."""
    user = directory_users.get_user_any(session, tenant.id, user_id)
    if user is None:
        raise AdminError(404, "not_found", f"User '{user_id}' not found.")
    if user.deleted_at is None:
        directory_users.delete_user(session, user, kind="user_removed")
        audit(session, tenant.id, actor, "user_removed", {"user_id": user.id, "userName": user.user_name})


def user_page(
    session: Session, tenant: Tenant, query: str | None, page: int, page_size: int
) -> tuple[list[dict[str, Any]], int]:
    """One page of the user list (newest provisioned last), searched by userName, displayName or email."""
    total = views.count_users(session, tenant.id, search=query)
    rows = views.user_rows(session, tenant.id, search=query, limit=page_size, offset=max(0, (page - 1) * page_size))
    return rows, total


def user_detail(session: Session, settings: Settings, tenant: Tenant, user_id: str) -> dict[str, Any]:
    """A user: access, the groups they are in, which gave the role and the tier, history newest first."""
    user = directory_users.get_user_any(session, tenant.id, user_id)
    if user is None:
        raise AdminError(404, "not_found", f"User '{user_id}' not found.")
    row = next(r for r in views.user_rows(session, tenant.id, user_ids=[user.id]))
    groups = groups_of(session, [user.id])[user.id]
    config = get_config(session, tenant)
    rule = MappingRule.from_config(config)
    group_ids = frozenset(gid for gid, _ in groups)
    slots_of: dict[str, list[str]] = {}
    for slot, ids in (("user", config["user_groups"]), ("admin", config["admin_groups"]),
                      *((tier, config["license_groups"][tier]) for tier in TIERS)):
        for gid in ids:
            slots_of.setdefault(gid, []).append(slot)
    role = role_for(user.active and user.deleted_at is None, group_ids, rule)
    tier = tier_for(group_ids, rule) if role is not None else None
    # The group(s) that decide: admin wins over user, the lowest tier wins.
    role_from = [name for gid, name in groups if role and role in slots_of.get(gid, [])]
    tier_from = [name for gid, name in groups if tier and tier in slots_of.get(gid, [])]
    row.update(
        groups=[{"id": gid, "displayName": name, "mapped_as": slots_of.get(gid, [])} for gid, name in groups],
        role_from=role_from,
        license_from=tier_from,
        history=user_history(session, tenant.id, user.id, settings.user_history_limit),
        history_limit=settings.user_history_limit,
    )
    return row


def user_history(session: Session, tenant_id: str, user_id: str, limit: int) -> list[dict[str, Any]]:
    """SCIM writes (sync events naming the user) and pipeline outcomes, newest first, at most ``limit``."""
    # user_ids is a JSON list of hex ids: its text holds the id in quotes.
    # The tenant's index narrows the scan; this is a read for one admin page.
    events = directory_events.naming_user(session, tenant_id, user_id, limit)
    outcomes = session.execute(
        select(AccountHistory)
        .where(AccountHistory.user_id == user_id, AccountHistory.tenant_id == tenant_id)
        .order_by(AccountHistory.id.desc())
        .limit(limit)
    ).scalars().all()
    invitation = session.execute(
        select(Invitation).where(Invitation.tenant_id == tenant_id, Invitation.user_id == user_id)
    ).scalar_one_or_none()
    entries: list[tuple[datetime, int, dict[str, Any]]] = []
    if invitation is not None:
        entries.append((as_utc(invitation.created_at), 2, {
            "at": _iso(invitation.created_at), "source": "invitation", "kind": "invitation_queued",
            "text": f"Invitation queued for {invitation.address}",
        }))
        if invitation.sent_at is not None:
            entries.append((as_utc(invitation.sent_at), 3, {
                "at": _iso(invitation.sent_at), "source": "invitation", "kind": "invitation_sent",
                "text": f"Invitation sent to {invitation.address}",
            }))
        elif invitation.status == "failed" and invitation.error:
            entries.append((as_utc(invitation.created_at), 3, {
                "at": _iso(invitation.created_at), "source": "invitation", "kind": "invitation_failed",
                "text": "Invitation failed", "status_reason": invitation.error,
            }))
    for kind, created_at, applied_at in events:
        entries.append((as_utc(created_at), 0, {
            "at": _iso(created_at), "source": "scim", "kind": kind,
            "text": EVENT_TEXT.get(kind, kind.replace("_", " ")), "applied_at": _iso(applied_at),
        }))
    for h in outcomes:
        entries.append((as_utc(h.created_at), 1, {
            "at": _iso(h.created_at), "source": "pipeline", "kind": "outcome",
            "text": _outcome_text(h.role, h.license, h.status),
            "role": h.role, "license": h.license, "status": h.status, "status_reason": h.status_reason,
        }))
    # Newest first; at the same moment the pipeline's outcome comes after the write that caused it.
    entries.sort(key=lambda e: (e[0], e[1]), reverse=True)
    return [entry for _, _, entry in entries[:limit]]


def _outcome_text(role: str | None, license: str | None, status: str) -> str:
    if status == "active":
        return f"Access as {role}" + (f" with a {license} license" if license else " (no license group)")
    if status == "pending_license":
        return f"Access as {role}, waiting for a license seat"
    if status == "deleted":
        return "No access: deleted"
    return "No access"


# ------------------------------------------------------------------ config parsing


def _id_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdminError(400, "invalid_body", f"'{where}' must be a list of group ids.")
    return value


_DEFAULT = guard.GuardPolicy()
GUARD_DEFAULTS = {"enabled": _DEFAULT.enabled, "min_seats": _DEFAULT.min_seats, "percent": _DEFAULT.percent,
                  "first_purchase_seats": _DEFAULT.first_purchase}
GUARD_FIELDS = {"enabled": bool, "min_seats": int, "percent": int, "first_purchase_seats": int}
# Ceilings that keep the numbers meaningful (and inside a 32-bit column).
GUARD_MAXIMUM = {"min_seats": 1_000_000, "percent": 1000, "first_purchase_seats": 1_000_000}


def _parse_guard(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise AdminError(400, "invalid_body", "'spend_guard' must be an object.")
    extra = sorted(set(value) - set(GUARD_FIELDS))
    if extra:
        raise AdminError(400, "invalid_body", f"Unknown spend_guard field(s): {', '.join(extra)}.")
    for name, kind in GUARD_FIELDS.items():
        if name not in value:
            continue
        item = value[name]
        if kind is bool and not isinstance(item, bool):
            raise AdminError(400, "invalid_body", f"spend_guard.{name} must be true or false.")
        if kind is int and (not isinstance(item, int) or isinstance(item, bool) or not 0 <= item <= GUARD_MAXIMUM[name]):
            raise AdminError(
                400, "invalid_body", f"spend_guard.{name} must be a whole number from 0 to {GUARD_MAXIMUM[name]}."
            )
    return value


def parse_config(body: dict[str, Any]) -> dict[str, Any]:
    """Validate a SCIM config body (CONTRACT.md) into slots, auto_invite, seat_cap, spend_guard and limits."""
    known = {"user_groups", "admin_groups", "license_groups", "auto_invite", "seat_cap", "spend_guard", *LIMITS, "effective"}
    extra = sorted(set(body) - known)
    if extra:
        raise AdminError(400, "invalid_body", f"Unknown field(s): {', '.join(extra)}.")
    slots = {
        "user": _id_list(body.get("user_groups"), "user_groups"),
        "admin": _id_list(body.get("admin_groups"), "admin_groups"),
    }
    license_groups = body.get("license_groups") or {}
    if not isinstance(license_groups, dict):
        raise AdminError(400, "invalid_body", "'license_groups' must be an object of tier → group ids.")
    for tier in license_groups:
        if tier not in TIERS:
            raise AdminError(400, "invalid_body", f"Unknown license tier '{tier}'; tiers are {', '.join(TIERS)}.")
    for tier in TIERS:
        slots[tier] = _id_list(license_groups.get(tier), f"license_groups.{tier}")
    auto_invite = body.get("auto_invite", False)
    if not isinstance(auto_invite, bool):
        raise AdminError(400, "invalid_body", "'auto_invite' must be true or false.")
    seat_cap = body.get("seat_cap")
    if seat_cap is not None:
        if not isinstance(seat_cap, dict):
            raise AdminError(400, "invalid_body", "'seat_cap' must be an object of tier → seats.")
        for tier, cap in seat_cap.items():
            if tier not in TIERS:
                raise AdminError(400, "invalid_body", f"Unknown license tier '{tier}' in seat_cap.")
            if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
                raise AdminError(400, "invalid_body", f"seat_cap.{tier} must be a whole number ≥ 0.")
        seat_cap = dict(seat_cap) or None
    limits = {name: _limit(body.get(name), name, low, high) for name, (low, high) in LIMITS.items()}
    return {
        "slots": slots, "auto_invite": auto_invite, "seat_cap": seat_cap,
        "spend_guard": _parse_guard(body.get("spend_guard")), **limits,
    }


# Per-tenant limits in the SCIM config: name → (lowest, highest) value.
LIMITS = {"invite_daily_cap": (1, 10_000_000), "hold_min_users": (0, 10_000_000), "hold_percent": (0, 100)}


def _limit(value: Any, name: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise AdminError(400, "invalid_body", f"'{name}' must be a whole number from {low} to {high}, or null.")
    return value


def _or(value: int | None, default: int) -> int:
    return default if value is None else value
