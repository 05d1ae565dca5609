"""The periodic catch-up: it finds every log entry this replica missed, including one whose
transaction committed after a later-numbered one was applied, and reads whole rows only for the
entries it lacks, so a mass revocation is not read again on every tick."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from sqlalchemy import delete, event, insert

from broker.revocation import log as revocation_log
from broker.revocation import sync
from broker.revocation.denylist import Denylist
from broker.revocation.log import Entry
from broker.revocation.sync import CATCHUP_OVERLAP_S
from broker.storage.bus import EventBus
from broker.storage.db import Database
from broker.storage.models import Revocation
from broker.tokens.tokens import VerifiedToken

_log = Revocation.__table__  # type: ignore[attr-defined]


@pytest.fixture
def materialised(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ids of the log rows turned into entries, in order."""
    seen: list[int] = []
    original = Entry.from_row

    def counting(row: Any) -> Entry:
        seen.append(int(row.id))
        return original(row)

    monkeypatch.setattr(Entry, "from_row", staticmethod(counting))
    return seen


def _revoke(db: Database, jtis: list[str], now: int, ids: list[int] | None = None) -> list[int]:
    """Token revocations written straight to the log, as another replica would."""
    rows = [{"kind": "token", "action": "revoke", "target": jti, "tenant_id": "tn_a",
             "cutoff": None, "expires_at": now + 600, "relevant_until": now + 630,
             "created_at": now, "actor": "wl_admin", "reason": None} for jti in jtis]
    if ids is not None:
        rows = [{**row, "id": i} for row, i in zip(rows, ids, strict=True)]
    return db.transaction(lambda c: [int(c.execute(insert(_log).values(**row).returning(_log.c.id))
                                         .scalar_one()) for row in rows])


def _catch_up(db: Database, denylist: Denylist, now: int) -> int:
    return db.read_transaction(lambda c: sync.catch_up(c, denylist, now))


def _live(denylist: Denylist, jti: str, now: int) -> bool:
    token = VerifiedToken(sub="wl_a", tenant="tn_a", kind="agent", jti=jti, iat=now, exp=now + 300,
                          models=(), budget_micros=0, roles=(), act=None, claims={})
    return denylist.is_live(token)


def test_after_a_burst_the_catch_up_reads_whole_rows_only_for_entries_it_lacks(
    db: Database, materialised: list[int]
) -> None:
    now = int(time.time())
    burst = _revoke(db, [f"burst{i}" for i in range(300)], now)
    denylist = Denylist()
    db.read_transaction(lambda c: sync.load(c, denylist, now))
    assert sorted(materialised) == burst
    materialised.clear()

    for _ in range(3):  # ticks inside the window of the burst: nothing to read again
        assert _catch_up(db, denylist, now + 1) == 0
    assert materialised == []

    # Five more; two of them reach this replica by notification first, the highest among them,
    # so the other three are numbered below the highest id applied.
    more = _revoke(db, [f"more{i}" for i in range(5)], now)
    for entry_id in (more[1], more[4]):
        entry = db.read_transaction(lambda c: revocation_log.read_entry(c, entry_id))
        assert entry is not None
        denylist.apply(entry)
    materialised.clear()
    assert _catch_up(db, denylist, now + 1) == 3
    assert sorted(materialised) == [more[0], more[2], more[3]]
    assert not any(_live(denylist, f"more{i}", now) for i in range(5))
    materialised.clear()
    assert _catch_up(db, denylist, now + 2) == 0 and materialised == []


def test_an_entry_committed_after_a_later_numbered_one_is_still_applied(
    db: Database, materialised: list[int]
) -> None:
    now = int(time.time())
    _revoke(db, ["a", "b", "c"], now, ids=[1, 2, 3])
    _revoke(db, ["d"], now, ids=[10])
    denylist = Denylist()
    assert _catch_up(db, denylist, now) == 4 and denylist.last_id == 10
    materialised.clear()

    # Id 7 was handed out before id 10 but its transaction commits only now.
    _revoke(db, ["late"], now + 5, ids=[7])
    assert _live(denylist, "late", now)
    assert _catch_up(db, denylist, now + 5) == 1
    assert materialised == [7]
    assert not _live(denylist, "late", now)


def test_a_row_deleted_by_hand_does_not_hide_a_late_one(db: Database) -> None:
    now = int(time.time())
    _revoke(db, ["a", "b", "c", "d"], now, ids=[1, 2, 3, 6])
    denylist = Denylist()
    assert _catch_up(db, denylist, now) == 4
    # The same number of ids in the window as applied, but not the same ids.
    db.transaction(lambda c: c.execute(delete(_log).where(_log.c.id == 2)))
    _revoke(db, ["late"], now, ids=[4])
    assert _catch_up(db, denylist, now) == 1
    assert not _live(denylist, "late", now)


def test_the_ids_remembered_for_the_catch_up_leave_with_the_window(db: Database) -> None:
    now = int(time.time())
    _revoke(db, [f"j{i}" for i in range(50)], now)
    denylist = Denylist()
    _catch_up(db, denylist, now)
    assert denylist.applied_since(now - CATCHUP_OVERLAP_S)[0] == 50
    assert _catch_up(db, denylist, now + CATCHUP_OVERLAP_S + 1) == 0
    assert denylist.applied_since(now + 1)[0] == 0
    assert not _live(denylist, "j0", now)  # forgetting the id does not forget the revocation


def test_a_notification_of_an_entry_already_applied_is_not_read_again(
    db: Database, materialised: list[int]
) -> None:
    now = int(time.time())
    first, second = _revoke(db, ["seen", "unseen"], now)
    denylist = Denylist()
    entry = db.read_transaction(lambda c: revocation_log.read_entry(c, first))
    assert entry is not None
    denylist.apply(entry)  # as the replica that made the change does at once
    materialised.clear()
    bus = EventBus(db, interval_s=60)
    sync.follow(bus, db, denylist)
    for entry_id in (first, second):
        bus.dispatch(json.dumps({"type": "revocation", "id": entry_id}))
    assert materialised == [second]
    assert not _live(denylist, "unseen", now)


def test_a_batch_of_notifications_costs_a_statement_or_a_few(
    db: Database, materialised: list[int]
) -> None:
    now = int(time.time())
    early = _revoke(db, ["e1", "e2", "e3"], now, ids=[100, 200, 300])
    denylist = Denylist()
    assert _catch_up(db, denylist, now) == 3
    burst = _revoke(db, [f"burst{i}" for i in range(2_000)], now, ids=list(range(1_000, 3_000)))
    # Two entries numbered below the highest applied commit late: read by id, not by range.
    late = _revoke(db, ["late1", "late2"], now, ids=[150, 250])
    bus = EventBus(db, interval_s=60)
    sync.follow(bus, db, denylist)
    statements = _count_selects(db)
    materialised.clear()
    ids = [*early, *burst[:1_000], *late]
    bus.dispatch(*(json.dumps({"type": "revocation", "id": i}) for i in ids))
    # The range read took the whole burst, the half not yet notified included.
    assert sorted(materialised) == sorted([*burst, *late])
    assert len(statements) == 2, statements
    materialised.clear()
    bus.dispatch(*(json.dumps({"type": "revocation", "id": i}) for i in burst[1_000:]))
    assert materialised == [] and len(statements) == 2
    assert not any(_live(denylist, f"burst{i}", now) for i in (0, 999, 1_999))


def test_a_forged_message_does_not_spoil_its_batch(db: Database) -> None:
    now = int(time.time())
    (entry_id,) = _revoke(db, ["real"], now)
    denylist = Denylist()
    bus = EventBus(db, interval_s=60)
    sync.follow(bus, db, denylist)
    bus.dispatch(json.dumps({"type": "revocation", "id": "1; DROP TABLE revocation"}),
                 json.dumps({"type": "revocation"}),
                 json.dumps({"type": "revocation", "id": entry_id}))
    assert not _live(denylist, "real", now)


def _count_selects(db: Database) -> list[str]:
    """The reads run on ``db`` from now on, in order (SQLite's BEGIN is no read)."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    event.listen(db.engine, "before_cursor_execute", count)
    return seen
