"""directory, tenants and sync events

Revision ID: 0001
Revises: 
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('tenant',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('stripe_customer_id', sa.String(length=255), nullable=True),
    sa.Column('stripe_subscription_id', sa.String(length=255), nullable=True),
    sa.Column('provider', sa.String(length=32), nullable=True),
    sa.Column('scim_enabled', sa.Boolean(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=True),
    sa.Column('token_created_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_request_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('auto_invite', sa.Boolean(), nullable=False),
    sa.Column('seat_cap', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    op.create_table('group_mapping',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('group_id', sa.String(length=64), nullable=False),
    sa.Column('slot', sa.String(length=16), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], ),
    sa.PrimaryKeyConstraint('tenant_id', 'group_id', 'slot')
    )
    op.create_table('scim_group',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('display_name', sa.String(length=512), nullable=False),
    sa.Column('display_name_key', sa.String(length=512), nullable=False),
    sa.Column('external_id', sa.String(length=512), nullable=True),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('scim_group', schema=None) as batch_op:
        batch_op.create_index('ix_scim_group_display_name', ['tenant_id', 'display_name_key'], unique=False)
        batch_op.create_index('ix_scim_group_external_id', ['tenant_id', 'external_id'], unique=False)
        batch_op.create_index('ix_scim_group_tenant_created', ['tenant_id', 'created_at'], unique=False)

    op.create_table('scim_user',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('user_name', sa.String(length=512), nullable=False),
    sa.Column('user_name_key', sa.String(length=512), nullable=False),
    sa.Column('external_id', sa.String(length=512), nullable=True),
    sa.Column('display_name', sa.String(length=512), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('scim_user', schema=None) as batch_op:
        batch_op.create_index('ix_scim_user_external_id', ['tenant_id', 'external_id'], unique=False)
        batch_op.create_index('ix_scim_user_tenant_created', ['tenant_id', 'created_at'], unique=False)
        batch_op.create_index('uq_scim_user_name', ['tenant_id', 'user_name_key'], unique=True, sqlite_where=sa.text('deleted_at IS NULL'), postgresql_where=sa.text('deleted_at IS NULL'))

    op.create_table('sync_event',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('user_ids', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('applied_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('sync_event', schema=None) as batch_op:
        batch_op.create_index('ix_sync_event_tenant_applied', ['tenant_id', 'applied_at'], unique=False)

    op.create_table('group_member',
    sa.Column('group_id', sa.String(length=64), nullable=False),
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('member_type', sa.String(length=8), nullable=False),
    sa.ForeignKeyConstraint(['group_id'], ['scim_group.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('group_id', 'member_id')
    )
    with op.batch_alter_table('group_member', schema=None) as batch_op:
        batch_op.create_index('ix_group_member_member', ['member_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('group_member', schema=None) as batch_op:
        batch_op.drop_index('ix_group_member_member')

    op.drop_table('group_member')
    with op.batch_alter_table('sync_event', schema=None) as batch_op:
        batch_op.drop_index('ix_sync_event_tenant_applied')

    op.drop_table('sync_event')
    with op.batch_alter_table('scim_user', schema=None) as batch_op:
        batch_op.drop_index('uq_scim_user_name', sqlite_where=sa.text('deleted_at IS NULL'), postgresql_where=sa.text('deleted_at IS NULL'))
        batch_op.drop_index('ix_scim_user_tenant_created')
        batch_op.drop_index('ix_scim_user_external_id')

    op.drop_table('scim_user')
    with op.batch_alter_table('scim_group', schema=None) as batch_op:
        batch_op.drop_index('ix_scim_group_tenant_created')
        batch_op.drop_index('ix_scim_group_external_id')
        batch_op.drop_index('ix_scim_group_display_name')

    op.drop_table('scim_group')
    op.drop_table('group_mapping')
    op.drop_table('tenant')
