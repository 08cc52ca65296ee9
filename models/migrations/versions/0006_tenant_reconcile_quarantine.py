"""tenant reconcile quarantine: consecutive failures, backoff, last error

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot add several columns with defaults in one ALTER otherwise.
    with op.batch_alter_table('tenant') as batch:
        batch.add_column(sa.Column('reconcile_failures', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('quarantined_until', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('last_error', sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('tenant') as batch:
        batch.drop_column('last_error')
        batch.drop_column('quarantined_until')
        batch.drop_column('reconcile_failures')
