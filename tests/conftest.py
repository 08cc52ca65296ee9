"""Fixtures: real PostgreSQL or SQLite, real Redis or the embedded one, a live server."""

from __future__ import annotations

import logging
import os
import ssl
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

from api.server import PROTOCOL
from models.db import make_engine
from models.migrate import upgrade
from models.settings import Settings, normalise_database_url
from tests.fakes.ports import free_port
from tests.fakes.stripe_server import DEFAULT_WEBHOOK_SECRET

# CPython before 3.11.8 (and 3.12.2) keeps the AST constructor's recursion depth in
# shared state (gh-106905): two threads building ASTs at once leave it off, and every
# later ast.parse fails with "SystemError: AST constructor recursion depth mismatch"
# (seen in scim2-tester's checks and pytest's own rewriting). Formatting a traceback
# builds one AST per frame for its carets, and the live servers' and workers' threads
# log tracebacks while the test thread parses: without the carets no thread but the
# test's builds ASTs. Tracebacks keep their lines; only the ^^^ markers go.
if sys.version_info[:3] < (3, 11, 8) or (3, 12) <= sys.version_info[:3] < (3, 12, 2):
    traceback._extract_caret_anchors_from_line_segment = lambda _segment: None

ADMIN_TOKEN = "test-admin-token"
# One SSL context for every test client: httpx otherwise loads the CA bundle
# for each client (~20 ms of CPU, twice per live-server test).
SSL_CONTEXT = ssl.create_default_context()
TABLES = (
    "alert", "audit_log", "account_history", "stripe_event", "invitation", "purchase", "seat_count", "account",
    "group_member", "group_mapping", "sync_event", "scim_group", "scim_user", "tenant",
)


def _postgres_test_database(base_url: str) -> str:
    """A fresh database for this run on the server TEST_DATABASE_URL names."""
    url = make_url(normalise_database_url(base_url))
    name = f"sally_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = make_engine(url.set(database="postgres").render_as_string(hide_password=False))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def _drop_postgres_database(database_url: str) -> None:
    url = make_url(database_url)
    admin = make_engine(url.set(database="postgres").render_as_string(hide_password=False))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("var")


@pytest.fixture(scope="session")
def database_url(var_dir: Path) -> Iterator[str]:
    """PostgreSQL when TEST_DATABASE_URL (or DATABASE_URL) is set, else a SQLite file."""
    base = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if base and not base.startswith("sqlite"):
        url = _postgres_test_database(base)
        yield url
        _drop_postgres_database(url)
    else:
        yield base or f"sqlite:///{var_dir / 'test.db'}"


@pytest.fixture(scope="session")
def redis_url(var_dir: Path) -> Iterator[str]:
    """REDIS_URL when set, else the embedded Redis of the test var dir."""
    from workers.broker import release_embedded_redis, resolve_redis_url

    configured = os.environ.get("REDIS_URL")
    if configured:
        yield configured
        return
    yield resolve_redis_url(Settings(var_dir=var_dir, database_url="sqlite://"))
    release_embedded_redis()


@pytest.fixture(scope="session")
def base_settings(var_dir: Path, database_url: str, redis_url: str) -> Settings:
    port = free_port()
    return Settings(
        var_dir=var_dir,
        database_url=database_url,
        redis_url=redis_url,
        public_base_url=f"http://127.0.0.1:{port}",
        admin_token=ADMIN_TOKEN,
        port=port,
        # The fake Stripe signs its webhook events with this secret.
        stripe_webhook_secret=DEFAULT_WEBHOOK_SECRET,
        # Each run its own namespace: several runs may share one Redis server.
        redis_namespace=f"sallytest{os.getpid()}{uuid.uuid4().hex[:4]}",
        # The suite sends hundreds of requests a second and many wrong tokens from
        # one address; tests/api/test_limits.py and tests/api/web/test_session.py set these limits where they test them.
        scim_rate_limit=0,
        scim_auth_failure_limit=0,
        web_signin_failure_limit=0,
    )


@pytest.fixture(scope="session")
def engine(base_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(base_settings.database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def wipe(engine: Engine) -> None:
    """Empty every table, children first; DELETE, which on these small tables costs
    ~1 ms where PostgreSQL's TRUNCATE of ten tables costs ~50 ms."""
    with engine.begin() as connection:
        for table in TABLES:
            connection.execute(text(f"DELETE FROM {table}"))


class _Crashes(logging.Handler):
    """Collects what the app logs when it answers 500 (api/app.py, api/scim/http.py, api/admin.py)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_server_errors() -> Iterator[None]:
    """No test may make the server answer 500 (STYLE.md "Errors"), even one that only
    looks at a status it expected: every place that answers 500 logs under "api"."""
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
    """Every test starts with empty tables."""
    wipe(engine)
    return engine


@pytest.fixture(scope="session")
def redis_client(base_settings: Settings):
    from workers.broker import redis_client

    client = redis_client(base_settings.redis_url, base_settings)
    yield client
    for key in client.scan_iter(f"{base_settings.redis_namespace}*"):
        client.delete(key)


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test runner owns signals
        pass


@dataclass
class LiveServer:
    url: str
    settings: Settings
    app: object


@pytest.fixture(scope="session")
def live_server(base_settings: Settings, engine: Engine) -> Iterator[LiveServer]:
    """The real app under uvicorn on a free port, for the whole session."""
    from api.app import Services, create_app

    services = Services.from_settings(base_settings)
    services.engine.dispose()
    services.engine = engine
    app = create_app(base_settings, services)
    # With the app's lifespan, as in production: at the end of the session its shutdown closes the SCIM
    # hot path's async PostgreSQL pool and the async Redis clients in the server's own event loop.
    # And with the protocol `sally-scim web` serves with (api/server.py).
    config = uvicorn.Config(app, host="127.0.0.1", port=base_settings.port, log_level="warning", lifespan="on",
                            http=PROTOCOL)
    server = _Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    yield LiveServer(base_settings.public_base_url, base_settings, app)
    server.should_exit = True
    thread.join(timeout=30)
    # A socket left open by the app (its lifespan closes them all) keeps uvloop's close from returning.
    assert not thread.is_alive(), "the test server did not shut down within 30 s"


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


@dataclass
class ScimTenant:
    tenant_id: str
    tenant_url: str
    token: str
    client: httpx.Client


def connect_tenant(admin: httpx.Client, name: str = "Acme", provider: str = "entra", **billing: str) -> ScimTenant:
    created = admin.post("/tenants", json={"name": name, **billing})
    assert created.status_code == 201, created.text
    tenant_id = created.json()["tenant_id"]
    connected = admin.post(f"/tenants/{tenant_id}/scim", json={"provider": provider})
    assert connected.status_code == 201, connected.text
    body = connected.json()
    client = httpx.Client(
        base_url=body["tenant_url"],
        headers={"Authorization": f"Bearer {body['token']}", "Content-Type": "application/scim+json"},
        timeout=30,
        verify=SSL_CONTEXT,
    )
    return ScimTenant(tenant_id, body["tenant_url"], body["token"], client)


@pytest.fixture
def tenant(admin: httpx.Client) -> Iterator[ScimTenant]:
    """A tenant with SCIM set up for Entra, and a SCIM client holding its token."""
    scim = connect_tenant(admin)
    yield scim
    scim.client.close()
