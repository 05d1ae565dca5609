"""the stored context of metered responses (OpenAI Responses previous_response_id)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 05:40:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('response_context',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('provider', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('context_tokens', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('response_context', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_response_context_created_at'), ['created_at'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('response_context', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_response_context_created_at'))
    op.drop_table('response_context')
