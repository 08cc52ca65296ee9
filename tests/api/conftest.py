"""tests/api: the fixtures of tests/conftest.py, made cheaper for a folder of ~300 live-server tests.

Same names, same behaviour; two costs removed (both worth moving into
tests/conftest.py, after which these overrides can go):
- the wipe uses DELETE on PostgreSQL too: TRUNCATE of ten tables costs ~50 ms
  a test there, DELETE of these small tables ~1 ms;
- every httpx.Client shares one SSL context: httpx otherwise loads the CA
  bundle for each client, ~20 ms CPU, twice per test.
"""

from __future__ import annotations

import logging
from typing import Iterator

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.api.helpers import SSL_CONTEXT
from tests.conftest import ADMIN_TOKEN, TABLES, LiveServer, ScimTenant


class _Crashes(logging.Handler):
    """Collects what the app logs when it answers 500 (api/app.py `on_crash`)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_server_errors() -> Iterator[None]:
    """No test in this folder may make the server answer 500 (STYLE.md "Errors"), even one
    that only looks at a status it expected."""
    handler = _Crashes()
    logger = logging.getLogger("api")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.records, f"the server answered 500: {handler.records[0].getMessage()}"


@pytest.fixture
def clean_db(engine: Engine) -> Engine:
    """Every test starts with empty tables (children first, so foreign keys hold)."""
    with engine.begin() as connection:
        for table in TABLES:
            connection.execute(text(f"DELETE FROM {table}"))
    return engine


@pytest.fixture
def admin(live_server: LiveServer, clean_db: Engine) -> Iterator[httpx.Client]:
    """An admin API client; the database is empty when the test starts."""
    with httpx.Client(
        base_url=f"{live_server.url}/admin/api",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
        verify=SSL_CONTEXT,
    ) as client:
        yield client


@pytest.fixture
def tenant(admin: httpx.Client) -> Iterator[ScimTenant]:
    """A tenant with SCIM set up for Entra, and a SCIM client holding its token."""
    created = admin.post("/tenants", json={"name": "Acme"})
    assert created.status_code == 201, created.text
    tenant_id = created.json()["tenant_id"]
    connected = admin.post(f"/tenants/{tenant_id}/scim", json={"provider": "entra"})
    assert connected.status_code == 201, connected.text
    body = connected.json()
    with httpx.Client(
        base_url=body["tenant_url"],
        headers={"Authorization": f"Bearer {body['token']}", "Content-Type": "application/scim+json"},
        timeout=30,
        verify=SSL_CONTEXT,
    ) as client:
        yield ScimTenant(tenant_id, body["tenant_url"], body["token"], client)
