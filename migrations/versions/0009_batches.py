"""batch jobs: the input files the broker checked and uploaded, and the jobs it holds money for

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 09:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('batch_file',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('workload_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('provider', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('filename', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('lines', sa.BigInteger(), nullable=False),
    sa.Column('models', sa.JSON(), nullable=False),
    sa.Column('worst', sa.JSON(), nullable=False),
    sa.Column('line_worst', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('batch_file', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_batch_file_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('batch_job',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('workload_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('jti', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('hold_ids', sa.JSON(), nullable=False),
    sa.Column('provider', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('input_file_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('settled_at', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('jti')
    )
    with op.batch_alter_table('batch_job', schema=None) as batch_op:
        batch_op.create_index('ix_batch_job_open', ['settled_at', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_batch_job_tenant_id'), ['tenant_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('batch_job', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_batch_job_tenant_id'))
        batch_op.drop_index('ix_batch_job_open')
    op.drop_table('batch_job')
    with op.batch_alter_table('batch_file', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_batch_file_tenant_id'))
    op.drop_table('batch_file')
