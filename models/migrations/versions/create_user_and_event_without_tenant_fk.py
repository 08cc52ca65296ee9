"""create: on PostgreSQL, scim_user and sync_event without their foreign keys to tenant

Revision ID: create
Revises: event_lz4
Create Date: 2026-12-02

Every row of either table is written for a tenant the same statement or
transaction has just read (the SCIM create checks the token in the statement
that inserts; every other writer works on a tenant it loaded), and tenants are
never deleted, so the keys only re-checked what the write already knew. On
PostgreSQL each key's check is a `SELECT … FOR KEY SHARE` of the tenant row per
inserted row: concurrent creates of one tenant all lock that one row (a
MultiXact once two hold it), 13–21 % of the create statement's backend CPU with
8 connections inserting 2 users per statement.

SQLite keeps the keys: dropping one rebuilds the table (batch mode), and
rebuilding scim_user under `PRAGMA foreign_keys=ON` fails once an account
refers to a user; SQLite has no hot path to speed up.
"""
from alembic import op

revision = 'create'
down_revision = 'event_lz4'
branch_labels = None
depends_on = None

KEYS = (("scim_user", "scim_user_tenant_id_fkey"), ("sync_event", "sync_event_tenant_id_fkey"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, key in KEYS:
        op.drop_constraint(key, table, type_="foreignkey")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, key in KEYS:
        op.create_foreign_key(key, table, "tenant", ["tenant_id"], ["id"])
