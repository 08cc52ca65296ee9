"""Wake-ups: a reconcile_tenant message after the commit, coalesced per tenant, never failing a write."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import redis
from sqlalchemy import select

from api.app import Services, create_app
from models.tables import ScimUser
from tests.api.helpers import asgi_client
from tests.fakes.silent_server import SilentServer
from workers.broker import make_broker
from workers.names import RECONCILE_QUEUE
from workers.wakeup import Waker, pending_key

USER = "urn:ietf:params:scim:schemas:core:2.0:User"


def _messages(client: redis.Redis, broker) -> list[bytes]:
    ids = client.lrange(f"{broker.namespace}:{RECONCILE_QUEUE}", 0, -1)
    return [client.hget(f"{broker.namespace}:{RECONCILE_QUEUE}.msgs", i) for i in ids]


def test_the_wake_up_is_sent_after_the_commit(base_settings, engine, tenant):
    """Given the SCIM app with a wake-up that looks at the database,
    When a user is created, Then the wake-up happens once and already sees the committed row."""
    seen: list[bool] = []

    def wake(tenant_id: str) -> None:
        with engine.connect() as connection:
            seen.append(connection.execute(select(ScimUser.id).where(ScimUser.tenant_id == tenant_id)).first() is not None)

    app = create_app(base_settings, Services(engine, wake, lambda: True))

    async def create() -> httpx.Response:
        async with asgi_client(app, tenant.tenant_url) as client:
            return await client.post("/Users", json={"schemas": [USER], "userName": "w@x.com"},
                                     headers={"Authorization": f"Bearer {tenant.token}"})

    assert asyncio.run(create()).status_code == 201
    assert seen == [True]


def test_wake_ups_are_coalesced_per_tenant(base_settings, redis_client):
    """Given no reconcile pending, When a tenant is woken three times, Then one message is queued;
    When the worker clears the flag (as reconcile_tenant does under the lock), the next write sends another."""
    settings = dataclasses.replace(base_settings, redis_namespace=base_settings.redis_namespace + "wk")
    broker = make_broker(settings, settings.redis_url)
    waker = Waker(broker, redis_client, settings.redis_namespace)
    assert [waker.wake("t1") for _ in range(3)] == [True, False, False]
    assert waker.wake("t2") is True
    assert len(_messages(redis_client, broker)) == 2
    redis_client.delete(pending_key(settings.redis_namespace, "t1"))
    assert waker.wake("t1") is True
    assert len(_messages(redis_client, broker)) == 3
    assert all(b'"reconcile_tenant"' in m for m in _messages(redis_client, broker))


def test_a_broker_outage_never_fails_the_write(base_settings, redis_client):
    """Given Redis unreachable, When a write wakes its tenant, Then wake() returns False without raising
    (the write is committed; the sweep delivers the wake-up later)."""
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=None)
    settings = dataclasses.replace(base_settings, redis_url="redis://127.0.0.1:1/0")
    waker = Waker(make_broker(settings, settings.redis_url), dead, settings.redis_namespace)
    assert waker.wake("t1") is False


def test_a_stalled_redis_costs_one_timeout_then_wake_ups_skip_it_for_a_while(base_settings):
    """Given a Redis that accepts and never answers, and the client's 0.3 s read timeout
    When a write wakes its tenant, Then wake() gives up after the timeout and returns False;
    When more writes follow within the quiet period, Then they send Redis nothing at all;
    When the quiet period has passed, Then the next wake-up tries Redis again."""
    from workers.broker import redis_client
    from workers.wakeup import QUIET_AFTER_FAILURE_SECONDS

    silent = SilentServer()
    try:
        settings = dataclasses.replace(base_settings, redis_url=f"redis://127.0.0.1:{silent.port}/0",
                                       redis_socket_timeout=0.3, redis_connect_timeout=0.3)
        now = [1000.0]
        client = redis_client(settings.redis_url, settings)
        waker = Waker(make_broker(settings, settings.redis_url), client, settings.redis_namespace, clock=lambda: now[0])
        assert waker.wake("t1") is False
        sent = silent.received
        assert sent > 0
        assert [waker.wake(t) for t in ("t1", "t2", "t3")] == [False, False, False]
        assert silent.received == sent
        now[0] += QUIET_AFTER_FAILURE_SECONDS + 0.1
        assert waker.wake("t4") is False
        assert silent.received > sent
        client.close()
    finally:
        silent.close()
