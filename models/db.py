"""Engine and sessions for SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from sqlalchemy import event, exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool
from sqlmodel import Session, create_engine

if TYPE_CHECKING:
    from models.settings import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Ids per IN (...) list: well under SQLite's 999 bound parameters of old builds.
BATCH = 500


def engine_from_settings(settings: "Settings", *, pool_size: int = 20) -> Engine:
    """The engine every process uses, with the statement and connect timeouts of its settings."""
    return make_engine(
        settings.database_url,
        pool_size=pool_size,
        statement_timeout=settings.database_statement_timeout,
        connect_timeout=settings.database_connect_timeout,
    )


def make_engine(
    database_url: str,
    *,
    pool_size: int = 20,
    statement_timeout: float | None = None,
    connect_timeout: float | None = None,
) -> Engine:
    """Build the engine; SQLite gets WAL, a busy timeout and immediate write locks;
    PostgreSQL gets a statement timeout and a connect timeout when given (seconds)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            poolclass=NullPool,
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(
        url,
        connect_args=postgres_connect_args(statement_timeout, connect_timeout),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
    )


def postgres_connect_args(statement_timeout: float | None, connect_timeout: float | None) -> dict[str, object]:
    """psycopg connection arguments for the two timeouts (seconds; None or 0 leaves one unset)."""
    args: dict[str, object] = {}
    if connect_timeout:
        # libpq counts whole seconds (and treats 1 as 2); it bounds the TCP
        # connect and the start-up handshake, so a server that accepts and
        # never answers cannot hold a request thread forever.
        args["connect_timeout"] = max(1, math.ceil(connect_timeout))
    if statement_timeout:
        # Set at connection start (no extra round trip per checkout): a runaway
        # query is cancelled by the server and its locks are released.
        args["options"] = f"-c statement_timeout={max(1, round(statement_timeout * 1000))}"
    return args


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        # A deferred transaction that reads and then writes can fail at once
        # with SQLITE_BUSY when another writer committed in between; taking
        # the write lock up front makes writers queue on the busy timeout.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


# SQLite's OperationalError also means "no such table" (a bug, not an outage):
# only these messages say the file is busy or gone for now.
_SQLITE_UNAVAILABLE = ("database is locked", "database is busy", "unable to open database", "disk i/o error")


def database_unavailable(error: BaseException) -> bool:
    """Whether an error says the database cannot be reached right now (restart, failover,
    pool exhausted), as opposed to a bug: the caller answers 503 with Retry-After."""
    if isinstance(error, exc.TimeoutError):  # the pool had no connection to give
        return True
    if not isinstance(error, exc.DBAPIError):
        return False
    if error.connection_invalidated or isinstance(error, exc.InterfaceError):
        return True
    if not isinstance(error, exc.OperationalError):
        return False
    if type(error.orig).__module__.startswith("sqlite3"):
        return any(text in str(error.orig).lower() for text in _SQLITE_UNAVAILABLE)
    # psycopg: connection refused or lost, server shutting down or starting, query cancelled.
    return True


def is_postgres(bind: Engine | Session) -> bool:
    """Whether an engine (or a session's bind) speaks PostgreSQL rather than SQLite."""
    engine = bind.get_bind() if isinstance(bind, Session) else bind
    return engine.dialect.name == "postgresql"


def insert_ignore(session: Session) -> Any:
    """The dialect's INSERT with ON CONFLICT DO NOTHING (both dialects spell it alike)."""
    return pg_insert if is_postgres(session) else sqlite_insert


def chunks(items: Sequence[Any], size: int = BATCH) -> Iterable[Sequence[Any]]:
    """Consecutive slices of at most `size` items, for IN (...) lists and multi-row inserts."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
