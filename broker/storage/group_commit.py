"""Group commit: the gateway's holds and settlements of one moment share one transaction.

Every gateway call writes twice (its hold, then its settlement with the usage event). Run one
transaction each, the cost per call is a thread hand-off, a ``BEGIN``, a ``COMMIT`` (on
PostgreSQL a round trip and a WAL flush each) and, on SQLite, a turn at the write lock. Here
the writes that arrive while a transaction is running wait for it, then go together in the
next one: under load each call pays a share of those costs, and with no load a write runs at
once, alone, as before.

Nothing is answered before it is durable: :meth:`GroupCommit.run` returns only after the
transaction holding its work committed, so a crash never loses a settlement whose caller was
told it was done.

One write failing must not fail the others. When a unit raises (a refusal such as
:class:`broker.errors.InsufficientQuota` is an exception too, and on PostgreSQL a deadlock with
another replica's transaction), the whole transaction rolls back and each unit of the group runs
again in a transaction of its own, so each gets exactly its own answer. A failure of the
database itself (the connection lost, the commit refused) is every unit's answer: none of them
is retried, since a lost ``COMMIT`` may or may not have landed (a hold left behind is found by
the sweeper, as after a crash).

Units must therefore do nothing outside the database that cannot be done twice: they may run,
roll back and run again.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from broker.errors import LedgerUnavailable
from broker.storage.db import Database

T = TypeVar("T")

MAX_GROUP = 64
"""Units per transaction at most: bounds how long the row locks of one group are held."""


@dataclass
class _Unit(Generic[T]):
    fn: Callable[[Connection], T]
    future: asyncio.Future[T]
    outcome: tuple[bool, Any] | None = field(default=None)


class _UnitFailed(Exception):
    """A unit raised inside the shared transaction: the group is rolled back and run alone."""


def _database_failure(exc: BaseException, is_sqlite: bool) -> bool:
    """Whether a unit's error is the database failing (every unit would fail alike: no unit
    is retried, so a database that is gone is not waited on once per unit) rather than this
    unit's own."""
    if isinstance(exc, (InterfaceError, PoolTimeoutError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError) and not is_sqlite:
        # A deadlock or a serialization failure is PostgreSQL choosing a victim among
        # transactions, not a database that is gone. (SQLite's OperationalError is any
        # statement's error: its file does not go away.)
        code = getattr(getattr(exc, "orig", None), "sqlstate", None)
        return code not in ("40P01", "40001")
    return False


class GroupCommit:
    """Runs write units of one event loop in shared transactions, one transaction at a time."""

    def __init__(self, db: Database, max_group: int = MAX_GROUP):
        self._db = db
        self._max_group = max_group
        self._waiting: list[_Unit[Any]] = []
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drainer: asyncio.Task[None] | None = None  # kept: the loop holds tasks weakly
        # Counted for the benchmarks and tests: how well writes are grouped.
        self.transactions = 0
        self.units = 0

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a write transaction, shared with the other units waiting, and return
        its result once that transaction committed (or raise what ``fn`` raised)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new event loop (a test's, a restarted server): what waited on the old one died
            # with it.
            self._loop, self._waiting, self._draining = loop, [], False
        unit: _Unit[T] = _Unit(fn, loop.create_future())
        # A caller that gave up never reads its unit's error: mark it read, so asyncio does
        # not report it as lost when the future is collected.
        unit.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting.append(unit)
        if not self._draining:
            self._draining = True
            self._drainer = loop.create_task(self._drain())
        # The drain goes on without a caller who gave up (a client gone): its unit still
        # commits or fails, it only nobody reads the answer.
        return await asyncio.shield(unit.future)

    async def _drain(self) -> None:
        try:
            while self._waiting:
                group = self._waiting[:self._max_group]
                del self._waiting[:len(group)]
                try:
                    await self._db.in_writer(functools.partial(self._commit, group))
                except BaseException as exc:  # the loop is closing: nobody must hang
                    for unit in group:
                        if unit.outcome is None:
                            unit.outcome = (False, exc)
                    if not isinstance(exc, Exception):
                        raise
                finally:
                    for unit in group:
                        _deliver(unit)
        finally:
            self._draining = False

    def _commit(self, group: list[_Unit[Any]]) -> None:
        """In a worker thread: the group in one transaction, or each unit alone."""
        self.transactions += 1
        self.units += len(group)
        if len(group) == 1:
            _alone(self._db, group[0])
            return
        try:
            results = self._db.transaction(lambda conn: _all(conn, group, self._db.is_sqlite))
        except _UnitFailed:
            for unit in group:
                self.transactions += 1
                _alone(self._db, unit)
            return
        except Exception as exc:  # the database failed the whole group: tell every unit
            for unit in group:
                unit.outcome = (False, exc)
            return
        for unit, result in zip(group, results, strict=True):
            unit.outcome = (True, result)


def _all(conn: Connection, group: list[_Unit[Any]], is_sqlite: bool) -> list[Any]:
    results = []
    for unit in group:
        try:
            results.append(unit.fn(conn))
        except Exception as exc:
            if _database_failure(exc, is_sqlite):
                raise
            raise _UnitFailed() from exc
    return results


def _alone(db: Database, unit: _Unit[Any]) -> None:
    try:
        unit.outcome = (True, db.transaction(unit.fn))
    except Exception as exc:
        unit.outcome = (False, exc)


def _deliver(unit: _Unit[Any]) -> None:
    if unit.future.done():
        return
    if unit.outcome is None:
        unit.future.set_exception(LedgerUnavailable("the write was not attempted"))
        return
    ok, value = unit.outcome
    if ok:
        unit.future.set_result(value)
    else:
        unit.future.set_exception(value)

