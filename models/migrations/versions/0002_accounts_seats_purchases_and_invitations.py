"""accounts, seats, purchases and invitations

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('purchase',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('trigger', sa.String(length=255), nullable=False),
    sa.Column('demand', sa.JSON(), nullable=False),
    sa.Column('quantities_before', sa.JSON(), nullable=True),
    sa.Column('quantities_after', sa.JSON(), nullable=True),
    sa.Column('subscription_id', sa.String(length=255), nullable=True),
    sa.Column('request_body', sa.JSON(), nullable=True),
    sa.Column('idempotency_key', sa.String(length=255), nullable=True),
    sa.Column('stripe_invoice_id', sa.String(length=255), nullable=True),
    sa.Column('error', sa.String(length=2048), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('settled_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('purchase', schema=None) as batch_op:
        batch_op.create_index('ix_purchase_tenant_created', ['tenant_id', 'created_at'], unique=False)
        batch_op.create_index('uq_purchase_one_pending', ['tenant_id'], unique=True, sqlite_where=sa.text("status = 'pending'"), postgresql_where=sa.text("status = 'pending'"))

    op.create_table('seat_count',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('tier', sa.String(length=16), nullable=False),
    sa.Column('purchased', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], ),
    sa.PrimaryKeyConstraint('tenant_id', 'tier')
    )
    op.create_table('account',
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=8), nullable=True),
    sa.Column('wanted_tier', sa.String(length=16), nullable=True),
    sa.Column('license', sa.String(length=16), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('status_reason', sa.String(length=1024), nullable=True),
    sa.Column('waiting_since', sa.DateTime(timezone=True), nullable=True),
    sa.Column('first_access_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('invited_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('invite_error', sa.String(length=1024), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['scim_user.id'], ),
    sa.PrimaryKeyConstraint('user_id')
    )
    with op.batch_alter_table('account', schema=None) as batch_op:
        batch_op.create_index('ix_account_tenant_license', ['tenant_id', 'license'], unique=False)
        batch_op.create_index('ix_account_tenant_waiting', ['tenant_id', 'wanted_tier', 'waiting_since'], unique=False)

    op.create_table('invitation',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('address', sa.String(length=512), nullable=True),
    sa.Column('message_id', sa.String(length=255), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.String(length=2048), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['scim_user.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('invitation', schema=None) as batch_op:
        batch_op.create_index('ix_invitation_status', ['status', 'enqueued_at'], unique=False)
        batch_op.create_index('uq_invitation_user', ['tenant_id', 'user_id'], unique=True)

    with op.batch_alter_table('tenant', schema=None) as batch_op:
        batch_op.add_column(sa.Column('billing_blocked', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('seats_synced_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('last_reconciled_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('tenant', schema=None) as batch_op:
        batch_op.drop_column('last_reconciled_at')
        batch_op.drop_column('seats_synced_at')
        batch_op.drop_column('billing_blocked')

    with op.batch_alter_table('invitation', schema=None) as batch_op:
        batch_op.drop_index('uq_invitation_user')
        batch_op.drop_index('ix_invitation_status')

    op.drop_table('invitation')
    with op.batch_alter_table('account', schema=None) as batch_op:
        batch_op.drop_index('ix_account_tenant_waiting')
        batch_op.drop_index('ix_account_tenant_license')

    op.drop_table('account')
    op.drop_table('seat_count')
    with op.batch_alter_table('purchase', schema=None) as batch_op:
        batch_op.drop_index('uq_purchase_one_pending', sqlite_where=sa.text("status = 'pending'"), postgresql_where=sa.text("status = 'pending'"))
        batch_op.drop_index('ix_purchase_tenant_created')

    op.drop_table('purchase')
