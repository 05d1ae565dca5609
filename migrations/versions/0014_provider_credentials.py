"""provider credentials: the journal of provider keys the broker creates, and each provider's
last known credential status

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 15:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def _s(length: int) -> sqlmodel.sql.sqltypes.AutoString:
    return sqlmodel.sql.sqltypes.AutoString(length=length)


def upgrade() -> None:
    op.create_table('provider_key',
    sa.Column('id', _s(40), nullable=False),
    sa.Column('provider', _s(64), nullable=False),
    sa.Column('name', _s(128), nullable=False),
    sa.Column('state', _s(16), nullable=False),
    sa.Column('key_id', _s(128), nullable=True),
    sa.Column('account_id', _s(128), nullable=True),
    sa.Column('version', sa.BigInteger(), nullable=True),
    sa.Column('actor', _s(64), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.BigInteger(), nullable=False),
    sa.Column('retire_at', sa.BigInteger(), nullable=True),
    sa.Column('attempts', sa.BigInteger(), nullable=False),
    sa.Column('error', _s(256), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('provider_key', schema=None) as batch_op:
        batch_op.create_index('ix_provider_key_provider_state', ['provider', 'state'], unique=False)
    op.create_table('provider_status',
    sa.Column('provider', _s(64), nullable=False),
    sa.Column('rotated_at', sa.BigInteger(), nullable=True),
    sa.Column('rotation_result', _s(16), nullable=True),
    sa.Column('rotation_error', _s(256), nullable=True),
    sa.Column('rotation_actor', _s(64), nullable=True),
    sa.Column('key_status', _s(16), nullable=True),
    sa.Column('key_expires_at', sa.BigInteger(), nullable=True),
    sa.Column('key_checked_at', sa.BigInteger(), nullable=True),
    sa.Column('watch_error', _s(256), nullable=True),
    sa.Column('spend_limit_micros', sa.BigInteger(), nullable=True),
    sa.Column('spend_limit_checked_at', sa.BigInteger(), nullable=True),
    sa.Column('spend_limit_error', _s(256), nullable=True),
    sa.Column('alerted', _s(160), nullable=True),
    sa.Column('updated_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('provider')
    )


def downgrade() -> None:
    op.drop_table('provider_status')
    with op.batch_alter_table('provider_key', schema=None) as batch_op:
        batch_op.drop_index('ix_provider_key_provider_state')
    op.drop_table('provider_key')
