"""List queries: SCIM filters translated to SQL through an explicit whitelist (RFC 7644 §3.4.2)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, DateTime, and_, exists, not_, or_, true
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session

from api.scim import filter as scim_filter
from api.scim.errors import InvalidFilterError, InvalidValueError, TooManyError
from api.scim.render import group_json, user_json
from api.scim.schema import EXTERNAL_ID, GROUP_RESOURCE, USER_RESOURCE, Attr, ResourceSchema
from models.directory import lists
from models.directory.members import groups_of, members_of_groups
from models.settings import ScimLimits
from models.tables import GroupMember, ScimGroup, ScimUser, as_utc

MAX_RESULTS = 1000
_META_SUBS = ("resourcetype", "created", "lastmodified", "location", "version")
DEFAULT_COUNT = 100

# How a filterable attribute maps onto a column: (column, folded) where
# `folded` columns hold str.casefold() of the value, so case-insensitive
# comparison happens on the Python side of the query, not with SQL lower().
USER_COLUMNS: dict[str, tuple[Any, bool]] = {
    "id": (ScimUser.id, False),
    "username": (ScimUser.user_name_key, True),
    "externalid": (ScimUser.external_id, False),
    "active": (ScimUser.active, False),
    "meta.created": (ScimUser.created_at, False),
    "meta.lastmodified": (ScimUser.updated_at, False),
}
GROUP_COLUMNS: dict[str, tuple[Any, bool]] = {
    "id": (ScimGroup.id, False),
    "displayname": (ScimGroup.display_name_key, True),
    "externalid": (ScimGroup.external_id, False),
    "meta.created": (ScimGroup.created_at, False),
    "meta.lastmodified": (ScimGroup.updated_at, False),
}


@dataclass(frozen=True)
class Plan:
    """A filter split into what SQL answers and what is checked on the documents."""

    where: ColumnElement[bool]
    residual: Any | None


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _column_kind(column: Any) -> str:
    """"datetime", "boolean" or "string": what a filter value must be to compare with the column."""
    column_type = column.type
    # SQLModel's UTCDateTime is a TypeDecorator: its python_type is not datetime.
    column_type = getattr(column_type, "impl_instance", None) or getattr(column_type, "impl", column_type)
    if isinstance(column_type, DateTime):
        return "datetime"
    if isinstance(column_type, Boolean):
        return "boolean"
    return "string"


def _compare(column: Any, folded: bool, op: str, value: Any) -> ColumnElement[bool] | None:
    kind = _column_kind(column)
    if value is not None:
        # A value of the wrong type is a 400 (RFC 7644 §3.4.2.2), never sent to
        # the database: PostgreSQL refuses varchar = boolean, timestamp = 'text'.
        if kind == "datetime":
            if op in ("co", "sw", "ew"):
                raise InvalidFilterError(f"'{op}' does not apply to a date-time.")
            value = _datetime(value)
        elif kind == "boolean":
            if not isinstance(value, bool):
                raise InvalidFilterError("A boolean attribute is compared with true or false.")
            if op not in ("eq", "ne"):
                raise InvalidFilterError(f"'{op}' does not apply to a boolean.")
        elif not isinstance(value, str):
            raise InvalidFilterError("A string attribute is compared with a \"string\".")
        elif "\x00" in value:
            raise InvalidFilterError("A filter value may not contain U+0000.")
    if isinstance(value, str) and folded:
        value = value.casefold()
    if op == "eq":
        return column.is_(None) if value is None else column == value
    if op == "ne":
        return column.is_not(None) if value is None else or_(column != value, column.is_(None))
    if value is None:
        return None
    if op in ("co", "sw", "ew"):
        pattern = _escape_like(value)
        pattern = {"co": f"%{pattern}%", "sw": f"{pattern}%", "ew": f"%{pattern}"}[op]
        return column.like(pattern, escape="\\")
    if op in ("gt", "ge", "lt", "le"):
        return {"gt": column > value, "ge": column >= value, "lt": column < value, "le": column <= value}[op]
    return None


def _datetime(value: Any) -> Any:
    if not isinstance(value, str):
        raise InvalidFilterError("Dates are compared with an ISO 8601 string.")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidFilterError(f"'{value}' is not an ISO 8601 date-time.") from None
    try:
        # The columns hold UTC: 9999-12-31T23:59:59-14:00 is past year 9999 there.
        return as_utc(parsed)
    except OverflowError:
        raise InvalidFilterError(f"'{value}' is outside the years 1 to 9999 in UTC.") from None


class FilterTranslator:
    """Translate filter ASTs for one resource type; unknown attributes are a 400, never ignored."""

    def __init__(self, resource: ResourceSchema, columns: dict[str, tuple[Any, bool]], model: Any) -> None:
        self.resource = resource
        self.columns = columns
        self.model = model

    def known(self, key: str) -> Attr | None:
        """The definition of a dotted attribute key, or None when the schemas do not have it."""
        if key.startswith("urn:"):
            for ext in self.resource.extensions:
                prefix = ext.id.lower() + ":"
                if key.startswith(prefix):
                    head, _, sub = key[len(prefix):].partition(".")
                    attr = ext.attr(head)
                    return attr.child(sub) if attr and sub else attr
            return None
        head, _, sub = key.partition(".")
        if head == "meta":
            # RFC 7643 §3.1: meta has exactly these sub-attributes.
            if sub not in _META_SUBS:
                return None
            return Attr(sub, type="dateTime" if sub in ("created", "lastmodified") else "string")
        if head in ("id", "schemas"):
            return None if sub else Attr(head, case_exact=True)
        if head == "externalid":
            # A common attribute (RFC 7643 §3.1), not in the core schema's list.
            return None if sub else EXTERNAL_ID
        attr = self.resource.core.attr(head)
        if attr is None:
            return None
        if not sub:
            return attr
        return attr.child(sub)

    def case_exact(self, key: str) -> bool:
        attr = self.known(key)
        return bool(attr and attr.case_exact)

    def plan(self, text: str, limits: ScimLimits) -> Plan:
        """Parse and split a filter; past the limits' length or comparisons a 400 tooMany."""
        try:
            node = scim_filter.parse_filter(
                text, max_length=limits.max_filter_length, max_terms=limits.max_filter_terms
            )
        except scim_filter.FilterTooLargeError as exc:
            raise TooManyError(
                f"The filter is too large: {exc.detail} (SCIM_MAX_FILTER_LENGTH / SCIM_MAX_FILTER_TERMS)."
            ) from None
        except scim_filter.FilterError as exc:
            raise InvalidFilterError(f"Invalid filter: {exc}") from None
        for path in scim_filter.walk_paths(node):
            if self.known(path.key) is None:
                raise InvalidFilterError(f"Unknown attribute '{_written(path)}' in filter.")
        sql, residual = self._split(node)
        return Plan(where=sql, residual=residual)

    def _split(self, node: Any) -> tuple[ColumnElement[bool], Any | None]:
        """SQL for the conjuncts the columns answer; the rest is evaluated on documents."""
        if isinstance(node, scim_filter.And):
            left_sql, left_rest = self._split(node.left)
            right_sql, right_rest = self._split(node.right)
            rest = [r for r in (left_rest, right_rest) if r is not None]
            residual = rest[0] if len(rest) == 1 else (scim_filter.And(rest[0], rest[1]) if rest else None)
            return and_(left_sql, right_sql), residual
        sql = self._sql(node)
        if sql is None:
            return true(), node
        return sql, None

    def _sql(self, node: Any) -> ColumnElement[bool] | None:
        if isinstance(node, (scim_filter.And, scim_filter.Or)):
            left, right = self._sql(node.left), self._sql(node.right)
            if left is None or right is None:
                return None
            return and_(left, right) if isinstance(node, scim_filter.And) else or_(left, right)
        if isinstance(node, scim_filter.Not):
            inner = self._sql(node.node)
            return None if inner is None else not_(inner)
        if isinstance(node, scim_filter.Present):
            mapped = self.columns.get(node.path.key)
            return None if mapped is None else mapped[0].is_not(None)
        if isinstance(node, scim_filter.Compare):
            mapped = self.columns.get(node.path.key)
            if mapped is None:
                return self._members_compare(node)
            column, folded = mapped
            return _compare(column, folded, node.op, node.value)
        if isinstance(node, scim_filter.ValueFilter) and self.model is ScimGroup and node.path.key == "members":
            ids = _member_value_ids(node.filter)
            if ids is not None:
                return exists().where(GroupMember.group_id == ScimGroup.id, GroupMember.member_id.in_(ids))
        return None

    def _members_compare(self, node: Any) -> ColumnElement[bool] | None:
        # `members.value eq "id"` (and `members eq "id"`): membership rows, not documents.
        if self.model is ScimGroup and node.path.key in ("members", "members.value") and node.op == "eq":
            if isinstance(node.value, str):
                return exists().where(GroupMember.group_id == ScimGroup.id, GroupMember.member_id == node.value)
        return None


def _member_value_ids(node: Any) -> list[str] | None:
    if isinstance(node, scim_filter.Or):
        left, right = _member_value_ids(node.left), _member_value_ids(node.right)
        return None if left is None or right is None else left + right
    if isinstance(node, scim_filter.Compare) and node.op == "eq" and node.path.key.endswith("value"):
        return [node.value] if isinstance(node.value, str) else None
    return None


def _written(path: Any) -> str:
    name = path.attr if path.sub is None else f"{path.attr}.{path.sub}"
    return f"{path.uri}:{name}" if path.uri else name


SORT_COLUMNS = {
    "User": {"id": ScimUser.id, "username": ScimUser.user_name_key, "externalid": ScimUser.external_id,
             "displayname": ScimUser.display_name, "meta.created": ScimUser.created_at,
             "meta.lastmodified": ScimUser.updated_at, "active": ScimUser.active},
    "Group": {"id": ScimGroup.id, "displayname": ScimGroup.display_name_key, "externalid": ScimGroup.external_id,
              "meta.created": ScimGroup.created_at, "meta.lastmodified": ScimGroup.updated_at},
}

USER_FILTERS = FilterTranslator(USER_RESOURCE, USER_COLUMNS, ScimUser)
GROUP_FILTERS = FilterTranslator(GROUP_RESOURCE, GROUP_COLUMNS, ScimGroup)
# What the tooMany answer of a residual filter suggests (the columns above).
INDEXED_FILTER_ATTRIBUTES = {
    "User": "id, userName, externalId, active, meta.created or meta.lastModified",
    "Group": "id, displayName, externalId, members.value, meta.created or meta.lastModified",
}


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
    limits: ScimLimits,
) -> Page:
    """One page of Users or Groups, filtered and sorted (RFC 7644 §3.4.2)."""
    is_user = resource_type == "User"
    model = ScimUser if is_user else ScimGroup
    translator = USER_FILTERS if is_user else GROUP_FILTERS
    where = []
    residual = None
    if filter_text:
        plan = translator.plan(filter_text, limits)
        where.append(plan.where)
        residual = plan.residual
    sort_column = None
    if sort_by:
        sort_column = SORT_COLUMNS[resource_type].get(sort_by.lower())
        if sort_column is None:
            raise InvalidValueError(f"Cannot sort by '{sort_by}'.")
    count = max(0, min(count, MAX_RESULTS))
    start_index = max(1, start_index)

    def render(rows: list[Any], members: bool) -> list[dict[str, Any]]:
        if is_user:
            groups = groups_of(session, [r.id for r in rows])
            return [user_json(r, base_url, groups[r.id]) for r in rows]
        loaded = members_of_groups(session, [r.id for r in rows]) if members else {}
        return [group_json(r, base_url, loaded[r.id] if members else None) for r in rows]

    if residual is None:
        total = lists.count(session, model, tenant_id, where)
        rows = lists.rows(
            session, model, tenant_id, where, sort_column=sort_column, descending=descending,
            offset=start_index - 1, limit=count,
        ) if count else []
        return Page(total, start_index, render(rows, with_members))
    # Attributes without a column are checked on the documents, so every
    # schema attribute filters correctly (at the cost of reading the candidates),
    # up to a cap: past it a 400 tooMany, never a silently partial answer.
    cap = limits.max_filter_candidates
    rows = lists.rows(session, model, tenant_id, where, sort_column=sort_column, descending=descending, limit=cap + 1)
    if len(rows) > cap:
        raise TooManyError(
            f"The filter would check more than {cap} {resource_type}s one by one "
            f"(SCIM_MAX_FILTER_CANDIDATES). Filter on an indexed attribute too, joined with 'and': "
            f"{INDEXED_FILTER_ATTRIBUTES[resource_type]}."
        )
    # Group filters may name members, so they are loaded to be matched.
    docs = render(rows, members=True)
    kept = [d for d in docs if scim_filter.matches(residual, d, translator.case_exact)]
    page = kept[start_index - 1:start_index - 1 + count]
    if not is_user and not with_members:
        for doc in page:
            doc.pop("members", None)
    return Page(len(kept), start_index, page)
