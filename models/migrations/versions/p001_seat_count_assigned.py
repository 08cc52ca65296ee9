"""seat_count.assigned: seats of each tier held, kept by the pipeline

Allocation read the seats held per tier by counting the tenant's accounts
(a scan of every account): with the count kept beside `purchased`, reconciling
one change costs the same in a 100,000-user tenant as in a 1,000-user one.

Revision ID: p001
Revises: 0002
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = 'p001'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('seat_count', schema=None) as batch_op:
        batch_op.add_column(sa.Column('assigned', sa.Integer(), nullable=False, server_default='0'))
    # Tiers with holders but no seat_count row yet get one (purchased 0).
    op.execute(
        "INSERT INTO seat_count (tenant_id, tier, purchased, assigned, updated_at) "
        "SELECT DISTINCT a.tenant_id, a.license, 0, 0, CURRENT_TIMESTAMP FROM account a "
        "WHERE a.license IS NOT NULL AND NOT EXISTS ("
        "SELECT 1 FROM seat_count s WHERE s.tenant_id = a.tenant_id AND s.tier = a.license)"
    )
    op.execute(
        "UPDATE seat_count SET assigned = (SELECT count(*) FROM account a "
        "WHERE a.tenant_id = seat_count.tenant_id AND a.license = seat_count.tier)"
    )


def downgrade() -> None:
    with op.batch_alter_table('seat_count', schema=None) as batch_op:
        batch_op.drop_column('assigned')
