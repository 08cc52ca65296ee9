"""Outages on the request path: a database that cannot be reached is a 503 with Retry-After (never
a 500), and /readyz says what is down with a short reason that holds no secret."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import redis
from sqlalchemy.exc import OperationalError, ProgrammingError

from api.app import READY_PROBE_SECONDS, Services, create_app
from models.db import database_unavailable, make_engine
from tests.api.helpers import asgi_client
from tests.conftest import ADMIN_TOKEN, free_port

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
SECRET = "pw-that-must-not-leak"


def _serve(app, method: str, url: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        async with asgi_client(app, "http://sally.test") as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(go())


@pytest.fixture
def dead_database_app(base_settings):
    """The app over a PostgreSQL URL nobody listens on (a database host that is restarting)."""
    engine = make_engine(f"postgresql+psycopg://sally:{SECRET}@127.0.0.1:{free_port()}/sally")
    app = create_app(base_settings, Services(engine, lambda tenant_id: None, lambda: True))
    yield app
    engine.dispose()


def test_a_scim_write_while_the_database_is_down_is_a_503_with_retry_after(dead_database_app):
    """Given the database unreachable, When the IdP creates a user,
    Then it gets a SCIM 503 with Retry-After (RFC 7231 §6.6.4), never a 500, and no secret in the body."""
    response = _serve(dead_database_app, "POST", "/scim/v2/t1/Users", json={"schemas": [USER], "userName": "a@x.com"},
                      headers={"Authorization": "Bearer whatever"})
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"].isdigit()
    body = response.json()
    assert body["status"] == "503"
    assert "urn:ietf:params:scim:api:messages:2.0:Error" in body["schemas"]
    assert SECRET not in response.text and "127.0.0.1" not in response.text


def test_an_admin_call_while_the_database_is_down_is_a_503_with_retry_after(dead_database_app):
    """Given the database unreachable, When the admin lists tenants' users,
    Then the admin API answers 503 {"error", "detail"} with Retry-After."""
    response = _serve(dead_database_app, "GET", "/admin/api/tenants/t1/users",
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"].isdigit()
    assert response.json()["error"] == "unavailable"
    assert SECRET not in response.text


def test_readyz_names_the_database_as_down_without_its_address_or_password(dead_database_app):
    """Given the database unreachable and the broker up, When /readyz is asked,
    Then 503 and the body says the database is down, with the error's class only."""
    response = _serve(dead_database_app, "GET", "/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["database"] is False and body["broker"] is True
    assert body["down"] == {"database": "OperationalError"}
    assert SECRET not in response.text


def test_readyz_names_an_unreachable_broker(base_settings, engine):
    """Given Redis refusing connections, When /readyz is asked, Then 503 with the broker's reason."""
    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, retry=None)
    app = create_app(base_settings, Services(engine, lambda tenant_id: None, dead.ping))
    response = _serve(app, "GET", "/readyz")
    assert response.status_code == 503
    assert response.json()["database"] is True
    assert response.json()["down"] == {"broker": "ConnectionError"}


def test_readyz_answers_even_when_the_broker_hangs(base_settings, engine):
    """Given a broker check that never returns (a stalled Redis with no timeout),
    When /readyz is asked, Then it still answers, 503, saying the broker gave no answer in time."""
    app = create_app(base_settings, Services(engine, lambda tenant_id: None, lambda: time.sleep(READY_PROBE_SECONDS + 3)))
    started = time.monotonic()
    response = _serve(app, "GET", "/readyz")
    waited = time.monotonic() - started
    assert response.status_code == 503
    assert response.json()["down"] == {"broker": f"no answer within {READY_PROBE_SECONDS:g} s"}
    # Not a speed figure: it proves the probe is bounded rather than as long as the hang.
    assert waited < READY_PROBE_SECONDS + 2.5


def test_only_connection_level_errors_count_as_unavailable():
    """A lost connection or a restart is an outage (503); a bad statement is a bug (500)."""
    lost = OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    assert database_unavailable(lost)
    import sqlite3

    assert database_unavailable(OperationalError("x", {}, sqlite3.OperationalError("database is locked")))
    assert not database_unavailable(OperationalError("x", {}, sqlite3.OperationalError("no such table: tenant")))
    assert not database_unavailable(ProgrammingError("x", {}, Exception("syntax error")))
    assert not database_unavailable(ValueError("nope"))


def test_a_bulk_operation_the_database_cannot_take_is_its_own_503(base_settings, tenant, engine):
    """Given a Bulk request of three creates, and the database going away for the second one
    When it is sent, Then the first is created (201), the second answers 503 with nothing written,
    the third is created again once the database is back (RFC 7644 §3.7.3: each operation its own status)."""
    from sqlalchemy import event, func, select

    from models.tables import ScimUser

    own = make_engine(base_settings.database_url)
    failing = {"left": 1}
    driver_error = _driver_operational_error(own)

    @event.listens_for(own, "before_cursor_execute")
    def cut(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO SCIM_USER") and "b2@x.com" in str(parameters):
            if failing["left"]:
                failing["left"] -= 1
                raise driver_error

    app = create_app(base_settings, Services(own, lambda tenant_id: None, lambda: True))
    operations = [
        {"method": "POST", "path": "/Users", "bulkId": f"b{i}", "data": {"schemas": [USER], "userName": f"b{i}@x.com"}}
        for i in (1, 2, 3)
    ]
    response = _serve(app, "POST", f"/scim/v2/{tenant.tenant_id}/Bulk",
                      json={"schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"], "Operations": operations},
                      headers={"Authorization": f"Bearer {tenant.token}"})
    own.dispose()
    assert response.status_code == 200, response.text
    assert [op["status"] for op in response.json()["Operations"]] == ["201", "503", "201"]
    assert response.json()["Operations"][1]["response"]["status"] == "503"
    with engine.connect() as connection:
        names = set(connection.execute(select(ScimUser.user_name).where(ScimUser.tenant_id == tenant.tenant_id)).scalars())
        assert names == {"b1@x.com", "b3@x.com"}
        assert connection.execute(select(func.count()).select_from(ScimUser)).scalar() == 2


def _driver_operational_error(engine) -> Exception:
    """The driver's own "connection lost" error, as a restart makes it raise."""
    if engine.dialect.name == "postgresql":
        import psycopg

        return psycopg.OperationalError("server closed the connection unexpectedly")
    import sqlite3

    return sqlite3.OperationalError("database is locked")
