"""Pages of Users or Groups under a where-clause the caller built (the SCIM filter translated to SQL)."""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import func, select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session

from models.tables import ScimGroup, ScimUser

Model = type[ScimUser] | type[ScimGroup]


def _visible(model: Model, tenant_id: str, where: Sequence[ColumnElement[bool]]) -> list[ColumnElement[bool]]:
    """The tenant's rows a client may see: a deleted user is kept for the record, never listed."""
    conditions = [model.tenant_id == tenant_id, *where]
    if model is ScimUser:
        conditions.insert(1, ScimUser.deleted_at.is_(None))
    return conditions


def count(session: Session, model: Model, tenant_id: str, where: Sequence[ColumnElement[bool]]) -> int:
    """How many of the tenant's visible rows match."""
    return session.execute(select(func.count()).select_from(model).where(*_visible(model, tenant_id, where))).scalar_one()


def rows(
    session: Session,
    model: Model,
    tenant_id: str,
    where: Sequence[ColumnElement[bool]],
    *,
    sort_column: Any | None = None,
    descending: bool = False,
    offset: int = 0,
    limit: int | None = None,
) -> list[Any]:
    """The tenant's visible rows that match, in order (creation order unless a sort column is given)."""
    # The id breaks ties, so that pages never overlap.
    order = [model.created_at if sort_column is None else sort_column, model.id]
    if descending:
        order = [col.desc() for col in order]
    query = select(model).where(*_visible(model, tenant_id, where)).order_by(*order)
    if offset:
        query = query.offset(offset)
    if limit is not None:
        query = query.limit(limit)
    return list(session.execute(query).scalars())
