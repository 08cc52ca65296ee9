"""admin audit log, per-user pipeline history, seat prices

Revision ID: 0003
Revises: p001 (re-chained after main's p001, which also alters seat_count)
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = 'p001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index('ix_audit_log_tenant', ['tenant_id', 'id'], unique=False)

    op.create_table('account_history',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('role', sa.String(length=8), nullable=True),
    sa.Column('license', sa.String(length=16), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('status_reason', sa.String(length=1024), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('account_history', schema=None) as batch_op:
        batch_op.create_index('ix_account_history_user', ['user_id', 'id'], unique=False)

    with op.batch_alter_table('seat_count', schema=None) as batch_op:
        batch_op.add_column(sa.Column('unit_amount', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('currency', sa.String(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('seat_count', schema=None) as batch_op:
        batch_op.drop_column('currency')
        batch_op.drop_column('unit_amount')
    with op.batch_alter_table('account_history', schema=None) as batch_op:
        batch_op.drop_index('ix_account_history_user')
    op.drop_table('account_history')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_log_tenant')
    op.drop_table('audit_log')
