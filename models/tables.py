"""SQLModel tables: tenants, the SCIM directory mirror, sync events, and what the pipeline derives."""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, Column, Index, Integer, String, text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Aware UTC, as SQLModel's datetime columns require."""
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """The same instant in aware UTC; a naive value is UTC (SQLite hands back the wall-clock digits only)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


class _RandomIds:
    """Version 4 UUIDs as 32 hex digits, as `uuid.uuid4().hex`, from the OS's randomness read 256 ids at a time.

    uuid4 costs a getrandom call and a UUID object per id (~6 µs; ~3 % of a SCIM
    create's CPU); a slice of a block costs ~0.8 µs. Still os.urandom, so ids stay
    unguessable; a forked child drops what its parent had read, so two processes
    never hand out the same ids.
    """

    BLOCK = 256
    # uuid4's version (4) and variant (RFC 4122) bits over 128 random bits.
    _KEEP = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
    _SET = (0x4 << 76) | (0x2 << 62)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: list[str] = []
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # Not the parent's ids, nor its lock (another thread may have held it at the fork).
        self._lock = threading.Lock()
        self._ready = []

    def next(self) -> str:
        with self._lock:
            if not self._ready:
                block = os.urandom(16 * self.BLOCK)
                self._ready = [format((int.from_bytes(block[i:i + 16], "big") & self._KEEP) | self._SET, "032x")
                               for i in range(0, len(block), 16)]
            return self._ready.pop()


_IDS = _RandomIds()


def new_id() -> str:
    """A new random id: a version 4 UUID's 32 hex digits."""
    return _IDS.next()


NOT_DELETED = text("deleted_at IS NULL")
REMOVED = text("access_removed_at IS NOT NULL")

# The ids this service issues (new_id) and every column that holds one compare
# byte by byte on PostgreSQL: in the "C" collation an index probe or a join on an
# id is a memcmp, not a locale comparison (about a tenth of a 1,000-member add's
# backend CPU), and ids sort as SQLite and Python sort them. All of them move
# together (migration ids_c): PostgreSQL refuses `=` between two columns of
# different collations.
ID_TYPE = String(64).with_variant(String(64, collation="C"), "postgresql")


def id_field(**kwargs: Any) -> Any:
    """A column holding one of our ids (see ID_TYPE)."""
    return Field(sa_type=ID_TYPE, **kwargs)


class Tenant(SQLModel, table=True):
    """A Sally customer: its SCIM connection, billing link and group mapping settings."""

    __tablename__ = "tenant"
    # One tenant per Stripe subscription: two tenants buying seats on one would
    # each read the other's seats as their own.
    __table_args__ = (Index("uq_tenant_stripe_subscription", "stripe_subscription_id", unique=True),)

    id: str = id_field(default_factory=new_id, primary_key=True)
    name: str = Field(max_length=255)
    created_at: datetime = Field(default_factory=utcnow)
    stripe_customer_id: Optional[str] = Field(default=None, max_length=255)
    stripe_subscription_id: Optional[str] = Field(default=None, max_length=255)
    provider: Optional[str] = Field(default=None, max_length=32)
    scim_enabled: bool = False
    # SHA-256 hex digest of the bearer token; the token itself is never stored.
    token_hash: Optional[str] = Field(default=None, max_length=64, sa_column_kwargs={"unique": True})
    token_created_at: Optional[datetime] = None
    last_request_at: Optional[datetime] = None
    auto_invite: bool = False
    seat_cap: Optional[dict[str, int]] = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    # {"reason", "targets"} of a purchase (or seat read) Stripe refused for
    # good: no new purchase is planned below those targets until the admin
    # saves the mapping again.
    billing_blocked: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    # When the seats bought were last read from the Stripe subscription; None
    # means "read them again" (set by a Stripe webhook and the periodic re-read).
    seats_synced_at: Optional[datetime] = None
    last_reconciled_at: Optional[datetime] = None
    # Spend guard (issue 9): one purchase may add at most max(guard_min_seats,
    # guard_percent % of the seats bought) per tier without the admin's approval;
    # the first purchase after billing is linked may add up to guard_first_purchase.
    guard_enabled: bool = Field(default=True, sa_column_kwargs={"server_default": text("true")})
    guard_min_seats: int = Field(default=10, sa_column_kwargs={"server_default": text("10")})
    guard_percent: int = Field(default=25, sa_column_kwargs={"server_default": text("25")})
    guard_first_purchase: int = Field(default=10_000, sa_column_kwargs={"server_default": text("10000")})
    # When billing was linked (POST /tenants with ids, or PUT …/billing).
    billing_linked_at: Optional[datetime] = None
    # The worker's check of the link: None (no link), "unverified", "verified", "invalid".
    billing_status: Optional[str] = Field(default=None, max_length=16)
    billing_detail: Optional[str] = Field(default=None, max_length=1024)
    # {tier: quantity} that finance lowered by hand in Stripe: a purchase that would
    # raise such a tier again waits for the admin's approval.
    seats_lowered: Optional[dict[str, int]] = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    # Poison tenants: reconciles failed in a row; past SALLY_QUARANTINE_AFTER the sweep
    # leaves the tenant alone until quarantined_until. A success clears all three.
    reconcile_failures: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    quarantined_until: Optional[datetime] = None
    last_error: Optional[str] = Field(default=None, max_length=1024)
    # Per-tenant overrides of INVITE_DAILY_CAP, DEPROVISION_HOLD_MIN_USERS and
    # DEPROVISION_HOLD_PERCENT; None = the deployment's default.
    invite_daily_cap: Optional[int] = None
    hold_min_users: Optional[int] = None
    hold_percent: Optional[int] = None


class GroupMapping(SQLModel, table=True):
    """One IdP group mapped to one slot: user, admin, or a license tier."""

    __tablename__ = "group_mapping"

    tenant_id: str = id_field(foreign_key="tenant.id", primary_key=True)
    group_id: str = id_field(primary_key=True)
    slot: str = Field(primary_key=True, max_length=16)
    # A tombstone once the IdP deleted the group (deleted_at set): the group's
    # externalId and name are kept, so re-creating it restores the mapping.
    external_id: Optional[str] = Field(default=None, max_length=512)
    display_name: Optional[str] = Field(default=None, max_length=512)
    deleted_at: Optional[datetime] = None


class ScimUser(SQLModel, table=True):
    """The mirror of one SCIM User exactly as the IdP sent it."""

    __tablename__ = "scim_user"
    __table_args__ = (
        # userName is unique per tenant, case-insensitively, among users not
        # deleted (RFC 7643 §4.1.1: caseExact false); deleted users free it.
        Index(
            "uq_scim_user_name",
            "tenant_id",
            "user_name_key",
            unique=True,
            sqlite_where=NOT_DELETED,
            postgresql_where=NOT_DELETED,
        ),
        Index("ix_scim_user_external_id", "tenant_id", "external_id"),
        Index("ix_scim_user_tenant_created", "tenant_id", "created_at"),
    )

    id: str = id_field(default_factory=new_id, primary_key=True)
    # No foreign key on PostgreSQL (migration `create`): every writer has just read
    # the tenant, tenants are never deleted, and the key's per-row lock of the
    # tenant row was 13–21 % of a batched create's statement. SQLite keeps it.
    tenant_id: str = id_field()
    user_name: str = Field(max_length=512)
    # str.casefold() of userName: SQLite's lower() is ASCII-only.
    user_name_key: str = Field(max_length=512)
    external_id: Optional[str] = Field(default=None, max_length=512)
    display_name: Optional[str] = Field(default=None, max_length=512)
    active: bool = True
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    version: int = 1
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    deleted_at: Optional[datetime] = None


class ScimGroup(SQLModel, table=True):
    """The mirror of one SCIM Group; its members are rows of GroupMember."""

    __tablename__ = "scim_group"
    __table_args__ = (
        Index("ix_scim_group_display_name", "tenant_id", "display_name_key"),
        Index("ix_scim_group_external_id", "tenant_id", "external_id"),
        Index("ix_scim_group_tenant_created", "tenant_id", "created_at"),
    )

    id: str = id_field(default_factory=new_id, primary_key=True)
    tenant_id: str = id_field(foreign_key="tenant.id")
    display_name: str = Field(max_length=512)
    display_name_key: str = Field(max_length=512)
    external_id: Optional[str] = Field(default=None, max_length=512)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    version: int = 1
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class GroupMember(SQLModel, table=True):
    """One (group, member) pair: concurrent PATCHes insert rows and never lose each other's."""

    __tablename__ = "group_member"
    __table_args__ = (Index("ix_group_member_member", "member_id"),)

    # No foreign key: every write locks the group row first and delete_group deletes
    # the rows itself; the key's per-row check cost a quarter of a big PATCH's insert.
    group_id: str = id_field(primary_key=True)
    member_id: str = id_field(primary_key=True)
    tenant_id: str = id_field()
    member_type: str = Field(default="User", max_length=8)


class SyncEvent(SQLModel, table=True):
    """A change that may alter access; marked applied one by one, never by watermark."""

    __tablename__ = "sync_event"
    __table_args__ = (Index("ix_sync_event_tenant_applied", "tenant_id", "applied_at"),)

    id: Optional[int] = Field(default=None, sa_column=Column(Integer, primary_key=True, autoincrement=True))
    # No foreign key on PostgreSQL, as ScimUser.tenant_id (migration `create`).
    tenant_id: str = id_field()
    kind: str = Field(max_length=32)
    # The users whose access this event may change; None means "the whole tenant".
    user_ids: Optional[list[str]] = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    created_at: datetime = Field(default_factory=utcnow)
    applied_at: Optional[datetime] = None


class Account(SQLModel, table=True):
    """What Sally derived for one SCIM user: access, role, license, invitation."""

    __tablename__ = "account"
    __table_args__ = (
        Index("ix_account_tenant_license", "tenant_id", "license"),
        Index("ix_account_tenant_waiting", "tenant_id", "wanted_tier", "waiting_since"),
        # The breaker counts a tenant's recent removals of access: only accounts that lost it are indexed.
        Index("ix_account_tenant_removed", "tenant_id", "access_removed_at",
              sqlite_where=REMOVED, postgresql_where=REMOVED),
    )

    user_id: str = id_field(foreign_key="scim_user.id", primary_key=True)
    tenant_id: str = id_field(foreign_key="tenant.id")
    role: Optional[str] = Field(default=None, max_length=8)
    # The tier the user's license groups call for; `license` is the seat held.
    wanted_tier: Optional[str] = Field(default=None, max_length=16)
    license: Optional[str] = Field(default=None, max_length=16)
    status: str = Field(default="no_access", max_length=16)
    status_reason: Optional[str] = Field(default=None, max_length=1024)
    # Who waits longest for a seat gets the next one.
    waiting_since: Optional[datetime] = None
    first_access_at: Optional[datetime] = None
    invited_at: Optional[datetime] = None
    invite_error: Optional[str] = Field(default=None, max_length=1024)
    updated_at: datetime = Field(default_factory=utcnow)
    # When this user's access was last taken away (the breaker counts recent removals).
    access_removed_at: Optional[datetime] = None
    # Mass-deprovision breaker: since when a removal of access is held (status ACCOUNT_HELD), and
    # the admin's decision (HOLD_CONFIRM → apply it, HOLD_KEEP → the user keeps access).
    held_since: Optional[datetime] = None
    hold_decision: Optional[str] = Field(default=None, max_length=16)


# Account.status of a user whose removal of access the mass-deprovision breaker holds.
ACCOUNT_HELD = "held"
# Account.hold_decision: the admin confirmed the held removal, or kept the user's access.
HOLD_CONFIRM = "confirm"
HOLD_KEEP = "keep"


class SeatCount(SQLModel, table=True):
    """Seats bought per tier: the Stripe item quantity, or what not_billed purchases recorded."""

    __tablename__ = "seat_count"

    tenant_id: str = id_field(foreign_key="tenant.id", primary_key=True)
    tier: str = Field(primary_key=True, max_length=16)
    purchased: int = 0
    # Seats of this tier held (accounts whose license is this tier), kept by the
    # pipeline where it changes a license, so allocation never counts accounts.
    assigned: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    updated_at: datetime = Field(default_factory=utcnow)
    # The tier price's unit_amount (minor units) and currency, as the worker last
    # read them from the subscription: the admin page's preview prices with them
    # without calling Stripe on the request path. None until read (or ledger only).
    unit_amount: Optional[int] = None
    currency: Optional[str] = Field(default=None, max_length=8)


# A purchase in flight or held for approval: at most one per tenant.
OPEN = text("status IN ('pending', 'awaiting_approval')")


class Purchase(SQLModel, table=True):
    """One seat purchase: the frozen Stripe request body and key are stored before the call."""

    __tablename__ = "purchase"
    __table_args__ = (
        # At most one purchase in flight per tenant.
        Index("uq_purchase_one_open", "tenant_id", unique=True, sqlite_where=OPEN, postgresql_where=OPEN),
        Index("ix_purchase_tenant_created", "tenant_id", "created_at"),
    )

    id: str = id_field(default_factory=new_id, primary_key=True)
    tenant_id: str = id_field(foreign_key="tenant.id")
    created_at: datetime = Field(default_factory=utcnow)
    status: str = Field(default="pending", max_length=32)
    trigger: str = Field(default="", max_length=255)
    # Seats the users need per tier when planned; the targets are fixed when
    # the subscription is read just before the call.
    demand: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    quantities_before: Optional[dict[str, int]] = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    quantities_after: Optional[dict[str, int]] = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    subscription_id: Optional[str] = Field(default=None, max_length=255)
    request_body: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    idempotency_key: Optional[str] = Field(default=None, max_length=255)
    stripe_invoice_id: Optional[str] = Field(default=None, max_length=255)
    error: Optional[str] = Field(default=None, max_length=2048)
    attempts: int = 0
    enqueued_at: Optional[datetime] = None
    settled_at: Optional[datetime] = None
    # Why the spend guard holds it (status awaiting_approval), and the admin's answer.
    hold_reason: Optional[str] = Field(default=None, max_length=1024)
    approved_at: Optional[datetime] = None
    # When the body and idempotency key were frozen: Stripe forgets keys after 24 h.
    key_created_at: Optional[datetime] = None
    # A worker calling Stripe for this purchase holds it until then; the sweep leaves it alone.
    lease_until: Optional[datetime] = None
    # The invoice the purchase produced, as finance reads it (amounts in the currency's minor unit).
    invoice_status: Optional[str] = Field(default=None, max_length=32)
    payment_status: Optional[str] = Field(default=None, max_length=16)
    amount_due: Optional[int] = None
    amount_paid: Optional[int] = None
    currency: Optional[str] = Field(default=None, max_length=8)
    paid_at: Optional[datetime] = None
    # `created` of the last Stripe invoice event applied: an older one arriving late is ignored.
    invoice_event_at: Optional[datetime] = None


class StripeEvent(SQLModel, table=True):
    """One Stripe webhook event, stored once by its id (a redelivery is a no-op)."""

    __tablename__ = "stripe_event"

    id: str = Field(primary_key=True, max_length=255)
    type: str = Field(max_length=128)
    object_id: Optional[str] = Field(default=None, max_length=255)
    tenant_id: Optional[str] = id_field(default=None)
    created: datetime
    received_at: datetime = Field(default_factory=utcnow)
    outcome: str = Field(default="", max_length=255)


class Invitation(SQLModel, table=True):
    """One invitation per SCIM user for the life of the tenant; claimed before sending."""

    __tablename__ = "invitation"
    __table_args__ = (
        Index("uq_invitation_user", "tenant_id", "user_id", unique=True),
        Index("ix_invitation_status", "status", "enqueued_at"),
        Index("ix_invitation_address", "tenant_id", "address_key"),
        Index("ix_invitation_send_day", "tenant_id", "send_day"),
    )

    id: str = id_field(default_factory=new_id, primary_key=True)
    tenant_id: str = id_field(foreign_key="tenant.id")
    user_id: str = id_field(foreign_key="scim_user.id")
    status: str = Field(default="pending", max_length=16)
    address: Optional[str] = Field(default=None, max_length=512)
    message_id: str = Field(max_length=255)
    attempts: int = 0
    claimed_at: Optional[datetime] = None
    sent_at: Optional[datetime] = None
    error: Optional[str] = Field(default=None, max_length=2048)
    created_at: datetime = Field(default_factory=utcnow)
    enqueued_at: Optional[datetime] = None
    # str.casefold() of the address: one invitation per address per tenant.
    address_key: Optional[str] = Field(default=None, max_length=512)
    # The UTC day (its midnight) whose daily allowance this invitation uses;
    # it is not sent before then. None (rows from before the cap): any time.
    send_day: Optional[datetime] = None
    # Why it waits (the daily cap), for the admin's user list.
    wait_reason: Optional[str] = Field(default=None, max_length=255)


class Alert(SQLModel, table=True):
    """Something the admin must look at (a held mass removal of access), until resolved."""

    __tablename__ = "alert"
    __table_args__ = (Index("ix_alert_tenant_open", "tenant_id", "resolved_at"),)

    id: str = id_field(default_factory=new_id, primary_key=True)
    tenant_id: str = id_field(foreign_key="tenant.id")
    kind: str = Field(max_length=32)
    message: str = Field(max_length=1024)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    resolved_at: Optional[datetime] = None
    resolution: Optional[str] = Field(default=None, max_length=16)


class AuditLog(SQLModel, table=True):
    """One admin action (who, what, when), written in the action's own transaction."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_tenant", "tenant_id", "id"),)

    id: Optional[int] = Field(default=None, sa_column=Column(Integer, primary_key=True, autoincrement=True))
    tenant_id: str = id_field()
    # "admin token" (the admin API) or "admin session" (the web page).
    actor: str = Field(max_length=64)
    action: str = Field(max_length=64)
    detail: Optional[dict[str, Any]] = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    created_at: datetime = Field(default_factory=utcnow)


class AccountHistory(SQLModel, table=True):
    """A pipeline outcome for one user (access, license, status), written by reconcile in its transaction."""

    __tablename__ = "account_history"
    __table_args__ = (Index("ix_account_history_user", "user_id", "id"),)

    id: Optional[int] = Field(default=None, sa_column=Column(Integer, primary_key=True, autoincrement=True))
    tenant_id: str = id_field()
    user_id: str = id_field()
    created_at: datetime = Field(default_factory=utcnow)
    role: Optional[str] = Field(default=None, max_length=8)
    license: Optional[str] = Field(default=None, max_length=16)
    status: str = Field(max_length=16)
    status_reason: Optional[str] = Field(default=None, max_length=1024)
