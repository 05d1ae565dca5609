"""workload bindings to external identities; delegated slices looked up by parent

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 05:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('workload_binding',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('workload_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('issuer', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('claims', sa.JSON(), nullable=False),
    sa.Column('match_sub', sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True),
    sa.Column('position', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['workload_id'], ['workload.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('workload_binding', schema=None) as batch_op:
        batch_op.create_index('ix_workload_binding_lookup', ['issuer', 'match_sub'], unique=False)
        batch_op.create_index(batch_op.f('ix_workload_binding_workload_id'), ['workload_id'],
                              unique=False)
    with op.batch_alter_table('token_slice', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_token_slice_parent_jti'), ['parent_jti'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('token_slice', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_token_slice_parent_jti'))
    with op.batch_alter_table('workload_binding', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_workload_binding_workload_id'))
        batch_op.drop_index('ix_workload_binding_lookup')
    op.drop_table('workload_binding')
