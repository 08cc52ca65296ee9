"""The SCIM hot path on PostgreSQL: psycopg's async pool on the event loop, one round trip per write.

An IdP's first cycle is thousands of `POST /Users` in a burst (DESIGN.md "The
SCIM write path is the hot path"). Here a create is ONE statement: a
data-modifying CTE that checks the token, inserts the user and appends its
sync event, atomically (one statement is one transaction in autocommit), with
no thread-pool hop and no ORM. psycopg prepares a statement it has run a few
times, so the server plans it once per connection. SQLite keeps the
synchronous path in the thread pool (api/scim/endpoints.py).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import orjson
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.engine import make_url

from api.scim.directory import UserFields, _user_data, folded_key
from api.scim.errors import UniquenessError
from models.tables import new_id, utcnow

log = logging.getLogger(__name__)

# The token, the user and its event in one statement. The partial unique index
# (tenant, case-folded userName) WHERE deleted_at IS NULL decides uniqueness:
# ON CONFLICT DO NOTHING turns a duplicate into "no row", never an error.
CREATE_USER = """
WITH t AS (
    SELECT id FROM tenant WHERE token_hash = %(digest)s AND id = %(tenant)s AND scim_enabled
), u AS (
    INSERT INTO scim_user (id, tenant_id, user_name, user_name_key, external_id, display_name,
                           active, data, version, created_at, updated_at, deleted_at)
    SELECT %(id)s, t.id, %(user_name)s, %(key)s, %(external_id)s, %(display_name)s,
           %(active)s, %(data)s::json, 1, %(now)s, %(now)s, NULL FROM t
    ON CONFLICT (tenant_id, user_name_key) WHERE deleted_at IS NULL DO NOTHING
    RETURNING id
), e AS (
    INSERT INTO sync_event (tenant_id, kind, user_ids, created_at)
    SELECT %(tenant)s, 'user_created', %(user_ids)s::json, %(now)s FROM u
    RETURNING id
)
SELECT (SELECT count(*) FROM t), (SELECT count(*) FROM e)
"""

TENANT_OF_TOKEN = "SELECT id, scim_enabled FROM tenant WHERE token_hash = %s"
TOUCH = "UPDATE tenant SET last_request_at = %s WHERE id = %s"


def conninfo(database_url: str) -> str:
    """libpq connection string of a SQLAlchemy PostgreSQL URL (the driver suffix dropped)."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class AsyncDatabase:
    """A psycopg async pool per event loop, opened on first use (nothing connects at import or build time)."""

    def __init__(self, database_url: str, *, max_size: int = 20) -> None:
        self._conninfo = conninfo(database_url)
        self.max_size = max_size
        self._pool: AsyncConnectionPool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening = asyncio.Lock()

    async def _current(self) -> AsyncConnectionPool:
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._loop is loop:
            return self._pool
        if self._loop is not loop:
            # A pool belongs to one loop (a test's asyncio.run makes a new one each time).
            self._pool, self._loop, self._opening = None, loop, asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                pool = AsyncConnectionPool(
                    self._conninfo, min_size=1, max_size=self.max_size, open=False,
                    # Autocommit: each hot-path statement is its own transaction.
                    # No check on checkout (a round trip per request): a connection
                    # broken by a server restart is discarded when it is returned.
                    kwargs={"autocommit": True},
                )
                await pool.open()
                self._pool = pool
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        pool = await self._current()
        async with pool.connection() as conn:
            yield conn

    async def close(self) -> None:
        if self._pool is not None and self._loop is asyncio.get_running_loop():
            await self._pool.close()
        self._pool = None

    async def tenant_of(self, digest: str) -> tuple[str, bool] | None:
        """(tenant id, scim_enabled) of a token digest, or None."""
        async with self.connection() as conn:
            row = await (await conn.execute(TENANT_OF_TOKEN, (digest,))).fetchone()
        return None if row is None else (row[0], bool(row[1]))

    async def touch(self, tenant_id: str) -> None:
        async with self.connection() as conn:
            await conn.execute(TOUCH, (utcnow(), tenant_id))

    async def create_user(self, tenant_id: str, digest: str, doc: dict[str, Any]) -> dict[str, Any] | None:
        """Insert a user and its event in one statement; the row, or None when the token is not this tenant's."""
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
        params = {
            "digest": digest, "tenant": tenant_id, "id": row["id"], "user_name": row["user_name"],
            "key": row["user_name_key"], "external_id": row["external_id"], "display_name": row["display_name"],
            "active": row["active"], "data": orjson.dumps(row["data"]).decode(),
            "user_ids": orjson.dumps([row["id"]]).decode(), "now": now,
        }
        async with self.connection() as conn:
            authorized, created = await (await conn.execute(CREATE_USER, params)).fetchone()  # type: ignore[misc]
        if not authorized:
            return None
        if not created:
            raise UniquenessError(f"userName '{fields.user_name}' is already taken in this tenant.")
        return row
