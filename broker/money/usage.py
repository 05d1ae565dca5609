"""Usage reporting: totals and time series over a time range, and the usage events themselves
(a page at a time, or all of a range for an export), as an admin sees them.

Events are written by the gateway (:func:`broker.money.ledger.settle_hold`) and folded into
hourly and daily rollups by :mod:`broker.money.rollups`; this module only reads.
Visibility follows :class:`broker.identity.identities.Actor`: an org-admin or auditor sees every tenant, a
tenant-admin only its own, and a filter naming another tenant's objects simply finds nothing
(never 403), so ids cannot be probed.

Time ranges are half-open, ``from <= ts < to``: consecutive ranges neither overlap nor leave a
gap. Events are listed newest first (what an operator looks at), ordered by ``(ts, id)`` so the
order is total; a page starts after the position of the last event of the page before (the
edge encodes it as an opaque cursor). An export runs oldest first, the same way.

Totals and series are read from the rollups, so they stay cheap after raw events expire
(``usage.raw_retention_days``), and are exact and current: a range is cut into

- the whole hours inside it: the rollups (daily rows for whole days where the answer is not
  hourly, hourly rows for the rest) plus the raw events not rolled up yet;
- its partial hours at ``from`` and ``to``: the raw events themselves, rolled up or not.

A partial hour whose raw events were already deleted (past the retention; seen as fewer raw
events rolled up in that hour than its hourly rollup counts) is answered at hour resolution: an
hour counts wholly when its start is in the range, not at all otherwise. The reads run in one
snapshot (REPEATABLE READ on PostgreSQL; a SQLite read transaction is one), so a rollup or a
prune committing meanwhile can neither hide an event nor count it twice.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Table,
    and_,
    false,
    func,
    literal_column,
    or_,
    select,
    true,
)

from broker.errors import InvalidRequest
from broker.identity.identities import Actor
from broker.storage.db import Database
from broker.storage.models import UsageEvent
from broker.storage.paging import page
from broker.storage.usage_models import UsageRollup

_usage = UsageEvent.__table__  # type: ignore[attr-defined]
_rollup = UsageRollup.__table__  # type: ignore[attr-defined]

GroupBy = Literal["workload", "tenant", "model"]
GROUPS: tuple[GroupBy, ...] = ("workload", "tenant", "model")
Interval = Literal["hour", "day"]
INTERVALS: tuple[Interval, ...] = ("hour", "day")

HOUR = 3600
DAY = 86_400
_SECONDS: dict[Interval, int] = {"hour": HOUR, "day": DAY}
_GROUP_COLUMNS: dict[GroupBy, str] = {"workload": "workload_id", "tenant": "tenant_id",
                                      "model": "model"}

# A series holds at most this many rows (buckets times keys): more is refused (400) rather than
# built, read and sent. A range with more buckets than this is refused before any read; a range
# with fewer buckets but too many keys is refused as soon as one read returns more rows (each
# read is capped at one row beyond the limit, so the work stays bounded). Empty buckets are not
# rows. An hourly series of a year has 8,760 buckets, a daily one 365.
MAX_SERIES_ROWS = 10_000


# --- queries -------------------------------------------------------------------------------


def _visible(actor: Actor, table: Table = _usage) -> list[ColumnElement[bool]]:
    return [] if actor.org_wide else [table.c.tenant_id == actor.tenant_id]


@dataclass(frozen=True)
class Total:
    key: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int


@dataclass(frozen=True)
class Point:
    """One key's usage in one bucket (the start of its hour or day, UNIX seconds)."""

    bucket: int
    key: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int


class TooManyRows(InvalidRequest):
    """A series that would exceed :data:`MAX_SERIES_ROWS`."""

    def __init__(self) -> None:
        super().__init__(f"the series would have more than {MAX_SERIES_ROWS} rows (buckets times "
                         "keys): narrow the range with from and to, or use interval=day")


def _ceil(ts: int, step: int) -> int:
    return -(-ts // step) * step


def _floor(ts: int, step: int) -> int:
    return ts // step * step


def _bucket_of(column: Any, step: int | None) -> Any:
    """The start of ``column``'s bucket of ``step`` seconds (a literal: PostgreSQL must see the
    same expression in the SELECT and the GROUP BY); None for totals (one bucket)."""
    if step is None:
        return None
    return column - column % literal_column(str(step))


def _snapshot(conn: Connection) -> None:
    """Every following read of this transaction in one snapshot (must come first in it)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")


Sums = dict[tuple[int, str], list[int]]


class _Reader:
    """Adds up the parts of one range, by (bucket, key); ``step`` None: one bucket (0)."""

    def __init__(self, conn: Connection, actor: Actor, group_by: GroupBy, step: int | None,
                 cap: int | None) -> None:
        self.conn = conn
        self.actor = actor
        self.column = _GROUP_COLUMNS[group_by]
        self.step = step
        self.cap = cap
        self.sums: Sums = {}

    def _add(self, stmt: Select[Any], bucket: Any, key: Any) -> None:
        stmt = stmt.group_by(key) if bucket is None else stmt.group_by(bucket, key)
        if self.cap is not None:
            stmt = stmt.limit(self.cap + 1)
        rows = self.conn.execute(stmt).all()
        if self.cap is not None and len(rows) > self.cap:
            raise TooManyRows()
        for row in rows:
            # int(): PostgreSQL's SUM of a bigint is a numeric, handed over as Decimal.
            at = (int(row[0]) if bucket is not None else 0, str(row[-5]))
            acc = self.sums.setdefault(at, [0, 0, 0, 0])
            for i in range(4):
                acc[i] += int(row[-4 + i])
        if self.cap is not None and len(self.sums) > self.cap:
            raise TooManyRows()

    def rollups(self, period: Interval, lo: int | None, hi: int | None) -> None:
        """The ``period`` rollup rows with ``lo <= bucket < hi``."""
        if lo is not None and hi is not None and lo >= hi:
            return
        r = _rollup.c
        where = [r.period == period, *_visible(self.actor, _rollup)]
        if lo is not None:
            where.append(r.bucket >= lo)
        if hi is not None:
            where.append(r.bucket < hi)
        # A daily row is its own bucket; an hourly row is in its day's.
        bucket = None if self.step is None else (
            r.bucket if self.step == _SECONDS[period] else _bucket_of(r.bucket, self.step))
        key = r[self.column]
        sums = [func.coalesce(func.sum(r.requests), 0), func.coalesce(func.sum(r.prompt_tokens), 0),
                func.coalesce(func.sum(r.completion_tokens), 0),
                func.coalesce(func.sum(r.cost_micros), 0)]
        columns = [key, *sums] if bucket is None else [bucket, key, *sums]
        self._add(select(*columns).where(*where), bucket, key)

    def raw(self, lo: int | None, hi: int | None, *, unrolled_only: bool) -> None:
        """The raw events with ``lo <= ts < hi`` (only those not rolled up, or all)."""
        if lo is not None and hi is not None and lo >= hi:
            return
        u = _usage.c
        where = _visible(self.actor)
        if unrolled_only:
            where.append(u.rolled_up == false())
        if lo is not None:
            where.append(u.ts >= lo)
        if hi is not None:
            where.append(u.ts < hi)
        bucket = _bucket_of(u.ts, self.step)
        key = u[self.column]
        sums = [func.count(), func.coalesce(func.sum(u.prompt_tokens), 0),
                func.coalesce(func.sum(u.completion_tokens), 0),
                func.coalesce(func.sum(u.cost_micros), 0)]
        columns = [key, *sums] if bucket is None else [bucket, key, *sums]
        self._add(select(*columns).where(*where), bucket, key)

    def raw_complete(self, hour: int) -> bool:
        """Whether every rolled-up event of ``hour`` is still there as a raw event (none was
        deleted by the retention): their count equals what the hour's rollup rows count."""
        u, r = _usage.c, _rollup.c
        raw = self.conn.execute(
            select(func.count()).where(u.ts >= hour, u.ts < hour + HOUR, u.rolled_up == true(),
                                       *_visible(self.actor))
        ).scalar_one()
        rolled = self.conn.execute(
            select(func.coalesce(func.sum(r.requests), 0))
            .where(r.period == "hour", r.bucket == hour, *_visible(self.actor, _rollup))
        ).scalar_one()
        return int(raw) == int(rolled)


def _read(conn: Connection, actor: Actor, group_by: GroupBy, start: int | None,
          end: int | None, interval: Interval | None) -> Sums:
    """The usage of ``start <= ts < end`` by (bucket, key): see the module's docstring."""
    _snapshot(conn)
    step = None if interval is None else _SECONDS[interval]
    if step is not None and start is not None and end is not None \
            and (_ceil(end, step) - _floor(start, step)) // step > MAX_SERIES_ROWS:
        raise TooManyRows()
    read = _Reader(conn, actor, group_by, step, None if step is None else MAX_SERIES_ROWS)
    if start is not None and end is not None and start >= end:
        return read.sums
    hs = None if start is None else _ceil(start, HOUR)   # the whole hours: [hs, he)
    he = None if end is None else _floor(end, HOUR)
    if hs is not None and he is not None and hs > he:
        # Inside one hour, which starts before `from`: raw, or nothing at hour resolution.
        if read.raw_complete(he):
            read.raw(start, end, unrolled_only=False)
        return read.sums

    read.raw(hs, he, unrolled_only=True)
    if step == HOUR:
        read.rollups("hour", hs, he)
    else:
        ds = None if hs is None else _ceil(hs, DAY)   # the whole days: [ds, de)
        de = None if he is None else _floor(he, DAY)
        if ds is None or de is None or ds < de:
            read.rollups("day", ds, de)
            if ds is not None:
                read.rollups("hour", hs, ds)
            if de is not None:
                read.rollups("hour", de, he)
        else:
            read.rollups("hour", hs, he)

    if start is not None and hs is not None and start < hs and read.raw_complete(hs - HOUR):
        read.raw(start, hs, unrolled_only=False)
    if end is not None and he is not None and he < end:
        if read.raw_complete(he):
            read.raw(he, end, unrolled_only=False)
        else:  # hour resolution: the hour starts inside the range, so it counts whole
            read.rollups("hour", he, he + HOUR)
            read.raw(he, he + HOUR, unrolled_only=True)
    return read.sums


def totals(
    conn: Connection, actor: Actor, group_by: GroupBy, start: int | None, end: int | None
) -> list[Total]:
    """Requests, tokens and cost per workload, tenant or model with ``start <= ts < end``
    (whole seconds), by key. Call it first in its (read) transaction: see :func:`_snapshot`."""
    sums = _read(conn, actor, group_by, start, end, None)
    return [Total(key, *values) for (_, key), values in sorted(sums.items())]


def series(
    conn: Connection,
    actor: Actor,
    group_by: GroupBy,
    interval: Interval,
    start: int | None,
    end: int | None,
) -> list[Point]:
    """:func:`totals` per hour or day (UTC) of ``start <= ts < end``, by bucket then key; empty
    buckets are left out. More than :data:`MAX_SERIES_ROWS` rows is refused
    (:class:`TooManyRows`, a 400). Call it first in its (read) transaction."""
    sums = _read(conn, actor, group_by, start, end, interval)
    return [Point(bucket, key, *values) for (bucket, key), values in sorted(sums.items())]


def list_events(
    conn: Connection,
    actor: Actor,
    *,
    workload_id: str | None,
    tenant_id: str | None,
    after: tuple[int, str] | None,
    limit: int,
) -> tuple[list[Any], tuple[int, str] | None]:
    """One page of event rows, newest first, after the position ``(ts, id)`` of the last event
    of the page before; and the position of this page's last event when more follow."""
    u = _usage.c
    where = _visible(actor)
    if tenant_id is not None:
        where.append(u.tenant_id == tenant_id)  # within what _visible allows: another's is empty
    if workload_id is not None:
        where.append(u.workload_id == workload_id)
    if after is not None:
        ts, event_id = after
        where.append(or_(u.ts < ts, and_(u.ts == ts, u.id < event_id)))
    stmt = (
        select(_usage)
        .where(*where)
        .order_by(u.ts.desc(), u.id.desc())
        .limit(limit + 1)
    )
    rows, last = page(conn.execute(stmt).all(), limit)
    return rows, None if last is None else (int(last.ts), str(last.id))


# --- export --------------------------------------------------------------------------------

# The columns of an export, in order: the event's fields as the spec names them.
EXPORT_COLUMNS: tuple[str, ...] = (
    "request_id", "ts", "tenant_id", "workload_id", "jti", "model", "provider", "prompt_tokens",
    "completion_tokens", "cost_micros", "status", "latency_ms", "stream", "client_ip",
)
EXPORT_PAGE = 1000


def export_page(
    conn: Connection,
    actor: Actor,
    start: int | None,
    end: int | None,
    after: tuple[int, str] | None,
    limit: int,
) -> list[Any]:
    """Up to ``limit`` events with ``start <= ts < end``, oldest first, after the position
    ``(ts, id)`` of the last event of the page before."""
    u = _usage.c
    where = _visible(actor)
    if start is not None:
        where.append(u.ts >= start)
    if end is not None:
        where.append(u.ts < end)
    if after is not None:
        ts, event_id = after
        where.append(or_(u.ts > ts, and_(u.ts == ts, u.id > event_id)))
    stmt = (
        select(u.id, *(u[name] for name in EXPORT_COLUMNS))
        .where(*where)
        .order_by(u.ts, u.id)
        .limit(limit)
    )
    return list(conn.execute(stmt).all())


async def export(
    db: Database,
    actor: Actor,
    start: int | None,
    end: int | None,
    *,
    page_size: int | None = None,
) -> AsyncIterator[list[Any]]:
    """Every event the actor sees with ``start <= ts < end``, oldest first, a page (a list of
    rows with ``id`` and :data:`EXPORT_COLUMNS`) at a time: each page is one short read
    transaction, so an export of any size holds neither a transaction nor its rows in memory.
    Events written meanwhile with a later position are included when the walk reaches them."""
    size = EXPORT_PAGE if page_size is None else page_size
    after: tuple[int, str] | None = None
    while True:
        rows = await db.read(functools.partial(export_page, actor=actor, start=start, end=end,
                                               after=after, limit=size))
        if rows:
            yield rows
        if len(rows) < size:
            return
        after = (int(rows[-1].ts), str(rows[-1].id))
