"""members: group_member without its foreign key to scim_group

Revision ID: members
Revises: 0004
Create Date: 2026-12-02

Every group write locks the group row before it touches the group's member
rows, and delete_group deletes them itself (models/directory/groups.py), so
the key only re-checked, once per inserted row, what the write already holds:
on PostgreSQL a 1,000-member PATCH spent about a quarter of its time in that
trigger. The rows are still only ever written under their group's lock.
"""
from alembic import op

revision = 'members'
down_revision = '0004'
branch_labels = None
depends_on = None

# SQLite's key has no name: batch mode names it by this convention to drop it.
NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}


def _key_name() -> str:
    if op.get_bind().dialect.name == "postgresql":
        return "group_member_group_id_fkey"
    return "fk_group_member_group_id_scim_group"


def upgrade() -> None:
    with op.batch_alter_table('group_member', schema=None, naming_convention=NAMING) as batch_op:
        batch_op.drop_constraint(_key_name(), type_='foreignkey')


def downgrade() -> None:
    with op.batch_alter_table('group_member', schema=None, naming_convention=NAMING) as batch_op:
        batch_op.create_foreign_key(_key_name(), 'scim_group', ['group_id'], ['id'], ondelete='CASCADE')
