"""Concurrent user creates sharing one statement on PostgreSQL (models/directory/hotpath.py CreateBatcher).

Each create must still answer for itself: created, userName taken (RFC 7644
§3.3: 409 uniqueness), token refused; and a batch must leave exactly what the
creates one by one would have left: one row per created user and sync events
naming each created user once.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Awaitable, Callable

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from models.db import session_scope
from models.directory.errors import UniquenessError
from models.directory.hotpath import AsyncDatabase
from models.tables import Tenant

TOKEN = "batcher-token-0123456789abcdef0123456789abcdef"
DIGEST = hashlib.sha256(TOKEN.encode()).hexdigest()


@pytest.fixture
def pg(clean_db: Engine) -> Engine:
    if clean_db.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: the async hot path exists on PostgreSQL alone")
    return clean_db


@pytest.fixture
def tenant_id(pg: Engine) -> str:
    with session_scope(pg) as session:
        tenant = Tenant(name="Batch", scim_enabled=True, token_hash=DIGEST)
        session.add(tenant)
        session.flush()
        return tenant.id


def doc(user_name: str, **extra: Any) -> dict[str, Any]:
    return {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": user_name, "active": True, **extra}


def run_creates(engine: Engine, tenant_id: str, docs: list[dict[str, Any]], *, digest: str = DIGEST,
                batch_max: int = 64, before: list[dict[str, Any]] = (),
                after_create: Callable[[str], Awaitable[Any]] | None = None) -> list[Any]:
    """Each doc created at once (one task each, all queued before the first statement); each outcome in order."""

    async def go() -> list[Any]:
        database = AsyncDatabase(engine.url.render_as_string(hide_password=False), create_batch_max=batch_max,
                                 after_create=after_create)
        try:
            for earlier in before:
                await database.create_user(tenant_id, DIGEST, earlier)
            return await asyncio.gather(*(database.create_user(tenant_id, digest, d) for d in docs),
                                        return_exceptions=True)
        finally:
            await database.close()

    return asyncio.run(go())


def user_rows(engine: Engine, tenant_id: str) -> dict[str, str]:
    with engine.connect() as connection:
        return dict(connection.execute(
            text("SELECT id, user_name FROM scim_user WHERE tenant_id = :t"), {"t": tenant_id}).all())


def created_events(engine: Engine, tenant_id: str) -> list[list[str]]:
    with engine.connect() as connection:
        return [ids for kind, ids in connection.execute(
            text("SELECT kind, user_ids FROM sync_event WHERE tenant_id = :t ORDER BY id"), {"t": tenant_id})
            if kind == "user_created"]


def test_concurrent_creates_share_one_statement_and_one_event(pg, tenant_id):
    """Given 20 creates of distinct users queued at once
    When they are sent
    Then each gets its own row back, the table holds those 20 users,
    and ONE user_created event names all 20 (one commit for the batch)."""
    outcomes = run_creates(pg, tenant_id, [doc(f"user{i}@example.com") for i in range(20)])

    assert [o["user_name"] for o in outcomes] == [f"user{i}@example.com" for i in range(20)]
    assert user_rows(pg, tenant_id) == {o["id"]: o["user_name"] for o in outcomes}
    assert created_events(pg, tenant_id) == [sorted(o["id"] for o in outcomes)]
    # What the create answered (meta.created, the stored document) is what was stored.
    with pg.connect() as connection:
        stored = {uid: (created, data) for uid, created, data in connection.execute(
            text("SELECT id, created_at, data FROM scim_user WHERE tenant_id = :t"), {"t": tenant_id})}
    assert stored == {o["id"]: (o["created_at"], o["data"]) for o in outcomes}


def test_a_batch_holds_at_most_the_configured_number_of_creates(pg, tenant_id):
    """Given SCIM_CREATE_BATCH_MAX=3 and 7 creates queued at once
    Then they are sent as statements of at most 3: three events naming 3, 3 and 1 users, every user once."""
    outcomes = run_creates(pg, tenant_id, [doc(f"u{i}@example.com") for i in range(7)], batch_max=3)

    events = created_events(pg, tenant_id)
    assert sorted(len(ids) for ids in events) == [1, 3, 3]
    assert sorted(uid for ids in events for uid in ids) == sorted(o["id"] for o in outcomes)


def test_the_same_user_name_twice_in_one_batch_creates_it_once(pg, tenant_id):
    """Given two creates of one userName in different cases (caseExact false, RFC 7643 §4.1.1) and one other,
    queued at once
    Then the first is created, the second is refused as taken (uniqueness), the other is created,
    and the event names only the two created users."""
    first, second, other = run_creates(
        pg, tenant_id, [doc("Alice@Example.com"), doc("alice@example.COM"), doc("bob@example.com")])

    assert isinstance(second, UniquenessError)
    assert first["user_name"] == "Alice@Example.com" and other["user_name"] == "bob@example.com"
    assert sorted(user_rows(pg, tenant_id).values()) == ["Alice@Example.com", "bob@example.com"]
    assert created_events(pg, tenant_id) == [sorted([first["id"], other["id"]])]


def test_a_taken_user_name_fails_alone_in_its_batch(pg, tenant_id):
    """Given a stored user carol, then carol again and dave queued at once
    Then carol is refused as taken and dave is created."""
    carol, dave = run_creates(pg, tenant_id, [doc("carol@example.com"), doc("dave@example.com")],
                              before=[doc("carol@example.com")])

    assert isinstance(carol, UniquenessError)
    assert dave["user_name"] == "dave@example.com"
    assert sorted(user_rows(pg, tenant_id).values()) == ["carol@example.com", "dave@example.com"]


def test_a_token_that_does_not_open_the_tenant_creates_nothing(pg, tenant_id):
    """Given three creates with a digest that is not the tenant's token
    Then each is refused (None: the endpoint answers 401) and no user or event is written."""
    outcomes = run_creates(pg, tenant_id, [doc(f"x{i}@example.com") for i in range(3)],
                           digest=hashlib.sha256(b"wrong").hexdigest())

    assert outcomes == [None, None, None]
    assert user_rows(pg, tenant_id) == {}
    assert created_events(pg, tenant_id) == []


def test_a_row_postgresql_refuses_fails_alone_not_its_whole_batch(pg, tenant_id):
    """Given a create whose userName is longer than the column allows (refused by PostgreSQL itself),
    queued with two valid creates
    Then the long one fails with PostgreSQL's error, the two others are created, each named by an event."""
    ok1, bad, ok2 = run_creates(pg, tenant_id, [doc("ok1@example.com"), doc("x" * 600), doc("ok2@example.com")])

    assert isinstance(bad, Exception) and not isinstance(bad, UniquenessError)
    assert ok1["user_name"] == "ok1@example.com" and ok2["user_name"] == "ok2@example.com"
    assert sorted(user_rows(pg, tenant_id).values()) == ["ok1@example.com", "ok2@example.com"]
    assert sorted(uid for ids in created_events(pg, tenant_id) for uid in ids) == sorted([ok1["id"], ok2["id"]])


def test_a_batch_that_created_users_wakes_the_tenant_once_after_its_commit_and_before_its_answers(pg, tenant_id):
    """Given SCIM_CREATE_BATCH_MAX=4 and 6 creates queued at once, one of them a userName taken in its batch
    When they are sent (statements of 4 and 2)
    Then the tenant is woken once per statement, each time with that statement's users already committed
    (visible to another connection) and none of them answered yet: the reconcile the wake-up sends reads them."""
    wakes: list[tuple[str, int, int]] = []
    answered: list[str] = []

    async def wake(woken: str) -> None:
        await asyncio.sleep(0.01)  # a Redis round trip: the creates must still be waiting after it
        wakes.append((woken, len(user_rows(pg, tenant_id)), len(answered)))

    docs = [doc("a@example.com"), doc("A@example.com"), *(doc(f"u{i}@example.com") for i in range(4))]

    async def go() -> list[Any]:
        database = AsyncDatabase(pg.url.render_as_string(hide_password=False), create_batch_max=4,
                                 after_create=wake)
        database.creates.senders = 1  # one statement at a time, so each wake-up's batch is known

        async def create(d: dict[str, Any]) -> Any:
            try:
                return await database.create_user(tenant_id, DIGEST, d)
            finally:
                answered.append(d["userName"])

        try:
            return await asyncio.gather(*(create(d) for d in docs), return_exceptions=True)
        finally:
            await database.close()

    outcomes = asyncio.run(go())

    assert isinstance(outcomes[1], UniquenessError)
    assert wakes == [(tenant_id, 3, 0), (tenant_id, 5, 4)]


def test_a_batch_that_created_nobody_wakes_nobody(pg, tenant_id):
    """Given creates refused for their token, then a create of a userName already taken
    Then no wake-up is sent for them (nothing was committed); the one earlier create woke the tenant once."""
    wakes: list[str] = []

    async def wake(woken: str) -> None:
        wakes.append(woken)

    refused = run_creates(pg, tenant_id, [doc("x@example.com"), doc("y@example.com")],
                          digest=hashlib.sha256(b"wrong").hexdigest(), after_create=wake)
    taken = run_creates(pg, tenant_id, [doc("carol@example.com")], before=[doc("carol@example.com")],
                        after_create=wake)

    assert refused == [None, None] and isinstance(taken[0], UniquenessError)
    assert wakes == [tenant_id]


def test_a_failed_wake_up_still_answers_the_committed_creates(pg, tenant_id):
    """Given a wake-up that raises (Redis gone: the sweep delivers it later)
    Then the creates it followed are answered as created, and the rows are there."""
    async def wake(woken: str) -> None:
        raise ConnectionError("redis is gone")

    outcomes = run_creates(pg, tenant_id, [doc("e@example.com"), doc("f@example.com")], after_create=wake)

    assert [o["user_name"] for o in outcomes] == ["e@example.com", "f@example.com"]
    assert sorted(user_rows(pg, tenant_id).values()) == ["e@example.com", "f@example.com"]
