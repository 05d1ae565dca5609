"""The Alembic migrations produce exactly the models' schema, on SQLite and on PostgreSQL, and
``migrate`` can run any number of times.

A model changed without a migration fails ``test_migrations_match_the_models``: the comparison
is Alembic's own autogenerate (what ``alembic check`` runs), against a database migrated from
nothing.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, MetaData
from sqlmodel import SQLModel

import broker.storage.models  # noqa: F401  (the same import migrations/env.py makes)
from broker.storage.db import make_engine, migrate, migration_state


def schema_diff(engine: Engine, metadata: MetaData) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "render_as_batch": True})
        diff: list[Any] = compare_metadata(context, metadata)
    return diff


def test_migrations_match_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert schema_diff(engine, SQLModel.metadata) == []
    finally:
        engine.dispose()


def test_the_comparison_sees_a_model_change(db_url: str) -> None:
    """The check above has teeth: a column the migrations never made is reported."""
    changed = MetaData()
    for table in SQLModel.metadata.tables.values():
        table.to_metadata(changed)
    sa.Table("tenant", changed, sa.Column("colour", sa.String(16)), extend_existing=True)
    engine = make_engine(db_url)
    try:
        diff = schema_diff(engine, changed)
    finally:
        engine.dispose()
    assert [(d[0], d[2], d[3].name) for d in diff if d[0] == "add_column"] == [
        ("add_column", "tenant", "colour")]


def test_migrate_is_idempotent(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        before = migration_state(engine)
        assert before[0] == before[1], "the fixture's database is at head"
        for _ in range(2):
            migrate(engine)
        assert migration_state(engine) == before
        assert schema_diff(engine, SQLModel.metadata) == []
    finally:
        engine.dispose()


def test_migrating_from_nothing_reaches_head(tmp_path: Any) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/empty.db")
    try:
        current, head = migration_state(engine)
        assert current is None
        migrate(engine)
        assert migration_state(engine) == (head, head)
        assert set(sa.inspect(engine).get_table_names()) >= set(SQLModel.metadata.tables)
    finally:
        engine.dispose()
