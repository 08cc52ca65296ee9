"""The engine's PostgreSQL timeouts (issue 8): a runaway statement is cancelled, a silent server
is given up on, and both come from Settings."""

from __future__ import annotations

import dataclasses
import socket
import threading

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from models.db import engine_from_settings, make_engine


def test_a_statement_past_the_timeout_is_cancelled(base_settings, engine):
    """Given DATABASE_STATEMENT_TIMEOUT=0.2 s, When a statement runs for 2 s,
    Then PostgreSQL cancels it (the server, not the client, so its locks go too),
    and the next statement on a fresh connection works."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has no statement timeout")
    settings = dataclasses.replace(base_settings, database_statement_timeout=0.2)
    timed = engine_from_settings(settings)
    try:
        with timed.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar_one() == "200ms"
            with pytest.raises(OperationalError, match="statement timeout"):
                connection.execute(text("SELECT pg_sleep(2)"))
        with timed.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        timed.dispose()


def test_the_default_settings_set_a_30_s_statement_timeout(base_settings, engine):
    """The default is on (30 s), not PostgreSQL's 0 (no limit)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has no statement timeout")
    default = engine_from_settings(base_settings)
    try:
        with default.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar_one() == "30s"
    finally:
        default.dispose()


def test_a_server_that_never_answers_is_given_up_on_after_the_connect_timeout():
    """Given a socket that accepts TCP connections and never speaks (a hung server),
    When the engine connects with connect_timeout=1,
    Then the attempt fails with an OperationalError instead of waiting forever."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    engine = make_engine(f"postgresql://sally@127.0.0.1:{port}/sally", connect_timeout=1)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            with engine.connect():
                outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    thread = threading.Thread(target=connect, daemon=True)
    try:
        thread.start()
        # Far longer than libpq's 2 s floor; without the timeout the thread would still be waiting.
        thread.join(timeout=60)
        assert not thread.is_alive(), "the connection attempt did not give up"
        assert isinstance(outcome[0], OperationalError), outcome
    finally:
        silent.close()
        engine.dispose()


def test_the_async_hot_path_pool_has_the_same_timeouts(base_settings, engine):
    """The PostgreSQL hot path's psycopg pool (models/directory/hotpath.py) gets the engine's timeouts."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: the async hot path exists on PostgreSQL alone")
    import asyncio

    from models.directory.hotpath import AsyncDatabase

    async def shown() -> str:
        database = AsyncDatabase(base_settings.database_url, statement_timeout=0.2, connect_timeout=3)
        try:
            async with database.connection() as conn:
                cursor = await conn.execute("SHOW statement_timeout")
                return (await cursor.fetchone())[0]
        finally:
            await database.close()

    assert asyncio.run(shown()) == "200ms"
