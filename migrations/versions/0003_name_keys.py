"""name keys: tenant and workload names are unique by broker.identity.names.name_key

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 09:00:00.000000

Existing rows get the key of their name, normalised where the name still passes today's rules
and else simply case-folded. Rows whose keys collide (names that differed only by case, form
or width) keep their names; all but the oldest get ``~<id>`` after the key, so the upgrade never
fails and no row is renamed behind an admin's back. Those names can be renamed to something
distinct and the suffix is dropped by the next rename.
"""
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
import sqlmodel
from alembic import op

from broker.identity.names import MAX_KEY_LENGTH, name_key, normalize_name

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_tenant = sa.table(
    "tenant", sa.column("id", sa.String), sa.column("name", sa.String),
    sa.column("name_key", sa.String), sa.column("created_at", sa.BigInteger),
)
_workload = sa.table(
    "workload", sa.column("id", sa.String), sa.column("tenant_id", sa.String),
    sa.column("name", sa.String), sa.column("name_key", sa.String),
    sa.column("created_at", sa.BigInteger),
)


def _key_of(raw: str) -> str:
    try:
        return name_key(normalize_name(raw))
    except ValueError:
        # A name today's rules refuse (it was accepted before them): still case-insensitive.
        return raw.casefold()


def _fit(key: str, suffix: str = "") -> str:
    return key[: MAX_KEY_LENGTH - len(suffix)] + suffix


def _assign_keys(rows: Iterable[Any]) -> dict[str, str]:
    """{row id: key} for rows of one scope, deterministic: oldest (created_at, id) first."""
    ordered = sorted(rows, key=lambda r: (r.created_at, r.id))
    wanted = {r.id: _fit(_key_of(r.name)) for r in ordered}
    used: set[str] = set()
    keys: dict[str, str] = {}
    for r in ordered:  # first the oldest holder of each key, so no suffix can take its key
        if wanted[r.id] not in used:
            used.add(wanted[r.id])
            keys[r.id] = wanted[r.id]
    for r in ordered:
        if r.id in keys:
            continue
        suffix, n = f"~{r.id}", 0
        while _fit(wanted[r.id], suffix) in used:  # only if a name happens to end so
            n += 1
            suffix = f"~{r.id}~{n}"
        keys[r.id] = _fit(wanted[r.id], suffix)
        used.add(keys[r.id])
    return keys


def _fill(table: Any, scope: Any) -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.select(table)).all()
    scopes: dict[Any, list[Any]] = {}
    for row in rows:
        scopes.setdefault(scope(row), []).append(row)
    for members in scopes.values():
        for row_id, key in _assign_keys(members).items():
            conn.execute(sa.update(table).where(table.c.id == row_id).values(name_key=key))


def _unique_on(table: str, columns: list[str]) -> str | None:
    """The name of the existing unique constraint on ``columns`` (None when unnamed: SQLite)."""
    for uq in sa.inspect(op.get_bind()).get_unique_constraints(table):
        if list(uq["column_names"]) == columns:
            return uq["name"]
    return None


# SQLite reports its unnamed unique constraints without a name: batch mode names them by this.
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


@contextmanager
def _workloads_set_aside() -> Iterator[None]:
    """On SQLite, keep the workloads out of the tenant table while batch mode rebuilds it.

    Batch mode copies the table, drops it and renames the copy. The broker's connections enforce
    foreign keys, and inside the migration's transaction that cannot be turned off, so dropping
    a tenant table that workloads still reference fails. The workloads (which nothing references)
    wait in a temporary table meanwhile and are checked against the rebuilt tenants on return.
    """
    if op.get_bind().dialect.name != "sqlite":
        yield
        return
    op.execute("CREATE TEMP TABLE _nk_workload AS SELECT * FROM workload")
    op.execute("DELETE FROM workload")
    yield
    op.execute("INSERT INTO workload SELECT * FROM _nk_workload")
    op.execute("DROP TABLE _nk_workload")


def upgrade() -> None:
    key_type = sqlmodel.sql.sqltypes.AutoString(length=MAX_KEY_LENGTH)
    for table in ("tenant", "workload"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("name_key", key_type, nullable=True))
    _fill(_tenant, lambda row: None)
    _fill(_workload, lambda row: row.tenant_id)
    with op.batch_alter_table("workload", schema=None) as batch_op:
        batch_op.alter_column("name_key", existing_type=key_type, nullable=False)
        batch_op.drop_constraint("uq_workload_tenant_name", type_="unique")
        batch_op.create_unique_constraint("uq_workload_tenant_name_key", ["tenant_id", "name_key"])
    tenant_uq = _unique_on("tenant", ["name"]) or "uq_tenant_name"
    with _workloads_set_aside(), \
            op.batch_alter_table("tenant", schema=None, naming_convention=_NAMING) as batch_op:
        batch_op.alter_column("name_key", existing_type=key_type, nullable=False)
        batch_op.drop_constraint(tenant_uq, type_="unique")
        batch_op.create_unique_constraint("uq_tenant_name_key", ["name_key"])


def downgrade() -> None:
    # Names stay unique within their scopes: equal names have equal keys, which were unique.
    with op.batch_alter_table("workload", schema=None) as batch_op:
        batch_op.drop_constraint("uq_workload_tenant_name_key", type_="unique")
        batch_op.create_unique_constraint("uq_workload_tenant_name", ["tenant_id", "name"])
        batch_op.drop_column("name_key")
    with _workloads_set_aside(), op.batch_alter_table("tenant", schema=None) as batch_op:
        batch_op.drop_constraint("uq_tenant_name_key", type_="unique")
        batch_op.create_unique_constraint("tenant_name_key", ["name"])
        batch_op.drop_column("name_key")
