"""The directory's hot writes on PostgreSQL: psycopg's async pool on the event loop, few round trips per write.

An IdP's first cycle is thousands of `POST /Users` and member PATCHes in a
burst (DESIGN.md "The SCIM write path is the hot path"). A create is ONE
statement: a data-modifying CTE that checks the token, inserts the user and
appends its sync event, atomically (autocommit: one statement, one
transaction), with no thread-pool hop and no ORM; the creates of one tenant
that arrive while such a statement runs share the next one (CreateBatcher), so
a burst costs PostgreSQL one commit and one event per batch, not per user. A group write is one short
transaction in pipeline mode (GroupWrite). psycopg prepares a statement it has
run a few times, so the server plans it once per connection. SQLite keeps the
synchronous functions of this package, in the thread pool.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import orjson
import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy.engine import make_url

from models.db import postgres_connect_args
from models.directory.errors import InvalidValueError, NotFoundError, UnavailableError, UniquenessError
from models.directory.fields import folded_key
from models.directory.members import PG_REMOVE_MEMBERS, MemberChanges
from models.directory.users import new_user_row
from models.tables import utcnow

log = logging.getLogger(__name__)

CHECKOUT_TIMEOUT_SECONDS = 5.0

# The token, the users and their event in one statement, for the creates of one
# tenant that arrived together (CreateBatcher): one commit, one sync event
# naming every user it created. The partial unique index (tenant, case-folded
# userName) WHERE deleted_at IS NULL decides uniqueness: ON CONFLICT DO NOTHING
# turns a duplicate into "no row", never an error, and a row that conflicts with
# an earlier row of the same statement is skipped the same way (the first wins).
CREATE_USERS = """
WITH t AS (
    SELECT id FROM tenant WHERE token_hash = %(digest)s AND id = %(tenant)s AND scim_enabled
), r AS (
    -- The rows as one JSON array (one orjson.dumps per batch, each document
    -- embedded as it will be stored), in the order the creates arrived.
    SELECT * FROM json_to_recordset(%(rows)s::json)
        AS r(n int, id varchar, user_name varchar, user_name_key varchar, external_id varchar,
             display_name varchar, active boolean, data json, created_at timestamptz)
), u AS (
    INSERT INTO scim_user (id, tenant_id, user_name, user_name_key, external_id, display_name,
                           active, data, version, created_at, updated_at, deleted_at)
    SELECT r.id, t.id, r.user_name, r.user_name_key, r.external_id, r.display_name,
           r.active, r.data, 1, r.created_at, r.created_at, NULL FROM t CROSS JOIN r ORDER BY r.n
    ON CONFLICT (tenant_id, user_name_key) WHERE deleted_at IS NULL DO NOTHING
    RETURNING id
), e AS (
    INSERT INTO sync_event (tenant_id, kind, user_ids, created_at)
    SELECT %(tenant)s, 'user_created', json_agg(id ORDER BY id), %(now)s FROM u HAVING count(*) > 0
    RETURNING id
)
SELECT (SELECT count(*) FROM t), (SELECT array_agg(id) FROM u), (SELECT count(*) FROM e)
"""

_BATCH_COLUMNS = ("id", "user_name", "user_name_key", "external_id", "display_name", "active", "data", "created_at")

TENANT_OF_TOKEN = "SELECT id, scim_enabled FROM tenant WHERE token_hash = %s"
TOUCH = "UPDATE tenant SET last_request_at = %s WHERE id = %s"
# The group locked and its version bumped in ONE statement that also checks the
# token (revocation at once); RETURNING gives what the PATCH needs. A refused
# PATCH (412, 400) rolls the bump back with everything else.
LOCK_AND_BUMP_GROUP = """
UPDATE scim_group g SET version = g.version + 1, updated_at = %(now)s FROM tenant t
WHERE g.id = %(group)s AND g.tenant_id = %(tenant)s AND t.id = g.tenant_id AND t.token_hash = %(digest)s AND t.scim_enabled
RETURNING g.version, g.display_name, g.external_id, g.data
"""
MEMBERS = "SELECT member_id, member_type FROM group_member WHERE group_id = %s"


def _known_members(ids: str) -> str:
    """The CTEs ending in `known (id, kind)`: which ids of `ids` (an SQL varchar[] expression) are Users of
    the tenant not deleted ('User') or its Groups ('Group'), for the statements that add members."""
    return f"""
-- Looked up by primary key alone (MATERIALIZED keeps the planner from merging
-- the tenant and deletion checks into the scan): without statistics (a new
-- tenant, autovacuum behind) PostgreSQL may otherwise pick the partial userName
-- index and read every user of the tenant for each id.
users AS MATERIALIZED (SELECT id, tenant_id, deleted_at FROM scim_user WHERE id = ANY({ids})),
known_users AS MATERIALIZED (SELECT id FROM users WHERE tenant_id = %(tenant)s AND deleted_at IS NULL),
-- Only the ids that are no User of the tenant are looked for among the groups
-- (IdPs send Users by the thousand; a probe of the group index each costs ~1 µs).
groups AS MATERIALIZED (SELECT id, tenant_id FROM scim_group
    WHERE id = ANY(ARRAY(SELECT unnest({ids}) EXCEPT SELECT id FROM known_users))),
known AS MATERIALIZED (
    SELECT id, 'User'::varchar AS kind FROM known_users
    UNION ALL
    SELECT id, 'Group'::varchar FROM groups WHERE tenant_id = %(tenant)s
)"""


# Lookup of the wanted members (Users of the tenant not deleted, or its Groups)
# and the insert of the known ones in one statement; the caller refuses the PATCH
# (and so rolls the insert back) when some id is unknown.
ADD_KNOWN_MEMBERS = f"""
WITH
{_known_members("%(ids)s::varchar[]")}, ins AS (
    -- In id order: neighbouring keys land on the same index pages one after another.
    INSERT INTO group_member (group_id, member_id, tenant_id, member_type)
    SELECT %(group)s, id, %(tenant)s, kind FROM known ORDER BY id
    ON CONFLICT (group_id, member_id) DO NOTHING RETURNING member_id, member_type
)
SELECT (SELECT array_agg(id) FROM known), (SELECT array_agg(member_id) FROM ins WHERE member_type = 'User')
"""
REWRITE_GROUP = """
UPDATE scim_group SET display_name = %(name)s, display_name_key = %(key)s, external_id = %(external_id)s,
       data = %(data)s::json
WHERE id = %(group)s
"""
# A PATCH that only adds members (what IdPs send, by the thousand) in ONE
# statement, one round trip, autocommit: the token checked, the member ids (one
# JSON parameter, unpacked by the server) looked up by primary key, the group's
# version bumped only when every id is a User or Group of the tenant, the rows
# inserted and the sync event appended only when the bump happened. A refused
# PATCH (unknown member, group or token) changes nothing; the last column says
# which refusal it is. The event's user ids are the inserted Users, sorted by
# code point (COLLATE "C", as Python sorts) and written compactly as
# GroupWrite.record_event writes them.
ADD_GROUP_MEMBERS = f"""
WITH
t AS (SELECT 1 FROM tenant WHERE id = %(tenant)s AND token_hash = %(digest)s AND scim_enabled),
w AS (SELECT ARRAY(SELECT json_array_elements_text(%(ids)s::json))::varchar[] AS ids),
{_known_members("(SELECT ids FROM w)::varchar[]")}, bump AS (
    UPDATE scim_group g SET version = g.version + 1, updated_at = %(now)s
    WHERE g.id = %(group)s AND g.tenant_id = %(tenant)s AND EXISTS (SELECT 1 FROM t)
      AND (SELECT count(*) FROM known) = %(count)s
    RETURNING g.version
), ins AS (
    INSERT INTO group_member (group_id, member_id, tenant_id, member_type)
    SELECT %(group)s, known.id, %(tenant)s, known.kind FROM known, bump ORDER BY known.id
    ON CONFLICT (group_id, member_id) DO NOTHING RETURNING member_id, member_type
), ev AS (
    INSERT INTO sync_event (tenant_id, kind, user_ids, created_at)
    SELECT %(tenant)s, 'group_updated', coalesce(array_to_json((
        SELECT array_agg(member_id ORDER BY member_id COLLATE "C") FROM ins WHERE member_type = 'User')), '[]'::json),
        %(now)s
    FROM bump
)
SELECT (SELECT version FROM bump), EXISTS (SELECT 1 FROM t),
       CASE WHEN NOT EXISTS (SELECT 1 FROM bump) THEN
           EXISTS (SELECT 1 FROM scim_group WHERE id = %(group)s AND tenant_id = %(tenant)s) END,
       CASE WHEN NOT EXISTS (SELECT 1 FROM bump) THEN ARRAY(SELECT id FROM known) END
"""
GROUP_EVENT = "INSERT INTO sync_event (tenant_id, kind, user_ids, created_at) VALUES (%s, 'group_updated', %s::json, %s)"


def conninfo(database_url: str) -> str:
    """libpq connection string of a SQLAlchemy PostgreSQL URL (the driver suffix dropped)."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class LockedGroup:
    """A group a write holds locked, its version already bumped."""

    version: int
    display_name: str
    external_id: str | None
    data: dict[str, Any]


class GroupWrite:
    """One group write's transaction: the locked group and what the write may do to it."""

    def __init__(self, conn: AsyncConnection[Any], tenant_id: str, group_id: str, group: LockedGroup, now: Any) -> None:
        self.conn = conn
        self.tenant_id = tenant_id
        self.group_id = group_id
        self.group = group
        self.now = now

    async def rewrite(self, name: str, external_id: str | None, data: dict[str, Any]) -> None:
        """Store the group's new displayName, externalId and document."""
        await self.conn.execute(REWRITE_GROUP, {
            "name": name, "key": folded_key(name, "displayName"), "external_id": external_id,
            "data": orjson.dumps(data).decode(), "group": self.group_id,
        })

    async def apply_members(self, changes: MemberChanges) -> list[str]:
        """The member rows of the write (as members.apply_member_changes); the users whose membership changed."""
        conn, group_id = self.conn, self.group_id
        if changes.replace is not None:
            current = {mid: kind for mid, kind in await (await conn.execute(MEMBERS, (group_id,))).fetchall()}
            add = {mid: t for mid, t in changes.replace.items() if mid not in current}
            remove = {mid for mid in current if mid not in changes.replace}
        else:
            add, remove = changes.add, changes.remove
        touched: list[str] = []
        if add:
            if group_id in add:
                raise InvalidValueError("A group cannot be a member of itself.")
            ids = list(add)
            known, users = await (await conn.execute(  # type: ignore[misc]
                ADD_KNOWN_MEMBERS, {"ids": ids, "tenant": self.tenant_id, "group": group_id})).fetchone()
            known = set(known or ())
            unknown = [i for i in ids if i not in known]
            if unknown:
                shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
                raise InvalidValueError(f"Members must be Users or Groups of this tenant; unknown: {shown}.")
            touched.extend(users or ())
        if remove:
            removed = await conn.execute(PG_REMOVE_MEMBERS, {"group_id": group_id, "ids": sorted(remove)})
            touched.extend(mid for mid, kind in await removed.fetchall() if kind == "User")
        return touched

    async def record_event(self, user_ids: list[str]) -> None:
        """The write's sync event (sent with the COMMIT in pipeline mode)."""
        await self.conn.execute(GROUP_EVENT, (self.tenant_id, orjson.dumps(sorted(set(user_ids))).decode(), self.now))


# Statements in flight at once per tenant and process: one would make each batch
# wait for the previous one's commit (its WAL flush); a few overlap those waits.
SENDERS_PER_TENANT = 2

# (authorized, created) of one create: the token opened the tenant; the row was inserted.
CreateOutcome = tuple[bool, bool]


@dataclass
class _PendingCreate:
    row: dict[str, Any]
    done: asyncio.Future[CreateOutcome]


class CreateBatcher:
    """Concurrent user creates of one tenant and token share one statement (a group commit for creates).

    The first create of a tenant starts a sender; creates that arrive while its
    statement runs wait for the next one, up to `max_rows` per statement. Each
    create is answered only after the statement that holds it committed, with
    its own outcome (created, userName taken, token refused). A statement that
    created users calls `after_commit(tenant_id)` (the wake-up of the tenant's
    reconcile) once, after its commit and before any of its creates is
    answered: one wake-up per batch, not one per create. When a statement
    fails for a reason other than the database being unreachable (a value
    PostgreSQL refuses), its creates are sent again one by one, so one bad row
    answers for itself and no other create fails with it.
    """

    def __init__(self, database: "AsyncDatabase", max_rows: int, senders: int = SENDERS_PER_TENANT,
                 after_commit: Callable[[str], Awaitable[Any]] | None = None) -> None:
        self.database = database
        self.max_rows = max(1, max_rows)
        self.senders = max(1, senders)
        self.after_commit = after_commit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[tuple[str, str], list[_PendingCreate]] = {}
        self._tasks: dict[tuple[str, str], set[asyncio.Task[None]]] = {}

    async def create(self, tenant_id: str, digest: str, row: dict[str, Any]) -> CreateOutcome:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A batcher's futures and tasks belong to one loop (a test's asyncio.run makes a new one each time).
            self._loop, self._waiting, self._tasks = loop, {}, {}
        key = (tenant_id, digest)
        pending = _PendingCreate(row, loop.create_future())
        self._waiting.setdefault(key, []).append(pending)
        senders = self._tasks.setdefault(key, set())
        if len(senders) < self.senders:
            senders.add(loop.create_task(self._send(key)))
        return await pending.done

    async def _send(self, key: tuple[str, str]) -> None:
        try:
            while waiting := self._waiting.get(key):
                batch, rest = waiting[:self.max_rows], waiting[self.max_rows:]
                if rest:
                    self._waiting[key] = rest
                else:
                    del self._waiting[key]
                # A create whose request was cancelled (the client left) before its turn is not sent.
                batch = [pending for pending in batch if not pending.done.done()]
                if not batch:
                    continue
                try:
                    await self._run(key, batch)
                except BaseException as exc:
                    _answer_all(batch, exc)  # cancelled (the loop shuts down): nobody waits for ever
                    raise
        finally:
            # In the same step as the last look at the queue: a create that comes after it starts a new sender.
            senders = self._tasks.get(key)
            task = asyncio.current_task()
            if senders is not None and task is not None:
                senders.discard(task)
                if not senders:
                    del self._tasks[key]

    async def _run(self, key: tuple[str, str], batch: list[_PendingCreate]) -> None:
        tenant_id, digest = key
        try:
            authorized, created = await self.database.insert_users(tenant_id, digest, [p.row for p in batch])
        except UnavailableError as exc:
            _answer_all(batch, exc)
            return
        except Exception as exc:  # noqa: BLE001 - re-sent one by one below, so each create answers for itself
            if len(batch) == 1:
                _answer_all(batch, exc)
                return
            log.warning("a batch of %d user creates failed (%s); sending them one by one", len(batch),
                        type(exc).__name__)
            for pending in batch:
                await self._run(key, [pending])
            return
        try:
            if created and self.after_commit is not None:
                await self.after_commit(tenant_id)
        except Exception:  # noqa: BLE001 - the users are committed; the sweep delivers the wake-up
            log.exception("wake-up after a batch of user creates of tenant %s failed; the sweep will deliver it",
                          tenant_id)
        finally:
            # Committed whatever became of the wake-up: each create answers its own outcome.
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_result((authorized, pending.row["id"] in created))


def _answer_all(batch: list[_PendingCreate], exc: BaseException) -> None:
    for pending in batch:
        if not pending.done.done():
            pending.done.set_exception(exc)


class AsyncDatabase:
    """A psycopg async pool per event loop, opened on first use (nothing connects at import or build time)."""

    def __init__(self, database_url: str, *, max_size: int = 20,
                 checkout_timeout: float = CHECKOUT_TIMEOUT_SECONDS,
                 statement_timeout: float | None = None, connect_timeout: float | None = None,
                 create_batch_max: int = 64, after_create: Callable[[str], Awaitable[Any]] | None = None) -> None:
        self._conninfo = conninfo(database_url)
        # The same statement and connect timeouts as the engine (models/db.py).
        self._connect_args = postgres_connect_args(statement_timeout, connect_timeout)
        self.max_size = max_size
        self.checkout_timeout = checkout_timeout
        self._pool: AsyncConnectionPool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening = asyncio.Lock()
        # after_create: called once per statement that created users, after its commit (the wake-up).
        self.creates = CreateBatcher(self, create_batch_max, after_commit=after_create)

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
                    kwargs={"autocommit": True, **self._connect_args},
                )
                await pool.open()
                self._pool = pool
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        try:
            pool = await self._current()
            async with pool.connection(timeout=self.checkout_timeout) as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            # The server restarts or is gone: a retryable refusal, never a crash or a
            # hang (the pool drops the broken connection and reconnects by itself).
            log.warning("database unavailable on the SCIM hot path (%s)", type(exc).__name__)
            raise UnavailableError("The database is unavailable; retry shortly.") from None

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
        """Write the tenant's last_request_at."""
        async with self.connection() as conn:
            await conn.execute(TOUCH, (utcnow(), tenant_id))

    async def create_user(self, tenant_id: str, digest: str, doc: dict[str, Any]) -> dict[str, Any] | None:
        """Insert a user and its event, committed, in one statement that concurrent creates of the tenant
        may share (CreateBatcher); the row, or None when the token is not this tenant's."""
        row = new_user_row(tenant_id, doc)
        authorized, created = await self.creates.create(tenant_id, digest, row)
        if not authorized:
            return None
        if not created:
            raise UniquenessError(f"userName '{row['user_name']}' is already taken in this tenant.")
        return row

    async def add_group_members(self, tenant_id: str, digest: str, group_id: str, member_ids: list[str]) -> int | None:
        """Add members to a group in one statement; its new version, or None when the token is refused.

        `member_ids` are distinct and do not name the group itself. An id that is
        no User or Group of the tenant refuses the whole PATCH, and nothing changes.
        """
        params = {
            "tenant": tenant_id, "digest": digest, "group": group_id, "ids": orjson.dumps(member_ids).decode(),
            "count": len(member_ids), "now": utcnow(),
        }
        async with self.connection() as conn:
            version, authorized, group_found, known = await (  # type: ignore[misc]
                await conn.execute(ADD_GROUP_MEMBERS, params)).fetchone()
        if version is not None:
            return version
        if not authorized:
            return None
        if not group_found:
            raise NotFoundError(f"Group '{group_id}' not found.")
        found = set(known or ())
        unknown = [i for i in member_ids if i not in found]
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise InvalidValueError(f"Members must be Users or Groups of this tenant; unknown: {shown}.")

    async def insert_users(self, tenant_id: str, digest: str, rows: list[dict[str, Any]]) -> tuple[bool, set[str]]:
        """Insert these users and one event naming those inserted, in one statement: (token opened the tenant,
        ids inserted). A row whose userName is taken (or taken by an earlier row of the list) is left out."""
        params = {
            "digest": digest, "tenant": tenant_id, "now": utcnow(),
            "rows": orjson.dumps([{"n": n, **{column: row[column] for column in _BATCH_COLUMNS}}
                                  for n, row in enumerate(rows)]).decode(),
        }
        async with self.connection() as conn:
            authorized, created, _ = await (await conn.execute(CREATE_USERS, params)).fetchone()  # type: ignore[misc]
        return bool(authorized), set(created or ())

    @asynccontextmanager
    async def group_write(self, tenant_id: str, digest: str, group_id: str) -> AsyncIterator[GroupWrite | None]:
        """A group write's transaction, the group locked; None when the token is refused.

        Pipeline mode: BEGIN goes with the first statement and the last
        statements with COMMIT, so a member PATCH is three round trips.
        """
        now = utcnow()
        async with self.connection() as conn, conn.pipeline(), conn.transaction():
            row = await (await conn.execute(
                LOCK_AND_BUMP_GROUP, {"now": now, "group": group_id, "tenant": tenant_id, "digest": digest})).fetchone()
            if row is None:
                found = await (await conn.execute(TENANT_OF_TOKEN, (digest,))).fetchone()
                if found is None or found[0] != tenant_id or not found[1]:
                    yield None
                    return
                raise NotFoundError(f"Group '{group_id}' not found.")
            yield GroupWrite(conn, tenant_id, group_id, LockedGroup(*row), now)
