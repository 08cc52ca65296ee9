"""Poison tenants: a tenant whose reconcile keeps failing is quarantined with a growing backoff,
shown in `GET …/sync` and the logs, skipped by the sweep until the backoff passes, and cleared by
a success."""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta

import pytest
from dramatiq import Message, Worker
from dramatiq.brokers.stub import StubBroker
from sqlalchemy import insert, update

from models.tables import SyncEvent, Tenant, utcnow
from tests.conftest import connect_tenant
from tests.workers.support import bind_actors, drain
from workers import runtime
from workers.names import QUEUES, RECONCILE_QUEUE
from workers.quarantine import QuarantinePolicy, TenantQuarantined, counts_as_poison
from workers.sweep import Sweeper

USER = "urn:ietf:params:scim:schemas:core:2.0:User"


def test_the_backoff_doubles_from_the_threshold_and_is_capped():
    """N−1 failures: no quarantine; N: the base backoff; then doubling, never past the cap."""
    policy = QuarantinePolicy(after=3, backoff=60, max_backoff=3600)
    assert [policy.backoff_for(n) for n in (1, 2)] == [None, None]
    assert [policy.backoff_for(n).total_seconds() for n in (3, 4, 5, 9, 1000)] == [60, 120, 240, 3600, 3600]


def test_outages_are_not_poison():
    """A database or Redis outage says nothing about the tenant's data."""
    import redis
    from sqlalchemy.exc import OperationalError

    assert not counts_as_poison(redis.TimeoutError("stalled"))
    assert not counts_as_poison(OperationalError("SELECT 1", {}, Exception("server closed the connection")))
    assert counts_as_poison(TypeError("'int' object is not iterable"))


@pytest.fixture
def worker_runtime(base_settings, admin):
    """The real actors bound to a StubBroker, over the test database and Redis, quarantining after 3."""
    broker = StubBroker()
    actors = bind_actors(broker)
    settings = dataclasses.replace(base_settings, quarantine_after=3, quarantine_backoff=60, quarantine_max_backoff=600)
    built = runtime.build(settings, broker, settings.redis_url)
    runtime.install(built)
    try:
        yield built, broker, actors
    finally:
        runtime.install(None)  # type: ignore[arg-type]
        built.engine.dispose()
        built.redis.close()
        broker.close()


def _queued_tenants(broker: StubBroker) -> list[str]:
    queue = broker.queues[RECONCILE_QUEUE]
    found = []
    while not queue.empty():
        found.append(Message.decode(queue.get_nowait()).args[0])
    return found


def test_a_poison_tenant_is_quarantined_shown_skipped_and_cleared_by_a_success(
    worker_runtime, admin, engine, caplog
):
    """Given a tenant whose unapplied events make reconcile fail (a malformed event row)
    When reconcile fails twice, Then GET …/sync counts the failures and shows the error, no quarantine yet;
    When it fails a third time, Then the tenant is quarantined for the base backoff, the log says so,
    and the actor raises TenantQuarantined (in its `throws`: Dramatiq does not retry the message);
    Then further reconciles are skipped and the sweep does not re-send the tenant;
    When the backoff has passed, Then the sweep sends it again;
    When the data is mended, Then the reconcile succeeds and the quarantine fields are cleared."""
    rt, broker, actors = worker_runtime
    scim = connect_tenant(admin)
    created = scim.client.post("/Users", json={"schemas": [USER], "userName": "p@x.com", "active": True})
    assert created.status_code == 201, created.text
    with engine.begin() as connection:
        poison = connection.execute(insert(SyncEvent).values(
            tenant_id=scim.tenant_id, kind="user_created", user_ids=5, created_at=utcnow(),
        ).returning(SyncEvent.id)).scalar_one()

    def sync() -> dict:
        response = admin.get(f"/tenants/{scim.tenant_id}/sync")
        assert response.status_code == 200, response.text
        return response.json()

    for attempt in (1, 2):
        with pytest.raises(TypeError):
            actors.reconcile_tenant(scim.tenant_id)
        state = sync()
        assert (state["reconcile_failures"], state["quarantined_until"]) == (attempt, None)
        assert state["last_error"] == "TypeError: 'int' object is not iterable"

    with caplog.at_level(logging.ERROR, logger="workers.quarantine"):
        before = utcnow()
        with pytest.raises(TenantQuarantined) as quarantined:
            actors.reconcile_tenant(scim.tenant_id)
    assert quarantined.value.reason.endswith("after: TypeError: 'int' object is not iterable")
    state = sync()
    assert state["reconcile_failures"] == 3 and state["events_applied"] < state["events_total"]
    until = state["quarantined_until"]
    assert until is not None
    from datetime import datetime

    wait = datetime.fromisoformat(until.replace("Z", "+00:00")) - before
    assert timedelta(seconds=59) <= wait <= timedelta(seconds=61)
    assert any("quarantined" in r.getMessage() and scim.tenant_id in r.getMessage() for r in caplog.records)

    # Quarantined: a wake-up does nothing, and the sweep leaves the tenant alone.
    assert actors.reconcile_tenant(scim.tenant_id) is None
    assert sync()["reconcile_failures"] == 3
    rt.redis.delete(f"{rt.settings.redis_namespace}:sweep-lock")
    _queued_tenants(broker)
    Sweeper(rt).run_once()
    assert scim.tenant_id not in _queued_tenants(broker)

    # The backoff has passed: the sweep sends it again.
    with engine.begin() as connection:
        connection.execute(update(Tenant).where(Tenant.id == scim.tenant_id)
                           .values(quarantined_until=utcnow() - timedelta(seconds=1)))
    rt.redis.delete(f"{rt.settings.redis_namespace}:sweep-lock")
    Sweeper(rt).run_once()
    assert scim.tenant_id in _queued_tenants(broker)

    # Mended data: one success clears it all.
    with engine.begin() as connection:
        connection.execute(update(SyncEvent).where(SyncEvent.id == poison).values(user_ids=[]))
    actors.reconcile_tenant(scim.tenant_id)
    state = sync()
    assert (state["reconcile_failures"], state["quarantined_until"], state["last_error"]) == (0, None, None)
    assert state["events_applied"] == state["events_total"]
    scim.client.close()


def test_dramatiq_gives_up_the_message_that_quarantines_a_tenant(worker_runtime, admin, engine):
    """Given a poison tenant (quarantine after 3) and a real Dramatiq worker,
    When one reconcile message for it is sent, Then Dramatiq retries it until the third failure
    quarantines the tenant and then gives it up at once (one dead letter, no further retry, whatever
    the actor's max_retries), with the quarantine as its error."""
    rt, broker, actors = worker_runtime
    scim = connect_tenant(admin)
    with engine.begin() as connection:
        connection.execute(insert(SyncEvent).values(
            tenant_id=scim.tenant_id, kind="user_created", user_ids=5, created_at=utcnow()))
    worker = Worker(broker, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        actors.reconcile_tenant.send(scim.tenant_id)
        drain(broker, QUEUES)
    finally:
        worker.stop()

    [letter] = broker.dead_letters
    assert (letter.actor_name, letter.args, letter.options["retries"]) == ("reconcile_tenant", (scim.tenant_id,), 2)  # three attempts
    state = admin.get(f"/tenants/{scim.tenant_id}/sync").json()
    assert state["reconcile_failures"] == 3 and state["quarantined_until"] is not None
    scim.client.close()
