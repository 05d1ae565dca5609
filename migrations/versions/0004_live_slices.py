"""live slices per workload

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 23:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workload', schema=None) as batch_op:
        batch_op.add_column(sa.Column('live_slices', sa.BigInteger(), server_default='0',
                                      nullable=False))
    # The slices alive when the migration runs count against the new cap from the start.
    op.execute(
        "UPDATE workload SET live_slices = (SELECT count(*) FROM token_slice "
        "WHERE token_slice.workload_id = workload.id AND token_slice.released_at IS NULL)"
    )


def downgrade() -> None:
    with op.batch_alter_table('workload', schema=None) as batch_op:
        batch_op.drop_column('live_slices')
