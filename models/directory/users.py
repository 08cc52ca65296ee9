"""Users of the mirror: writes with their sync events, reads, and the contact-address rule."""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from models.db import chunks
from models.directory.errors import NotFoundError, UniquenessError
from models.directory.events import record_event
from models.directory.fields import folded_key, optional_string, required_string
from models.tables import GroupMember, ScimGroup, ScimUser, new_id, utcnow

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
NO_ADDRESS = "No email address: the user has no emails and a userName that is not an address."


@dataclass
class UserFields:
    """The indexed columns of a User, derived from its document."""

    user_name: str
    external_id: str | None
    display_name: str | None
    active: bool

    @classmethod
    def of(cls, doc: dict[str, Any]) -> "UserFields":
        """The columns of a document (userName required, the others optional)."""
        active = doc.get("active", True)
        return cls(
            user_name=required_string(doc, "userName"),
            external_id=optional_string(doc, "externalId"),
            display_name=optional_string(doc, "displayName"),
            active=True if active is None else bool(active),
        )


def is_unique_violation(exc: IntegrityError) -> bool:
    """Whether the database refused a row for a unique index (either dialect's wording)."""
    text = str(exc.orig).lower()
    return "uq_scim_user_name" in text or "unique" in text


def _user_data(doc: dict[str, Any]) -> dict[str, Any]:
    # `active` stays in the document too, so that a user who never had it
    # (or had it removed) is shown without it; the column says "active".
    return {k: v for k, v in doc.items() if k not in ("userName", "externalId")}


def new_user_row(tenant_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The columns of a new user's row, from its document (both create paths insert this)."""
    fields = UserFields.of(doc)
    now = utcnow()
    return {
        "id": new_id(),
        "tenant_id": tenant_id,
        "user_name": fields.user_name,
        "user_name_key": folded_key(fields.user_name, "userName"),
        "external_id": fields.external_id,
        "display_name": fields.display_name,
        "active": fields.active,
        "data": _user_data(doc),
        "version": 1,
        "created_at": now,
        "updated_at": now,
        "deleted_at": None,
    }


def create_user(session: Session, tenant_id: str, doc: dict[str, Any]) -> SimpleNamespace:
    """Insert a user and its event: two Core statements, no unit of work (the hot path)."""
    row = new_user_row(tenant_id, doc)
    try:
        session.connection().execute(insert(ScimUser.__table__), row)
    except IntegrityError as exc:
        if is_unique_violation(exc):
            raise UniquenessError(f"userName '{row['user_name']}' is already taken in this tenant.") from None
        raise
    record_event(session, tenant_id, "user_created", [row["id"]])
    return SimpleNamespace(**row)


def get_user(session: Session, tenant_id: str, user_id: str, *, lock: bool = False) -> ScimUser:
    """A live user of the tenant (locked FOR UPDATE when asked); NotFoundError otherwise."""
    query = select(ScimUser).where(
        ScimUser.id == user_id, ScimUser.tenant_id == tenant_id, ScimUser.deleted_at.is_(None)
    )
    if lock:
        query = query.with_for_update()
    user = session.execute(query).scalar_one_or_none()
    if user is None:
        raise NotFoundError(f"User '{user_id}' not found.")
    return user


def get_user_any(session: Session, tenant_id: str, user_id: str) -> ScimUser | None:
    """A user of the tenant, deleted or not (the admin may see and remove either)."""
    return session.execute(
        select(ScimUser).where(ScimUser.id == user_id, ScimUser.tenant_id == tenant_id)
    ).scalar_one_or_none()


def users_by_id(session: Session, tenant_id: str, user_ids: Sequence[str] | None) -> dict[str, ScimUser]:
    """The given users of the tenant, deleted or not (None: every user of the tenant)."""
    if user_ids is None:
        return {u.id: u for u in session.execute(select(ScimUser).where(ScimUser.tenant_id == tenant_id)).scalars()}
    users: dict[str, ScimUser] = {}
    for chunk in chunks(list(user_ids)):
        # By primary key alone, the tenant checked here: without planner
        # statistics PostgreSQL may otherwise scan the tenant's userName index.
        users.update(
            (u.id, u) for u in session.execute(select(ScimUser).where(ScimUser.id.in_(chunk))).scalars()
            if u.tenant_id == tenant_id
        )
    return users


def names(session: Session, user_ids: Sequence[str]) -> dict[str, tuple[str | None, dict[str, Any]]]:
    """(displayName column, stored document) of each user, to address them by name."""
    out: dict[str, tuple[str | None, dict[str, Any]]] = {}
    for chunk in chunks(list(user_ids)):
        for user_id, display_name, data in session.execute(
            select(ScimUser.id, ScimUser.display_name, ScimUser.data).where(ScimUser.id.in_(chunk))
        ):
            out[user_id] = (display_name, data)
    return out


def update_user(session: Session, user: ScimUser, doc: dict[str, Any]) -> ScimUser:
    """Store a new document for a user (PUT or the result of a PATCH)."""
    fields = UserFields.of(doc)
    user.user_name = fields.user_name
    user.user_name_key = folded_key(fields.user_name, "userName")
    user.external_id = fields.external_id
    user.display_name = fields.display_name
    user.active = fields.active
    user.data = _user_data(doc)
    user.version += 1
    user.updated_at = utcnow()
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        if is_unique_violation(exc):
            raise UniquenessError(f"userName '{fields.user_name}' is already taken in this tenant.") from None
        raise
    record_event(session, user.tenant_id, "user_updated", [user.id])
    return user


def delete_user(session: Session, user: ScimUser, kind: str = "user_deleted") -> None:
    """Keep the row for the record, free its userName, and take it out of every group."""
    now = utcnow()
    group_ids = select(GroupMember.group_id).where(GroupMember.member_id == user.id).scalar_subquery()
    session.execute(
        update(ScimGroup)
        .where(ScimGroup.id.in_(group_ids), ScimGroup.tenant_id == user.tenant_id)
        .values(version=ScimGroup.version + 1, updated_at=now)
    )
    session.execute(delete(GroupMember).where(GroupMember.member_id == user.id, GroupMember.tenant_id == user.tenant_id))
    user.deleted_at = now
    user.updated_at = now
    user.version += 1
    session.add(user)
    session.flush()
    record_event(session, user.tenant_id, kind, [user.id])


def invitation_address(user: ScimUser) -> str | None:
    """Primary email, else the first email, else userName when it is an address (CONTRACT.md)."""
    return address_of(user.data, user.user_name)


def address_of(data: dict[str, Any], user_name: str) -> str | None:
    """`invitation_address` from a user's stored document and userName (read as columns, not as a ScimUser)."""
    emails = [e for e in data.get("emails") or [] if isinstance(e, dict) and isinstance(e.get("value"), str)]
    for email in emails:
        if email.get("primary") is True and email["value"].strip():
            return email["value"].strip()
    for email in emails:
        if email["value"].strip():
            return email["value"].strip()
    return user_name if EMAIL.match(user_name) else None
