"""usage rollups: hourly and daily sums of the usage events, and the mark of an event counted
in them (so raw events can be deleted after usage.raw_retention_days)

The events already recorded are rolled up here: marked first, then exactly the marked ones
summed, so an event written meanwhile (left unmarked) is left for the rollup job.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-09 09:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('usage_rollup',
    sa.Column('period', sqlmodel.sql.sqltypes.AutoString(length=4), nullable=False),
    sa.Column('bucket', sa.BigInteger(), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('workload_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('requests', sa.BigInteger(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cost_micros', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('period', 'bucket', 'tenant_id', 'workload_id', 'model'),
    sqlite_with_rowid=False
    )

    with op.batch_alter_table('usage_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rolled_up', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.create_index('ix_usage_event_rolled_up_ts', ['rolled_up', 'ts'], unique=False)

    event = sa.table('usage_event', sa.column('rolled_up', sa.Boolean()))
    op.execute(event.update().where(event.c.rolled_up == sa.false()).values(rolled_up=True))
    for period, seconds in (('hour', 3600), ('day', 86400)):
        # Built from the constants above, never from input.
        op.execute(sa.text(
            "INSERT INTO usage_rollup (period, bucket, tenant_id, workload_id, model, requests, "  # noqa: S608
            "prompt_tokens, completion_tokens, cost_micros) "
            f"SELECT '{period}', ts - ts % {seconds}, tenant_id, workload_id, model, count(*), "
            "coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), "
            "coalesce(sum(cost_micros), 0) FROM usage_event WHERE rolled_up = :yes "
            f"GROUP BY ts - ts % {seconds}, tenant_id, workload_id, model"
        ).bindparams(sa.bindparam('yes', True, type_=sa.Boolean())))


def downgrade() -> None:
    with op.batch_alter_table('usage_event', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_event_rolled_up_ts')
        batch_op.drop_column('rolled_up')
    op.drop_table('usage_rollup')
