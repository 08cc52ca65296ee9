"""Pages of Users or Groups under a where-clause the caller built (the SCIM filter translated to SQL)."""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import func, select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session

from models.tables import ScimGroup, ScimUser

Model = type[ScimUser] | type[ScimGroup]


def _visible(model: Model, tenant_id: str) -> list[ColumnElement[bool]]:
    """The tenant's rows a client may see: a deleted user is kept for the record, never listed."""
    where = [model.tenant_id == tenant_id]
    if model is ScimUser:
        where.append(ScimUser.deleted_at.is_(None))
    return where


def _ordered(model: Model, sort_column: Any | None, descending: bool) -> list[Any]:
    # Creation order by default; the id breaks ties so pages never overlap.
    order = [model.created_at if sort_column is None else sort_column, model.id]
    return [col.desc() for col in order] if descending else order


def page(
    session: Session,
    model: Model,
    tenant_id: str,
    where: Sequence[ColumnElement[bool]],
    *,
    sort_column: Any | None,
    descending: bool,
    offset: int,
    limit: int,
) -> tuple[int, list[Any]]:
    """(rows matching in all, `limit` of those rows from `offset`), of the tenant's visible rows."""
    conditions = [*_visible(model, tenant_id), *where]
    total = session.execute(select(func.count()).select_from(model).where(*conditions)).scalar_one()
    if not limit:
        return total, []
    query = select(model).where(*conditions).order_by(*_ordered(model, sort_column, descending))
    return total, list(session.execute(query.offset(offset).limit(limit)).scalars())


def every(
    session: Session,
    model: Model,
    tenant_id: str,
    where: Sequence[ColumnElement[bool]],
    *,
    sort_column: Any | None,
    descending: bool,
) -> list[Any]:
    """All the tenant's visible rows matching, in order (for a filter checked on the documents)."""
    conditions = [*_visible(model, tenant_id), *where]
    query = select(model).where(*conditions).order_by(*_ordered(model, sort_column, descending))
    return list(session.execute(query).scalars())
