"""shared limits: the rate limits, leases and failed-secret counters of every replica

Counted in the database when limits.backend = "database" (see broker/money/limits_db.py).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 09:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('limit_state',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('requests', sa.BigInteger(), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('micros', sa.BigInteger(), nullable=False),
    sa.Column('held_tokens', sa.BigInteger(), nullable=False),
    sa.Column('held_micros', sa.BigInteger(), nullable=False),
    sa.Column('running', sa.BigInteger(), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('keep_until_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('limit_state', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_limit_state_keep_until_ms'), ['keep_until_ms'], unique=False)

    op.create_table('limit_bucket',
    sa.Column('state_id', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('dim', sqlmodel.sql.sqltypes.AutoString(length=1), nullable=False),
    sa.Column('last_ms', sa.BigInteger(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('state_id', 'dim', 'last_ms')
    )

    op.create_table('limit_lease',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('state_id', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('group_id', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('micros', sa.BigInteger(), nullable=False),
    sa.Column('expires_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('limit_lease', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_limit_lease_expires_ms'), ['expires_ms'], unique=False)
        batch_op.create_index('ix_limit_lease_group', ['group_id', 'expires_ms'], unique=False)
        batch_op.create_index('ix_limit_lease_state', ['state_id', 'expires_ms'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('limit_lease', schema=None) as batch_op:
        batch_op.drop_index('ix_limit_lease_state')
        batch_op.drop_index('ix_limit_lease_group')
        batch_op.drop_index(batch_op.f('ix_limit_lease_expires_ms'))
    op.drop_table('limit_lease')
    op.drop_table('limit_bucket')
    with op.batch_alter_table('limit_state', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_limit_state_keep_until_ms'))
    op.drop_table('limit_state')
