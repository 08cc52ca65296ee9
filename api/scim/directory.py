"""The directory mirror: SCIM writes with their sync events, and the reads, per tenant."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterable, Sequence

import orjson
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from api.scim import filter as scim_filter
from api.scim.errors import InvalidValueError, NotFoundError, UniquenessError
from api.scim.patch import MemberChanges
from api.scim.query import (
    GROUP_COLUMNS,
    MAX_RESULTS,
    SORT_COLUMNS,
    USER_COLUMNS,
    FilterTranslator,
)
from api.scim.render import group_json, user_json
from api.scim.schema import (
    GROUP_RESOURCE,
    USER_RESOURCE,
    optional_string,
    required_string,
)
from models.tables import (
    GroupMapping,
    GroupMember,
    ScimGroup,
    ScimUser,
    SyncEvent,
    new_id,
    utcnow,
)

BATCH = 500
# user_name_key / display_name_key are VARCHAR(512) (models/tables.py).
KEY_LENGTH = 512
USER_FILTERS = FilterTranslator(USER_RESOURCE, USER_COLUMNS, ScimUser)
GROUP_FILTERS = FilterTranslator(GROUP_RESOURCE, GROUP_COLUMNS, ScimGroup)


def record_event(session: Session, tenant_id: str, kind: str, user_ids: Iterable[str] | None) -> None:
    """Append a sync event in the caller's transaction; None means every user of the tenant."""
    # Core on the table, not the ORM entity: this runs on every SCIM write.
    session.connection().execute(
        insert(SyncEvent.__table__).values(
            tenant_id=tenant_id,
            kind=kind,
            user_ids=None if user_ids is None else sorted(set(user_ids)),
            created_at=utcnow(),
        )
    )


def _chunks(items: Sequence[Any], size: int = BATCH) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def folded_key(value: str, name: str) -> str:
    """str.casefold() of a name, for its lookup column; it may grow ("ß" → "ss") past the column."""
    key = value.casefold()
    if len(key) > KEY_LENGTH:
        raise InvalidValueError(f"'{name}' is longer than {KEY_LENGTH} characters once case-folded.")
    return key


def _is_unique_violation(exc: IntegrityError) -> bool:
    text = str(exc.orig).lower()
    return "uq_scim_user_name" in text or "unique" in text


# ----------------------------------------------------------------- users


@dataclass
class UserFields:
    """The indexed columns of a User, derived from its document."""

    user_name: str
    external_id: str | None
    display_name: str | None
    active: bool

    @classmethod
    def of(cls, doc: dict[str, Any]) -> "UserFields":
        active = doc.get("active", True)
        return cls(
            user_name=required_string(doc, "userName"),
            external_id=optional_string(doc, "externalId"),
            display_name=optional_string(doc, "displayName"),
            active=True if active is None else bool(active),
        )


def _user_data(doc: dict[str, Any]) -> dict[str, Any]:
    # `active` stays in the document too, so that a user who never had it
    # (or had it removed) is shown without it; the column says "active".
    return {k: v for k, v in doc.items() if k not in ("userName", "externalId")}


def create_user(session: Session, tenant_id: str, doc: dict[str, Any]) -> SimpleNamespace:
    """Insert a user and its event: two Core statements, no unit of work (the hot path)."""
    fields = UserFields.of(doc)
    now = utcnow()
    row = {
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
    try:
        session.connection().execute(insert(ScimUser.__table__), row)
    except IntegrityError as exc:
        if _is_unique_violation(exc):
            raise UniquenessError(f"userName '{fields.user_name}' is already taken in this tenant.") from None
        raise
    record_event(session, tenant_id, "user_created", [row["id"]])
    return SimpleNamespace(**row)


def get_user(session: Session, tenant_id: str, user_id: str, *, lock: bool = False) -> ScimUser:
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


def user_doc(user: ScimUser) -> dict[str, Any]:
    """The stored document with the column-held attributes, as PATCH and PUT see it."""
    # A deep copy: PATCH edits nested values in place, and SQLAlchemy compares
    # the JSON column with the loaded object to decide whether to write it.
    doc = orjson.loads(orjson.dumps(user.data))
    doc["userName"] = user.user_name
    if user.external_id is not None:
        doc["externalId"] = user.external_id
    return doc


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
        if _is_unique_violation(exc):
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


def groups_of(session: Session, user_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """Direct groups (id, displayName) of each user."""
    out: dict[str, list[tuple[str, str]]] = {uid: [] for uid in user_ids}
    for chunk in _chunks(list(user_ids)):
        rows = session.execute(
            select(GroupMember.member_id, ScimGroup.id, ScimGroup.display_name)
            .join(ScimGroup, ScimGroup.id == GroupMember.group_id)
            .where(GroupMember.member_id.in_(chunk))
            .order_by(ScimGroup.display_name_key, ScimGroup.id)
        )
        for member_id, group_id, name in rows:
            out[member_id].append((group_id, name))
    return out


# ---------------------------------------------------------------- groups


def _group_data(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in ("displayName", "externalId", "members", "schemas")}


def group_doc(group: ScimGroup) -> dict[str, Any]:
    doc = orjson.loads(orjson.dumps(group.data))
    doc["schemas"] = [GROUP_RESOURCE.core.id]
    doc["displayName"] = group.display_name
    if group.external_id is not None:
        doc["externalId"] = group.external_id
    return doc


def create_group(session: Session, tenant_id: str, doc: dict[str, Any], members: dict[str, str | None]) -> ScimGroup:
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
    query = select(ScimGroup).where(ScimGroup.id == group_id, ScimGroup.tenant_id == tenant_id)
    if lock:
        query = query.with_for_update()
    group = session.execute(query).scalar_one_or_none()
    if group is None:
        raise NotFoundError(f"Group '{group_id}' not found.")
    return group


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


def members_of(session: Session, group_id: str) -> list[tuple[str, str]]:
    return members_of_groups(session, [group_id])[group_id]


def members_of_groups(session: Session, group_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """(member id, type) pairs of each group, in one query per chunk of groups (not one per group)."""
    out: dict[str, list[tuple[str, str]]] = {gid: [] for gid in group_ids}
    for chunk in _chunks(list(group_ids)):
        for group_id, member_id, member_type in session.execute(
            select(GroupMember.group_id, GroupMember.member_id, GroupMember.member_type)
            .where(GroupMember.group_id.in_(chunk))
            .order_by(GroupMember.group_id, GroupMember.member_id)
        ):
            out[group_id].append((member_id, member_type))
    return out


def _resolve_members(session: Session, tenant_id: str, wanted: dict[str, str | None]) -> dict[str, str]:
    """Member id → "User"/"Group"; an id that is neither in this tenant is a 400 (RFC 7643 §4.2)."""
    ids = list(wanted)
    found: dict[str, str] = {}
    # Looked up by primary key alone, tenant and deletion checked here: without
    # planner statistics (a new tenant, autovacuum behind) PostgreSQL may pick the
    # partial userName index and read every user of the tenant for one member.
    for chunk in _chunks(ids):
        for uid, owner, deleted_at in session.execute(
            select(ScimUser.id, ScimUser.tenant_id, ScimUser.deleted_at).where(ScimUser.id.in_(chunk))
        ):
            if owner == tenant_id and deleted_at is None:
                found[uid] = "User"
    missing = [i for i in ids if i not in found]
    for chunk in _chunks(missing):
        for gid, owner in session.execute(select(ScimGroup.id, ScimGroup.tenant_id).where(ScimGroup.id.in_(chunk))):
            if owner == tenant_id:
                found[gid] = "Group"
    unknown = [i for i in ids if i not in found]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise InvalidValueError(f"Members must be Users or Groups of this tenant; unknown: {shown}.")
    return found


def _insert_ignore(session: Session):
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


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
        insert_ignore = _insert_ignore(session)
        rows = [
            {"group_id": group.id, "member_id": mid, "tenant_id": group.tenant_id, "member_type": kinds[mid]}
            for mid in add
        ]
        # One statement shape whatever the number of rows (executemany with
        # RETURNING): compiled once and cached, where a multi-row VALUES of a new
        # length would be compiled again on every PATCH.
        table = GroupMember.__table__
        statement = (
            insert_ignore(table)
            .on_conflict_do_nothing(index_elements=["group_id", "member_id"])
            .returning(table.c.member_id, table.c.member_type)
        )
        inserted = session.connection().execute(statement, rows)
        touched.extend(mid for mid, mtype in inserted if mtype == "User")
    if remove:
        for chunk in _chunks(sorted(remove)):
            statement = (
                delete(GroupMember)
                .where(GroupMember.group_id == group.id, GroupMember.member_id.in_(chunk))
                .returning(GroupMember.member_id, GroupMember.member_type)
            )
            touched.extend(mid for mid, mtype in session.execute(statement) if mtype == "User")
    return touched


def member_counts(session: Session, group_ids: Sequence[str]) -> dict[str, int]:
    counts = {gid: 0 for gid in group_ids}
    for chunk in _chunks(list(group_ids)):
        for gid, n in session.execute(
            select(GroupMember.group_id, func.count()).where(GroupMember.group_id.in_(chunk)).group_by(GroupMember.group_id)
        ):
            counts[gid] = n
    return counts


# ----------------------------------------------------------------- lists


@dataclass
class Page:
    total: int
    start_index: int
    docs: list[dict[str, Any]]


def list_resources(
    session: Session,
    tenant_id: str,
    resource_type: str,
    base_url: str,
    *,
    filter_text: str | None,
    start_index: int,
    count: int,
    sort_by: str | None,
    descending: bool,
    with_members: bool,
) -> Page:
    """One page of Users or Groups, filtered and sorted (RFC 7644 §3.4.2)."""
    is_user = resource_type == "User"
    model = ScimUser if is_user else ScimGroup
    translator = USER_FILTERS if is_user else GROUP_FILTERS
    where = [model.tenant_id == tenant_id]
    if is_user:
        where.append(ScimUser.deleted_at.is_(None))
    residual = None
    if filter_text:
        plan = translator.plan(filter_text)
        where.append(plan.where)
        residual = plan.residual
    order = [model.created_at, model.id]
    if sort_by:
        column = SORT_COLUMNS[resource_type].get(sort_by.lower())
        if column is None:
            raise InvalidValueError(f"Cannot sort by '{sort_by}'.")
        order = [column, model.id]
    if descending:
        order = [col.desc() for col in order]
    count = max(0, min(count, MAX_RESULTS))
    start_index = max(1, start_index)
    query = select(model).where(*where).order_by(*order)

    def render(rows: list[Any], members: bool) -> list[dict[str, Any]]:
        if is_user:
            groups = groups_of(session, [r.id for r in rows])
            return [user_json(r, base_url, groups[r.id]) for r in rows]
        loaded = members_of_groups(session, [r.id for r in rows]) if members else {}
        return [group_json(r, base_url, loaded[r.id] if members else None) for r in rows]

    if residual is None:
        total = session.execute(select(func.count()).select_from(model).where(*where)).scalar_one()
        rows = list(session.execute(query.offset(start_index - 1).limit(count)).scalars()) if count else []
        return Page(total, start_index, render(rows, with_members))
    # Attributes without a column are checked on the documents, so every
    # schema attribute filters correctly (at the cost of reading the candidates).
    rows = list(session.execute(query).scalars())
    # Group filters may name members, so they are loaded to be matched.
    docs = render(rows, members=True)
    kept = [d for d in docs if scim_filter.matches(residual, d, translator.case_exact)]
    page = kept[start_index - 1:start_index - 1 + count]
    if not is_user and not with_members:
        for doc in page:
            doc.pop("members", None)
    return Page(len(kept), start_index, page)
