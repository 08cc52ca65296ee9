"""Groups of the mirror: writes with their member changes and sync events, and reads."""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import delete, select, update
from sqlmodel import Session

from models.db import chunks
from models.directory.errors import NotFoundError
from models.directory.events import record_event
from models.directory.fields import folded_key, optional_string, required_string
from models.directory.members import MemberChanges, apply_member_changes
from models.tables import GroupMapping, GroupMember, ScimGroup, new_id, utcnow


def _group_data(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in ("displayName", "externalId", "members", "schemas")}


def create_group(session: Session, tenant_id: str, doc: dict[str, Any], members: dict[str, str | None]) -> ScimGroup:
    """Insert a group with its members, and one event naming the users it gave a membership."""
    name = required_string(doc, "displayName")
    now = utcnow()
    group = ScimGroup(
        id=new_id(),
        tenant_id=tenant_id,
        display_name=name,
        display_name_key=folded_key(name, "displayName"),
        external_id=optional_string(doc, "externalId"),
        data=_group_data(doc),
        created_at=now,
        updated_at=now,
    )
    session.add(group)
    session.flush()
    if group.external_id:
        # The IdP re-created a mapped group it had deleted (same externalId): its mapping comes back.
        session.execute(
            update(GroupMapping)
            .where(
                GroupMapping.tenant_id == tenant_id,
                GroupMapping.external_id == group.external_id,
                GroupMapping.deleted_at.is_not(None),
            )
            .values(group_id=group.id, deleted_at=None)
        )
    changes = MemberChanges()
    changes.add.update(members)
    touched = apply_member_changes(session, group, changes)
    record_event(session, tenant_id, "group_created", touched)
    return group


def get_group(session: Session, tenant_id: str, group_id: str, *, lock: bool = False) -> ScimGroup:
    """A group of the tenant (locked FOR UPDATE when asked); NotFoundError otherwise."""
    query = select(ScimGroup).where(ScimGroup.id == group_id, ScimGroup.tenant_id == tenant_id)
    if lock:
        query = query.with_for_update()
    group = session.execute(query).scalar_one_or_none()
    if group is None:
        raise NotFoundError(f"Group '{group_id}' not found.")
    return group


def groups_by_name(session: Session, tenant_id: str) -> list[ScimGroup]:
    """Every group of the tenant, by case-folded displayName."""
    return list(
        session.execute(
            select(ScimGroup).where(ScimGroup.tenant_id == tenant_id).order_by(ScimGroup.display_name_key, ScimGroup.id)
        ).scalars()
    )


def known_group_ids(session: Session, tenant_id: str, group_ids: Sequence[str]) -> set[str]:
    """Those of the ids that are groups of this tenant."""
    known: set[str] = set()
    for chunk in chunks(sorted(group_ids)):
        known.update(
            gid for (gid,) in session.execute(
                select(ScimGroup.id).where(ScimGroup.tenant_id == tenant_id, ScimGroup.id.in_(chunk))
            )
        )
    return known


def update_group(session: Session, group: ScimGroup, doc: dict[str, Any], changes: MemberChanges) -> ScimGroup:
    """Store a group's new document and member changes; only real changes become events."""
    name = required_string(doc, "displayName")
    group.display_name = name
    group.display_name_key = folded_key(name, "displayName")
    group.external_id = optional_string(doc, "externalId")
    group.data = _group_data(doc)
    group.version += 1
    group.updated_at = utcnow()
    session.add(group)
    session.flush()
    touched = apply_member_changes(session, group, changes)
    record_event(session, group.tenant_id, "group_updated", touched)
    return group


def delete_group(session: Session, group: ScimGroup) -> None:
    """Delete a group; its mapping becomes a tombstone (restored when a group with its
    externalId comes back), it leaves the groups it was a member of (like a deleted
    user), and everyone is re-evaluated."""
    parents = select(GroupMember.group_id).where(
        GroupMember.member_id == group.id, GroupMember.tenant_id == group.tenant_id
    ).scalar_subquery()
    session.execute(
        update(ScimGroup)
        .where(ScimGroup.id.in_(parents), ScimGroup.tenant_id == group.tenant_id)
        .values(version=ScimGroup.version + 1, updated_at=utcnow())
    )
    session.execute(
        delete(GroupMember).where(GroupMember.member_id == group.id, GroupMember.tenant_id == group.tenant_id)
    )
    session.execute(delete(GroupMember).where(GroupMember.group_id == group.id))
    session.execute(
        update(GroupMapping)
        .where(GroupMapping.tenant_id == group.tenant_id, GroupMapping.group_id == group.id)
        .values(deleted_at=utcnow(), external_id=group.external_id, display_name=group.display_name)
    )
    session.execute(delete(ScimGroup).where(ScimGroup.id == group.id))
    record_event(session, group.tenant_id, "group_deleted", None)
