"""invitation dedup and daily cap, mass-deprovision breaker, group mapping tombstones

Revision ID: 0005
Revises: 0006
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tenant', schema=None) as batch_op:
        batch_op.add_column(sa.Column('invite_daily_cap', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('hold_min_users', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('hold_percent', sa.Integer(), nullable=True))

    with op.batch_alter_table('group_mapping', schema=None) as batch_op:
        batch_op.add_column(sa.Column('external_id', sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column('display_name', sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table('account', schema=None) as batch_op:
        batch_op.add_column(sa.Column('access_removed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('held_since', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('hold_decision', sa.String(length=16), nullable=True))

    with op.batch_alter_table('invitation', schema=None) as batch_op:
        batch_op.add_column(sa.Column('address_key', sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column('send_day', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('wait_reason', sa.String(length=255), nullable=True))
        batch_op.create_index('ix_invitation_address', ['tenant_id', 'address_key'], unique=False)
        batch_op.create_index('ix_invitation_send_day', ['tenant_id', 'send_day'], unique=False)

    # Existing invitations count for the address dedup (case-folded in Python:
    # SQLite's lower() is ASCII-only).
    connection = op.get_bind()
    invitation = sa.table('invitation', sa.column('id', sa.String), sa.column('address', sa.String),
                          sa.column('address_key', sa.String))
    rows = connection.execute(
        sa.select(invitation.c.id, invitation.c.address).where(invitation.c.address.is_not(None))
    ).all()
    for start in range(0, len(rows), 500):
        for invitation_id, address in rows[start:start + 500]:
            connection.execute(
                invitation.update().where(invitation.c.id == invitation_id)
                .values(address_key=address.strip().casefold())
            )

    op.create_table('alert',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('message', sa.String(length=1024), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('resolution', sa.String(length=16), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('alert', schema=None) as batch_op:
        batch_op.create_index('ix_alert_tenant_open', ['tenant_id', 'resolved_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('alert', schema=None) as batch_op:
        batch_op.drop_index('ix_alert_tenant_open')
    op.drop_table('alert')
    with op.batch_alter_table('invitation', schema=None) as batch_op:
        batch_op.drop_index('ix_invitation_send_day')
        batch_op.drop_index('ix_invitation_address')
        batch_op.drop_column('wait_reason')
        batch_op.drop_column('send_day')
        batch_op.drop_column('address_key')
    with op.batch_alter_table('account', schema=None) as batch_op:
        batch_op.drop_column('hold_decision')
        batch_op.drop_column('held_since')
        batch_op.drop_column('access_removed_at')
    with op.batch_alter_table('group_mapping', schema=None) as batch_op:
        batch_op.drop_column('deleted_at')
        batch_op.drop_column('display_name')
        batch_op.drop_column('external_id')
    with op.batch_alter_table('tenant', schema=None) as batch_op:
        batch_op.drop_column('hold_percent')
        batch_op.drop_column('hold_min_users')
        batch_op.drop_column('invite_daily_cap')
