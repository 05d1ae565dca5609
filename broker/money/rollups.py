"""Usage rollups: the usage events summed per hour and per day (UTC), per tenant, workload and
model, so that usage reports stay fast and small once raw events are deleted.

:func:`rollup_once` folds a batch of events not yet rolled up into their hour's and their day's
rows and marks them ``rolled_up``, in the caller's one transaction: exactly once. Mark, then
add: the batch is picked (``WHERE rolled_up = false ... LIMIT``), marked by an ``UPDATE ...
RETURNING``, and only what that UPDATE returned is added, in the same transaction. Nobody else
can mark the picked events in between: on PostgreSQL the pick is ``FOR UPDATE SKIP LOCKED``, so
they stay locked by this transaction until it commits (a concurrent run skips them and takes
the next ones instead of queueing, and an event another run marked and committed meanwhile is
re-checked by the lock and left out); on SQLite a write transaction holds the database's one
write lock from its ``BEGIN IMMEDIATE``. A second run, or another replica's concurrent run, can
therefore never count an event again, and a run that fails rolls back its marks with its sums.
Rollup rows are added to with ``INSERT ... ON CONFLICT DO UPDATE SET x = x + excluded.x`` (one
atomic statement, no read-modify-write), in key order so two replicas lock shared rows in the
same order.

:func:`prune_raw` deletes raw events older than a cut-off, only those already rolled up: an
event the rollup has not reached yet stays until it has (and is then deleted by a later run).

:func:`rollup_pending` and :func:`prune_expired` are the scheduled jobs (see
:mod:`broker.jobs`): each runs batches in transactions of their own.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    any_,
    delete,
    false,
    func,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from broker.storage.db import Database
from broker.storage.models import UsageEvent
from broker.storage.usage_models import UsageRollup

_usage = UsageEvent.__table__  # type: ignore[attr-defined]
_rollup = UsageRollup.__table__  # type: ignore[attr-defined]

HOUR = 3600
DAY = 86_400
# The rollup periods and their length in seconds; a bucket is the start of its period (UTC).
PERIODS: tuple[tuple[str, int], ...] = (("hour", HOUR), ("day", DAY))
_SUMS = ("requests", "prompt_tokens", "completion_tokens", "cost_micros")
_KEY = ("period", "bucket", "tenant_id", "workload_id", "model")

# Events folded per transaction, and batches per scheduled run (a backlog, such as after a
# long outage of the job, is worked off over several runs instead of blocking the scheduler).
ROLLUP_BATCH = 5000
PRUNE_BATCH = 10_000
MAX_BATCHES_PER_RUN = 200


def rollup_once(conn: Connection, limit: int = ROLLUP_BATCH) -> int:
    """Fold up to ``limit`` events not yet rolled up (oldest first) into their hour's and
    day's rollup rows and mark them rolled up; the number of events folded. Run it in one
    transaction of its own: the marks and the sums commit together or not at all."""
    u = _usage.c
    batch = _batch(conn, [u.rolled_up == false()], limit, lock=True)
    marked = conn.execute(
        update(_usage)
        .where(batch)
        .values(rolled_up=True)
        .returning(u.ts, u.tenant_id, u.workload_id, u.model, u.prompt_tokens,
                   u.completion_tokens, u.cost_micros)
    ).all()
    if not marked:
        return 0
    sums: dict[tuple[str, int, str, str, str], list[int]] = {}
    for ts, tenant_id, workload_id, model, prompt, completion, cost in marked:
        for period, seconds in PERIODS:
            key = (period, int(ts) // seconds * seconds, tenant_id, workload_id, model)
            row = sums.setdefault(key, [0, 0, 0, 0])
            row[0] += 1
            row[1] += int(prompt)
            row[2] += int(completion)
            row[3] += int(cost)
    ins: Any = pg_insert(_rollup) if conn.dialect.name == "postgresql" else sqlite_insert(_rollup)
    upsert = ins.on_conflict_do_update(
        index_elements=list(_KEY),
        set_={name: _rollup.c[name] + ins.excluded[name] for name in _SUMS},
    )
    # Sorted: every replica takes the row locks of shared rollup rows in the same order.
    conn.execute(upsert, [dict(zip(_KEY + _SUMS, (*key, *row), strict=True))
                          for key, row in sorted(sums.items())])
    return len(marked)


def prune_raw(conn: Connection, cutoff_ts: int, limit: int = PRUNE_BATCH) -> int:
    """Delete up to ``limit`` raw events with ``ts < cutoff_ts`` that are rolled up (oldest
    first); the number deleted. An event not rolled up yet is never deleted."""
    u = _usage.c
    # Neither condition can change back (a mark is never undone, ts never changes).
    batch = _batch(conn, [u.rolled_up == true(), u.ts < cutoff_ts], limit, lock=False)
    result = conn.execute(delete(_usage).where(batch))
    return int(result.rowcount)


_ROWID: ColumnElement[int] = literal_column("usage_event.rowid")


def _batch(conn: Connection, where: list[ColumnElement[bool]], limit: int, *,
           lock: bool) -> ColumnElement[bool]:
    """The oldest ``limit`` events that match ``where`` (locked on PostgreSQL when ``lock``),
    named by their keys alone, as the condition of an UPDATE or DELETE.

    The picked keys are the statement's only condition, on purpose: with ``where`` repeated
    beside them each planner found a plan quadratic in the backlog. SQLite (no statistics) then
    walked every matching row of the (rolled_up, ts) index for each batch; PostgreSQL, with
    statistics older than the marks, walked that index and searched the 10,000 ids of the batch
    for each row (12 s a batch). Picked first, as ``id = ANY(ARRAY(SELECT ...))`` (computed once,
    then read through the primary key) or SQLite's rowids, each batch costs its own rows. It is
    sound because what was picked still matches when the statement changes it: see the
    module's docstring."""
    u = _usage.c
    if conn.dialect.name == "postgresql":
        pick = select(u.id).where(*where).order_by(u.ts).limit(limit)
        if lock:
            pick = pick.with_for_update(skip_locked=True)
        picked: ColumnElement[bool] = u.id == any_(func.array(pick.scalar_subquery()))
        return picked
    return _ROWID.in_(select(_ROWID).where(*where).order_by(u.ts).limit(limit).scalar_subquery())


def retention_cutoff(now: int, retention_days: int) -> int:
    """Raw events before this are deleted once rolled up: ``retention_days`` before ``now``,
    down to the hour (so an hour is deleted whole and reports past it stay hour-exact)."""
    cutoff = now - retention_days * DAY
    return cutoff - cutoff % HOUR


def rollup_pending(db: Database, limit: int = ROLLUP_BATCH,
                   max_batches: int = MAX_BATCHES_PER_RUN) -> int:
    """The ``usage.rollup`` job: fold batches until none is left (or ``max_batches`` ran);
    the number of events folded."""
    folded = 0
    for _ in range(max_batches):
        n = db.transaction(functools.partial(rollup_once, limit=limit))
        folded += n
        if n < limit:
            break
    return folded


def prune_expired(db: Database, retention_days: int, now: int | None = None,
                  limit: int = PRUNE_BATCH, max_batches: int = MAX_BATCHES_PER_RUN) -> int:
    """The ``usage.prune_raw`` job: delete the rolled-up raw events older than the retention;
    the number deleted."""
    cutoff = retention_cutoff(int(time.time()) if now is None else now, retention_days)
    deleted = 0
    for _ in range(max_batches):
        n = db.transaction(functools.partial(prune_raw, cutoff_ts=cutoff, limit=limit))
        deleted += n
        if n < limit:
            break
    return deleted
