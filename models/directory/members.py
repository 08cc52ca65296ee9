"""Group memberships: who is in which group, and member changes applied as row inserts and deletes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from sqlalchemy import delete, func, select
from sqlmodel import Session

from models.db import chunks, insert_ignore, is_postgres
from models.directory.errors import InvalidValueError
from models.tables import GroupMember, ScimGroup, ScimUser


@dataclass
class MemberChanges:
    """What a write does to a group's members, in the order its operations said it."""

    replace: dict[str, str | None] | None = None
    add: dict[str, str | None] = field(default_factory=dict)
    remove: set[str] = field(default_factory=set)

    def add_member(self, member_id: str, member_type: str | None) -> None:
        """Add one member (undoing an earlier removal of it)."""
        self.remove.discard(member_id)
        if self.replace is not None:
            self.replace[member_id] = member_type
        else:
            self.add[member_id] = member_type

    def remove_member(self, member_id: str) -> None:
        """Remove one member (undoing an earlier addition of it)."""
        self.add.pop(member_id, None)
        if self.replace is not None:
            self.replace.pop(member_id, None)
        else:
            self.remove.add(member_id)

    def replace_all(self, members: dict[str, str | None]) -> None:
        """The group's members become exactly these."""
        self.replace = dict(members)
        self.add.clear()
        self.remove.clear()

    @property
    def empty(self) -> bool:
        return self.replace is None and not self.add and not self.remove


def members_of(session: Session, group_id: str) -> list[tuple[str, str]]:
    """(member id, type) pairs of one group."""
    return members_of_groups(session, [group_id])[group_id]


def members_of_groups(session: Session, group_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """(member id, type) pairs of each group, in one query per chunk of groups (not one per group)."""
    out: dict[str, list[tuple[str, str]]] = {gid: [] for gid in group_ids}
    for chunk in chunks(list(group_ids)):
        for group_id, member_id, member_type in session.execute(
            select(GroupMember.group_id, GroupMember.member_id, GroupMember.member_type)
            .where(GroupMember.group_id.in_(chunk))
            .order_by(GroupMember.group_id, GroupMember.member_id)
        ):
            out[group_id].append((member_id, member_type))
    return out


def groups_of(session: Session, user_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """Direct groups (id, displayName) of each user."""
    out: dict[str, list[tuple[str, str]]] = {uid: [] for uid in user_ids}
    for chunk in chunks(list(user_ids)):
        rows = session.execute(
            select(GroupMember.member_id, ScimGroup.id, ScimGroup.display_name)
            .join(ScimGroup, ScimGroup.id == GroupMember.group_id)
            .where(GroupMember.member_id.in_(chunk))
            .order_by(ScimGroup.display_name_key, ScimGroup.id)
        )
        for member_id, group_id, name in rows:
            out[member_id].append((group_id, name))
    return out


def group_ids_of_users(session: Session, tenant_id: str, user_ids: Sequence[str] | None) -> dict[str, set[str]]:
    """Direct group ids of the given users (None: of every user of the tenant)."""
    memberships: dict[str, set[str]] = {}
    if user_ids is None:
        rows = session.execute(
            select(GroupMember.member_id, GroupMember.group_id).where(
                GroupMember.tenant_id == tenant_id, GroupMember.member_type == "User"
            )
        )
        for member_id, group_id in rows:
            memberships.setdefault(member_id, set()).add(group_id)
        return memberships
    for chunk in chunks(list(user_ids)):
        for member_id, group_id in session.execute(
            select(GroupMember.member_id, GroupMember.group_id).where(GroupMember.member_id.in_(chunk))
        ):
            memberships.setdefault(member_id, set()).add(group_id)
    return memberships


def member_counts(session: Session, group_ids: Sequence[str]) -> dict[str, int]:
    """Number of direct members of each group."""
    counts = {gid: 0 for gid in group_ids}
    for chunk in chunks(list(group_ids)):
        for gid, n in session.execute(
            select(GroupMember.group_id, func.count()).where(GroupMember.group_id.in_(chunk)).group_by(GroupMember.group_id)
        ):
            counts[gid] = n
    return counts


# PostgreSQL: one statement text whatever the number of members (ids as one array
# parameter), so psycopg prepares it once per connection; an IN list or a
# multi-row VALUES of a new length is parsed, and planned, again on every PATCH.
PG_USERS_BY_ID = "SELECT id, tenant_id, deleted_at FROM scim_user WHERE id = ANY(%(ids)s)"
PG_GROUPS_BY_ID = "SELECT id, tenant_id FROM scim_group WHERE id = ANY(%(ids)s)"
PG_ADD_MEMBERS = (
    "INSERT INTO group_member (group_id, member_id, tenant_id, member_type) "
    "SELECT %(group_id)s, m.id, %(tenant_id)s, m.kind FROM unnest(%(ids)s::varchar[], %(kinds)s::varchar[]) AS m(id, kind) "
    "ON CONFLICT (group_id, member_id) DO NOTHING RETURNING member_id, member_type"
)
PG_REMOVE_MEMBERS = (
    "DELETE FROM group_member WHERE group_id = %(group_id)s AND member_id = ANY(%(ids)s) "
    "RETURNING member_id, member_type"
)


def _refuse_unknown(ids: list[str], found: dict[str, str]) -> None:
    unknown = [i for i in ids if i not in found]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise InvalidValueError(f"Members must be Users or Groups of this tenant; unknown: {shown}.")


def _resolve_members(session: Session, tenant_id: str, wanted: dict[str, str | None]) -> dict[str, str]:
    """Member id → "User"/"Group"; an id that is neither in this tenant is refused (RFC 7643 §4.2)."""
    ids = list(wanted)
    found: dict[str, str] = {}
    if is_postgres(session):
        connection = session.connection()
        for uid, owner, deleted_at in connection.exec_driver_sql(PG_USERS_BY_ID, {"ids": ids}):
            if owner == tenant_id and deleted_at is None:
                found[uid] = "User"
        missing = [i for i in ids if i not in found]
        if missing:
            for gid, owner in connection.exec_driver_sql(PG_GROUPS_BY_ID, {"ids": missing}):
                if owner == tenant_id:
                    found[gid] = "Group"
        _refuse_unknown(ids, found)
        return found
    # Looked up by primary key alone, tenant and deletion checked here: without
    # planner statistics (a new tenant, autovacuum behind) PostgreSQL may pick the
    # partial userName index and read every user of the tenant for one member.
    for chunk in chunks(ids):
        for uid, owner, deleted_at in session.execute(
            select(ScimUser.id, ScimUser.tenant_id, ScimUser.deleted_at).where(ScimUser.id.in_(chunk))
        ):
            if owner == tenant_id and deleted_at is None:
                found[uid] = "User"
    missing = [i for i in ids if i not in found]
    for chunk in chunks(missing):
        for gid, owner in session.execute(select(ScimGroup.id, ScimGroup.tenant_id).where(ScimGroup.id.in_(chunk))):
            if owner == tenant_id:
                found[gid] = "Group"
    _refuse_unknown(ids, found)
    return found


def apply_member_changes(session: Session, group: ScimGroup, changes: MemberChanges) -> list[str]:
    """Apply member changes as row inserts and deletes; return the users whose membership changed."""
    if changes.replace is not None:
        current = dict(members_of(session, group.id))
        target = changes.replace
        add = {mid: t for mid, t in target.items() if mid not in current}
        remove = {mid for mid in current if mid not in target}
    else:
        add, remove = changes.add, changes.remove
    touched: list[str] = []
    if add:
        if group.id in add:
            raise InvalidValueError("A group cannot be a member of itself.")
        kinds = _resolve_members(session, group.tenant_id, add)
        if is_postgres(session):
            ids = list(add)
            inserted = session.connection().exec_driver_sql(PG_ADD_MEMBERS, {
                "group_id": group.id, "tenant_id": group.tenant_id, "ids": ids, "kinds": [kinds[m] for m in ids],
            })
            touched.extend(mid for mid, mtype in inserted if mtype == "User")
            add = {}
    if add:
        rows = [
            {"group_id": group.id, "member_id": mid, "tenant_id": group.tenant_id, "member_type": kinds[mid]}
            for mid in add
        ]
        # One statement shape whatever the number of rows (executemany with
        # RETURNING): compiled once and cached, where a multi-row VALUES of a new
        # length would be compiled again on every PATCH.
        table = GroupMember.__table__
        statement = (
            insert_ignore(session)(table)
            .on_conflict_do_nothing(index_elements=["group_id", "member_id"])
            .returning(table.c.member_id, table.c.member_type)
        )
        inserted = session.connection().execute(statement, rows)
        touched.extend(mid for mid, mtype in inserted if mtype == "User")
    if remove and is_postgres(session):
        removed = session.connection().exec_driver_sql(PG_REMOVE_MEMBERS, {"group_id": group.id, "ids": sorted(remove)})
        touched.extend(mid for mid, mtype in removed if mtype == "User")
        remove = set()
    if remove:
        for chunk in chunks(sorted(remove)):
            statement = (
                delete(GroupMember)
                .where(GroupMember.group_id == group.id, GroupMember.member_id.in_(chunk))
                .returning(GroupMember.member_id, GroupMember.member_type)
            )
            touched.extend(mid for mid, mtype in session.execute(statement) if mtype == "User")
    return touched
