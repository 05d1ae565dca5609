"""audit chain: audit entries are hash-chained (seq, tenant_id, prev_hash, hash), the head row
that serialises appends, and the signed checkpoints

Entries written before this migration are chained in the order they were written (their id).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08 09:00:00
"""
import json

from alembic import op
import sqlalchemy as sa
import sqlmodel

from broker.storage.audit import GENESIS, entry_hash, plain, rfc3339


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('seq', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('prev_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))

    conn = op.get_bind()
    prev, seq = GENESIS, 0
    rows = conn.execute(sa.text(
        "SELECT id, ts, actor, action, target, detail FROM audit_event ORDER BY id")).all()
    for row in rows:
        seq += 1
        detail = row.detail if isinstance(row.detail, dict) else json.loads(row.detail)
        detail = plain(detail)
        tenant = detail.get("tenant_id") if isinstance(detail.get("tenant_id"), str) else None
        entry = {"seq": seq, "ts": rfc3339(int(row.ts)), "actor": row.actor, "action": row.action,
                 "target": row.target, "tenant_id": tenant, "detail": detail, "prev_hash": prev}
        digest = entry_hash(entry)
        conn.execute(sa.text(
            "UPDATE audit_event SET seq = :seq, tenant_id = :t, detail = :d, prev_hash = :p, "
            "hash = :h WHERE id = :id"),
            {"seq": seq, "t": tenant, "d": json.dumps(detail), "p": prev, "h": digest, "id": row.id})
        prev = digest

    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.alter_column('seq', existing_type=sa.BigInteger(), nullable=False)
        batch_op.alter_column('prev_hash', existing_type=sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False)
        batch_op.alter_column('hash', existing_type=sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False)
        batch_op.create_index(batch_op.f('ix_audit_event_seq'), ['seq'], unique=True)
        batch_op.create_index(batch_op.f('ix_audit_event_action'), ['action'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_event_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('audit_head',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    conn.execute(sa.text("INSERT INTO audit_head (id, seq, hash) VALUES (1, :s, :h)"),
                 {"s": seq, "h": prev})

    op.create_table('audit_checkpoint',
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('ts', sa.BigInteger(), nullable=False),
    sa.Column('kid', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('sig', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('file_written', sa.Boolean(), nullable=False),
    sa.Column('webhook_sent', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('seq')
    )


def downgrade() -> None:
    op.drop_table('audit_checkpoint')
    op.drop_table('audit_head')
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_event_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_audit_event_action'))
        batch_op.drop_index(batch_op.f('ix_audit_event_seq'))
        batch_op.drop_column('hash')
        batch_op.drop_column('prev_hash')
        batch_op.drop_column('tenant_id')
        batch_op.drop_column('seq')
