"""live slices per workload

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 23:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('live_slices',
    sa.Column('workload_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('workload_id')
    )
    # The slices alive when the migration runs count against the new cap from the start.
    op.execute(
        "INSERT INTO live_slices (workload_id, count) "
        "SELECT workload_id, count(*) FROM token_slice WHERE released_at IS NULL "
        "GROUP BY workload_id"
    )


def downgrade() -> None:
    op.drop_table('live_slices')
