"""money: spend guard, Stripe webhook events, invoice amounts on the ledger, leases

Revision ID: 0004
Revises: p001 (main's head; written against 0002)
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0005'
branch_labels = None
depends_on = None

OPEN = "status IN ('pending', 'awaiting_approval')"


def upgrade() -> None:
    op.create_table('stripe_event',
    sa.Column('id', sa.String(length=255), nullable=False),
    sa.Column('type', sa.String(length=128), nullable=False),
    sa.Column('object_id', sa.String(length=255), nullable=True),
    sa.Column('tenant_id', sa.String(length=64), nullable=True),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('outcome', sa.String(length=255), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('tenant', schema=None) as batch_op:
        batch_op.add_column(sa.Column('guard_enabled', sa.Boolean(), server_default=sa.text('true'), nullable=False))
        batch_op.add_column(sa.Column('guard_min_seats', sa.Integer(), server_default=sa.text('10'), nullable=False))
        batch_op.add_column(sa.Column('guard_percent', sa.Integer(), server_default=sa.text('25'), nullable=False))
        batch_op.add_column(sa.Column('guard_first_purchase', sa.Integer(), server_default=sa.text('10000'), nullable=False))
        batch_op.add_column(sa.Column('billing_linked_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('billing_status', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('billing_detail', sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column('seats_lowered', sa.JSON(), nullable=True))
        batch_op.create_index('uq_tenant_stripe_subscription', ['stripe_subscription_id'], unique=True)
    # Tenants linked before this revision: their link was never checked by a worker.
    op.execute("UPDATE tenant SET billing_status = 'unverified', billing_linked_at = created_at "
               "WHERE stripe_subscription_id IS NOT NULL")
    with op.batch_alter_table('purchase', schema=None) as batch_op:
        batch_op.drop_index('uq_purchase_one_pending')
        batch_op.alter_column('status', existing_type=sa.String(length=16), type_=sa.String(length=32),
                              existing_nullable=False)
        batch_op.add_column(sa.Column('hold_reason', sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column('approved_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('key_created_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('invoice_status', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('payment_status', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('amount_due', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('amount_paid', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('currency', sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column('paid_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('invoice_event_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('uq_purchase_one_open', ['tenant_id'], unique=True,
                              sqlite_where=sa.text(OPEN), postgresql_where=sa.text(OPEN))
    # Frozen before this revision: count the key's age from the purchase's creation.
    op.execute("UPDATE purchase SET key_created_at = created_at WHERE idempotency_key IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table('purchase', schema=None) as batch_op:
        batch_op.drop_index('uq_purchase_one_open')
        for column in ('invoice_event_at', 'paid_at', 'currency', 'amount_paid', 'amount_due', 'payment_status',
                       'invoice_status', 'lease_until', 'key_created_at', 'approved_at', 'hold_reason'):
            batch_op.drop_column(column)
        batch_op.alter_column('status', existing_type=sa.String(length=32), type_=sa.String(length=16),
                              existing_nullable=False)
        batch_op.create_index('uq_purchase_one_pending', ['tenant_id'], unique=True,
                              sqlite_where=sa.text("status = 'pending'"),
                              postgresql_where=sa.text("status = 'pending'"))
    with op.batch_alter_table('tenant', schema=None) as batch_op:
        batch_op.drop_index('uq_tenant_stripe_subscription')
        for column in ('seats_lowered', 'billing_detail', 'billing_status', 'billing_linked_at',
                       'guard_first_purchase', 'guard_percent', 'guard_min_seats', 'guard_enabled'):
            batch_op.drop_column(column)
    op.drop_table('stripe_event')
