"""Group commit: concurrent writes share transactions, each caller gets exactly its own answer,
and nobody is answered before its write committed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, text

from broker.errors import InsufficientQuota, LedgerUnavailable
from broker.storage.db import Database, make_engine, migrate
from broker.storage.group_commit import GroupCommit


@pytest.fixture
def ledger_db(db_url: str) -> Iterator[Database]:
    engine = make_engine(db_url)
    migrate(engine)
    database = Database(engine)
    database.transaction(lambda c: c.exec_driver_sql(
        "CREATE TABLE IF NOT EXISTS gc_probe (k VARCHAR(20) PRIMARY KEY, v INTEGER)"))
    yield database
    engine.dispose()


def _insert(key: str, value: int) -> Callable[[Connection], int]:
    def unit(conn: Connection) -> int:
        conn.execute(text("INSERT INTO gc_probe (k, v) VALUES (:k, :v)"), {"k": key, "v": value})
        return value
    return unit


def _rows(db: Database) -> dict[str, int]:
    return {str(k): int(v) for k, v in db.transaction(
        lambda c: c.execute(text("SELECT k, v FROM gc_probe")).all())}


def test_concurrent_writes_share_transactions_and_each_gets_its_result(ledger_db: Database) -> None:
    writes = GroupCommit(ledger_db)

    async def main() -> list[int]:
        return await asyncio.gather(*(writes.run(_insert(f"k{i}", i)) for i in range(40)))

    assert asyncio.run(main()) == list(range(40))
    assert _rows(ledger_db) == {f"k{i}": i for i in range(40)}
    # The first write runs alone; the 39 that arrived meanwhile share what follows.
    assert writes.units == 40 and writes.transactions <= 3


def test_a_failing_write_gets_its_own_error_and_the_others_commit(ledger_db: Database) -> None:
    writes = GroupCommit(ledger_db)

    def refused(conn: Connection) -> int:
        conn.execute(text("INSERT INTO gc_probe (k, v) VALUES ('refused', 1)"))
        raise InsufficientQuota()

    async def main() -> list[int | BaseException]:
        units = [_insert(f"k{i}", i) for i in range(10)]
        units.insert(5, refused)
        return await asyncio.gather(*(writes.run(u) for u in units), return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[5], InsufficientQuota)
    assert [r for i, r in enumerate(results) if i != 5] == list(range(10))
    # The refused write's own statement was rolled back with it, and nothing ran twice.
    assert _rows(ledger_db) == {f"k{i}": i for i in range(10)}


def test_a_duplicate_key_fails_only_its_own_write(ledger_db: Database) -> None:
    writes = GroupCommit(ledger_db)

    async def main() -> list[int | BaseException]:
        units = [_insert("same", 1), *(_insert(f"k{i}", i) for i in range(5)), _insert("same", 2)]
        return await asyncio.gather(*(writes.run(u) for u in units), return_exceptions=True)

    results = asyncio.run(main())
    assert results[:6] == [1, 0, 1, 2, 3, 4]
    assert isinstance(results[6], Exception) and not isinstance(results[6], LedgerUnavailable)
    assert _rows(ledger_db)["same"] == 1


def test_a_database_that_is_gone_fails_every_write_with_503(tmp_path: Any) -> None:
    engine = make_engine("postgresql://nobody@127.0.0.1:1/none", pool_size=1)
    writes = GroupCommit(Database(engine))

    async def main() -> list[int | BaseException]:
        return await asyncio.gather(*(writes.run(_insert(f"k{i}", i)) for i in range(5)),
                                    return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        engine.dispose()
    assert all(isinstance(r, LedgerUnavailable) for r in results)


def test_a_caller_that_gives_up_still_has_its_write_committed(ledger_db: Database) -> None:
    writes = GroupCommit(ledger_db)

    async def main() -> None:
        task = asyncio.ensure_future(writes.run(_insert("gone", 7)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A later write goes after it, in order: once it committed, so had the first.
        assert await writes.run(_insert("after", 8)) == 8

    asyncio.run(main())
    assert _rows(ledger_db) == {"gone": 7, "after": 8}
