"""The database engine, transactions run off the event loop, and migrations.

Only this module creates engines. Every write transaction on SQLite starts with
``BEGIN IMMEDIATE`` so concurrent writers queue on the lock instead of failing on upgrade; on
PostgreSQL the conditional ``UPDATE ... WHERE`` statements of :mod:`broker.money.ledger` take row locks.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from broker.errors import LedgerUnavailable

T = TypeVar("T")

READ_ONLY = "broker_read_only"

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def make_engine(url: str, pool_size: int = 16) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            pool_size=pool_size,
            max_overflow=0,
            pool_timeout=30,
            connect_args={"check_same_thread": False, "timeout": 30},
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control from pysqlite so that BEGIN IMMEDIATE is ours to emit.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # Reads take no write lock (WAL lets them run beside the writer).
            read_only = conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return create_engine(url, pool_size=pool_size, max_overflow=8, pool_pre_ping=True)


# Work a transaction defers to its end, just before COMMIT (``conn.info[BEFORE_COMMIT]``, a
# list of callables taking the connection): the audit chain's append, whose lock on the chain's
# head is then held for the commit alone, and always taken last, so it cannot deadlock with the
# row locks the transaction took before.
BEFORE_COMMIT = "broker.before_commit"


class Sql:
    """A fixed statement with ``:name`` parameters, run through the driver directly.

    The hot paths (issuance, holds, settlements) pay for binding values, not for building,
    hashing and compiling a SQLAlchemy expression tree on every call. Written once in SQLite's
    named style and translated for psycopg's ``%(name)s``.
    """

    def __init__(self, statement: str):
        self.sqlite = " ".join(statement.split())
        self.postgresql = _NAMED.sub(r"%(\1)s", self.sqlite)

    def run(self, conn: Connection, **params: Any) -> Any:
        """The driver-level result (a ``CursorResult``): rows come back as plain tuples."""
        sql = self.postgresql if conn.dialect.name == "postgresql" else self.sqlite
        return conn.exec_driver_sql(sql, params)


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_][A-Za-z0-9_]*)")


# --- the clock of record ---------------------------------------------------------------------
# A revocation cut-off ("every token of this identity issued at or before it is dead") is
# compared with tokens' ``iat``. With several replicas each would date them by its own clock,
# and a few seconds of skew let a token minted just before a cut outlive it, or one minted just
# after a resume die. The database is the one clock every replica shares, so both come from it.
# On SQLite every replica is this process, whose clock is that clock.

_CLOCK = "SELECT extract(epoch FROM clock_timestamp())"


def db_clock(conn: Connection) -> float:
    """The database's clock, in seconds since the epoch."""
    if conn.dialect.name != "postgresql":
        return time.time()
    return float(conn.exec_driver_sql(_CLOCK).scalar_one())


def db_now(conn: Connection, local: int | None = None) -> int:
    """The database's clock in whole seconds, the unit of ``iat`` and of cut-offs. On SQLite,
    ``local`` when given: the caller's reading of the same clock, so that the times of one
    action (and a test's chosen ``now``) stay one."""
    if conn.dialect.name != "postgresql":
        return int(time.time()) if local is None else local
    return math.floor(db_clock(conn))


class Database:
    """Runs one transaction per call in a worker thread, so the event loop never blocks.

    On SQLite, write transactions queue on one first-come-first-served lock in the event loop:
    SQLite admits one writer at a time, and threads left to contend inside its busy handler
    sleep with a back-off instead of being woken, which turned seconds-long tails out of
    millisecond transactions.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._write_lock = anyio.Lock() if self.is_sqlite else None

    def transaction(self, fn: Callable[[Connection], T]) -> T:
        return self._in_transaction(fn, read_only=False)

    def read_transaction(self, fn: Callable[[Connection], T]) -> T:
        """A transaction that only reads: no write lock on SQLite."""
        return self._in_transaction(fn, read_only=True)

    def _in_transaction(self, fn: Callable[[Connection], T], *, read_only: bool) -> T:
        try:
            with self.engine.connect() as raw:
                conn = raw.execution_options(**{READ_ONLY: True}) if read_only else raw
                with conn.begin():
                    # ``info`` belongs to the pooled DBAPI connection: what a transaction that
                    # failed left there must not run in this one.
                    conn.info[BEFORE_COMMIT] = []
                    result = fn(conn)
                    for hook in conn.info.pop(BEFORE_COMMIT):
                        hook(conn)
                    return result
        except (OperationalError, InterfaceError, PoolTimeoutError) as exc:
            raise LedgerUnavailable("the database did not answer") from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise LedgerUnavailable("the database connection was lost") from exc
            raise

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a write transaction off the event loop."""
        return await self.in_writer(functools.partial(self.transaction, fn))

    async def in_writer(self, call: Callable[[], T]) -> T:
        """Run ``call`` (which opens its own write transactions) off the event loop, holding
        SQLite's write turn: for :class:`broker.storage.group_commit.GroupCommit`."""
        if self._write_lock is None:
            return await anyio.to_thread.run_sync(call)
        async with self._write_lock:
            return await anyio.to_thread.run_sync(call)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a read-only transaction off the event loop."""
        return await anyio.to_thread.run_sync(functools.partial(self.read_transaction, fn))

    async def clock(self) -> float:
        """:func:`db_clock`, without a connection on SQLite."""
        if self.is_sqlite:
            return time.time()
        return await self.read(db_clock)

    async def wait_past_second(self, second: int) -> None:
        """Return once the database's clock has left ``second``: a token issued afterwards
        (its ``iat`` read from that clock) is dated after any cut-off at ``second``. Read again
        after each sleep, as this process's timer need not keep pace with that clock."""
        clock = await self.clock()
        while clock < second + 1:
            await anyio.sleep(second + 1 - clock)
            clock = await self.clock()

    def connect_dedicated(self) -> Any:
        """A PostgreSQL connection of its own (autocommit), outside the pool: for ``LISTEN`` and
        for the scheduler's session advisory lock, both of which live as long as the connection."""
        import psycopg

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        return psycopg.connect(url, autocommit=True, connect_timeout=10)

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def dispose(self) -> None:
        self.engine.dispose()


# --- migrations ----------------------------------------------------------------------------


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine) -> None:
    """Apply every Alembic migration to the database behind ``engine``."""
    from alembic import command

    cfg = _alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def migration_state(engine: Engine) -> tuple[str | None, str]:
    """(current revision of the database, head revision of the code)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(str(engine.url)))
    head = script.get_current_head()
    assert head is not None
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head
