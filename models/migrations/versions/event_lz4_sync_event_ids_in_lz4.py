"""event_lz4: a sync event's user ids compressed with lz4 on PostgreSQL

Revision ID: event_lz4
Revises: ids_c
Create Date: 2026-12-02

A member PATCH of 1,000 Users writes one sync event naming them: ~34 KB of
JSON, which PostgreSQL compresses when it moves it out of line (TOAST). Its
default, pglz, costs about a twelfth of the whole PATCH's backend CPU; lz4
compresses as well for hex ids at a fraction of the cost, and the worker
reads it back faster too. Only on a server built with lz4 (PostgreSQL 14 and
later, as packaged by Debian and the official images); elsewhere nothing
changes. Rows already written keep their compression.
"""
from alembic import op
from sqlalchemy import text

revision = 'event_lz4'
down_revision = 'ids_c'
branch_labels = None
depends_on = None

HAS_LZ4 = """
SELECT EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals))
"""


def _compress(method: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != 'postgresql' or not bind.execute(text(HAS_LZ4)).scalar():
        return
    op.execute(f'ALTER TABLE sync_event ALTER COLUMN user_ids SET COMPRESSION {method}')


def upgrade() -> None:
    _compress('lz4')


def downgrade() -> None:
    _compress('pglz')
