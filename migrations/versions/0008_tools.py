"""server-side tools: calls per usage event, and grants of a tool

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 06:30:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('usage_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tool_calls', sqlmodel.sql.sqltypes.AutoString(length=1024),
                                      nullable=True))
    with op.batch_alter_table('approval', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tool', sqlmodel.sql.sqltypes.AutoString(length=64),
                                      nullable=True))
    with op.batch_alter_table('access_grant', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tool', sqlmodel.sql.sqltypes.AutoString(length=64),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('access_grant', schema=None) as batch_op:
        batch_op.drop_column('tool')
    with op.batch_alter_table('approval', schema=None) as batch_op:
        batch_op.drop_column('tool')
    with op.batch_alter_table('usage_event', schema=None) as batch_op:
        batch_op.drop_column('tool_calls')
