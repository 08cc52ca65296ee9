"""Migrations ids_c and event_lz4: on PostgreSQL every column that holds one of our ids is in the "C" collation,
the model says so, and the migration keeps the rows and foreign keys both ways; sync events' ids use lz4."""

from __future__ import annotations

import json
import os

import pytest
from alembic import command
from sqlalchemy import text
from sqlmodel import SQLModel

import models.tables  # noqa: F401 - the tables of the metadata
from models.db import make_engine
from models.migrate import alembic_config
from models.tables import ID_TYPE
from tests.conftest import _drop_postgres_database, _postgres_test_database

C_COLUMNS = """
SELECT table_name, column_name FROM information_schema.columns
WHERE table_schema = 'public' AND collation_name = 'C'
"""
FOREIGN_KEYS = "SELECT conname FROM pg_constraint WHERE contype = 'f' ORDER BY conname"


def _id_columns() -> set[tuple[str, str]]:
    return {(table.name, column.name) for table in SQLModel.metadata.tables.values()
            for column in table.columns if column.type is ID_TYPE}


def test_the_columns_the_models_declare_as_ids_are_exactly_those_in_c(engine):
    """Given the schema the migrations built, Then the columns in "C" are exactly the models' id columns
    (a new id column without a migration, or a migration that missed one, fails here)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: SQLite compares bytes whatever the column")
    with engine.connect() as connection:
        in_c = {tuple(row) for row in connection.execute(text(C_COLUMNS))}
    assert in_c == _id_columns()
    assert ("group_member", "member_id") in in_c and ("tenant", "id") in in_c


def test_ids_c_keeps_rows_and_keys_and_goes_back():
    """Given a database at the revision before ids_c with a tenant, a user, a group and a membership
    When it is upgraded to ids_c, downgraded, and upgraded again
    Then the rows, the joins between them and the foreign keys are the same at each step, and the collation
    is "C" after each upgrade and the database's own after the downgrade."""
    base = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if not base or base.startswith("sqlite"):
        pytest.skip("PostgreSQL only: the migration changes nothing on SQLite")
    url = _postgres_test_database(base)
    engine = make_engine(url)
    try:
        config = alembic_config(engine)
        command.upgrade(config, "members")
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO tenant (id, name, created_at, scim_enabled, auto_invite, "
                                    "reconcile_failures) VALUES ('t1', 'T', now(), true, false, 0)"))
            connection.execute(text("INSERT INTO scim_user (id, tenant_id, user_name, user_name_key, active, data, "
                                    "version, created_at, updated_at) VALUES ('u1', 't1', 'A', 'a', true, '{}', 1, "
                                    "now(), now())"))
            connection.execute(text("INSERT INTO scim_group (id, tenant_id, display_name, display_name_key, data, "
                                    "version, created_at, updated_at) VALUES ('g1', 't1', 'G', 'g', '{}', 1, now(), "
                                    "now())"))
            connection.execute(text("INSERT INTO group_member VALUES ('g1', 'u1', 't1', 'User')"))
        join = text("SELECT t.id, u.id, g.id FROM group_member m JOIN scim_user u ON u.id = m.member_id "
                    "JOIN scim_group g ON g.id = m.group_id JOIN tenant t ON t.id = u.tenant_id")

        def state() -> tuple[list, list, int]:
            with engine.connect() as connection:
                return ([tuple(r) for r in connection.execute(join)],
                        [r[0] for r in connection.execute(text(FOREIGN_KEYS))],
                        len(connection.execute(text(C_COLUMNS)).all()))

        rows, keys, in_c = state()
        assert rows == [("t1", "u1", "g1")] and len(keys) == 11 and in_c == 0
        command.upgrade(config, "ids_c")
        assert state() == (rows, keys, len(_id_columns()))
        command.downgrade(config, "members")
        assert state() == (rows, keys, 0)
        command.upgrade(config, "ids_c")
        assert state() == (rows, keys, len(_id_columns()))
    finally:
        engine.dispose()
        _drop_postgres_database(url)


def test_sync_event_ids_are_compressed_with_lz4_where_the_server_has_it(engine):
    """Given a PostgreSQL server built with lz4, Then sync_event.user_ids is stored with lz4 (migration event_lz4),
    and a 1,000-id event written through it reads back whole."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: SQLite does not compress")
    with engine.begin() as connection:
        if not connection.execute(text("SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                                       "WHERE name = 'default_toast_compression'")).scalar():
            pytest.skip("this server was built without lz4")
        method = connection.execute(text("SELECT attcompression FROM pg_attribute "
                                         "WHERE attrelid = 'sync_event'::regclass AND attname = 'user_ids'")).scalar()
        assert method == "l"
        ids = [f"{n:032x}" for n in range(1000)]
        connection.execute(text("INSERT INTO tenant (id, name, created_at, scim_enabled, auto_invite, "
                                "reconcile_failures) VALUES ('lz4-tenant', 'T', now(), false, false, 0)"))
        event = connection.execute(text("INSERT INTO sync_event (tenant_id, kind, user_ids, created_at) "
                                        "VALUES ('lz4-tenant', 'group_updated', CAST(:ids AS json), now()) RETURNING id"),
                                   {"ids": json.dumps(ids)}).scalar()
        stored = connection.execute(text("SELECT pg_column_compression(user_ids), user_ids FROM sync_event "
                                         "WHERE id = :id"), {"id": event}).one()
        assert stored[0] == "lz4" and stored[1] == ids
        connection.execute(text("DELETE FROM sync_event WHERE tenant_id = 'lz4-tenant'"))
        connection.execute(text("DELETE FROM tenant WHERE id = 'lz4-tenant'"))
