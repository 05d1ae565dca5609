"""The money ledger. Every change of a budget is an atomic conditional UPDATE in the database.

Three layers hold money:

* budget counters (organisation, tenant, workload; one row per period window): ``reserved``
  is what live token slices hold, ``spent`` what was paid; ``reserved + spent <= limit``;
* token slices: ``spent + held <= budget`` of the slice;
* holds: the worst-case cost of one running gateway request, inside its token's slice.

Functions here take a SQLAlchemy ``Connection`` inside a transaction opened by
:class:`broker.db.Database`, so a caller composes them into one transaction. No function reads
a balance and writes it back: each check is part of the ``WHERE`` of the ``UPDATE`` that moves
the money, so concurrent requests can never spend past a cap.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, delete, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from broker.errors import BudgetExhausted, InsufficientQuota
from broker.models import BudgetCounter, Hold, SliceCounter, TokenSlice, UsageEvent

_counter = BudgetCounter.__table__  # type: ignore[attr-defined]
_slice = TokenSlice.__table__  # type: ignore[attr-defined]
_link = SliceCounter.__table__  # type: ignore[attr-defined]
_hold = Hold.__table__  # type: ignore[attr-defined]
_usage = UsageEvent.__table__  # type: ignore[attr-defined]

_SCOPE_ORDER = {"org": 0, "tenant": 1, "workload": 2}


@dataclass(frozen=True)
class BudgetRef:
    """One budget a slice must fit in: whose it is, its period and its limit now."""

    scope: str  # org | tenant | workload
    scope_id: str
    period: str  # hour | day | month | total
    limit_micros: int


def window_start(period: str, now: int) -> int:
    """Start of the period window that contains ``now`` (UTC)."""
    if period == "total":
        return 0
    if period == "hour":
        return now - now % 3600
    if period == "day":
        return now - now % 86400
    if period == "month":
        dt = datetime.fromtimestamp(now, UTC)
        return calendar.timegm((dt.year, dt.month, 1, 0, 0, 0))
    raise ValueError(f"unknown period {period!r}")


def _ensure_counter(conn: Connection, ref: BudgetRef, start: int) -> None:
    values = {
        "scope": ref.scope,
        "scope_id": ref.scope_id,
        "period": ref.period,
        "window_start": start,
        "reserved_micros": 0,
        "spent_micros": 0,
    }
    ins: Any = pg_insert(_counter) if conn.dialect.name == "postgresql" else sqlite_insert(_counter)
    conn.execute(ins.values(**values).on_conflict_do_nothing())


def _reserve_in_counter(conn: Connection, ref: BudgetRef, amount: int, start: int) -> int | None:
    c = _counter.c
    stmt = (
        update(_counter)
        .where(
            and_(
                c.scope == ref.scope,
                c.scope_id == ref.scope_id,
                c.period == ref.period,
                c.window_start == start,
                c.reserved_micros + c.spent_micros + amount <= ref.limit_micros,
            )
        )
        .values(reserved_micros=c.reserved_micros + amount)
        .returning(c.id)
    )
    row = conn.execute(stmt).first()
    return None if row is None else int(row[0])


def reserve_slice(
    conn: Connection,
    *,
    jti: str,
    workload_id: str,
    tenant_id: str,
    amount: int,
    budgets: list[BudgetRef],
    issued_at: int,
    expires_at: int,
) -> None:
    """Record a token and reserve ``amount`` from every budget above it, or raise
    :class:`BudgetExhausted` (the caller's transaction then rolls back every partial step)."""
    conn.execute(
        insert(_slice).values(
            jti=jti,
            workload_id=workload_id,
            tenant_id=tenant_id,
            budget_micros=amount,
            spent_micros=0,
            held_micros=0,
            issued_at=issued_at,
            expires_at=expires_at,
        )
    )
    if amount == 0:
        return
    # A fixed lock order keeps concurrent PostgreSQL transactions from deadlocking.
    for ref in sorted(budgets, key=lambda r: (_SCOPE_ORDER[r.scope], r.scope_id, r.period)):
        if amount > ref.limit_micros:
            raise BudgetExhausted(f"the {ref.scope} {ref.period} budget cannot hold this slice")
        start = window_start(ref.period, issued_at)
        counter_id = _reserve_in_counter(conn, ref, amount, start)
        if counter_id is None:
            _ensure_counter(conn, ref, start)
            counter_id = _reserve_in_counter(conn, ref, amount, start)
        if counter_id is None:
            raise BudgetExhausted(f"the {ref.scope} {ref.period} budget is exhausted")
        conn.execute(insert(_link).values(jti=jti, counter_id=counter_id))


def _counter_ids(conn: Connection, jti: str) -> list[int]:
    rows = conn.execute(select(_link.c.counter_id).where(_link.c.jti == jti)).all()
    return sorted(int(r[0]) for r in rows)


def release_slice(conn: Connection, jti: str, now: int) -> int:
    """Return the unspent part of a slice to its budgets, once. Returns the amount returned
    (0 when already released, or while a hold is still open: the sweeper comes back later)."""
    s = _slice.c
    row = conn.execute(
        update(_slice)
        .where(and_(s.jti == jti, s.released_at.is_(None), s.held_micros == 0))
        .values(released_at=now)
        .returning(s.budget_micros, s.spent_micros)
    ).first()
    if row is None:
        return 0
    unspent = int(row[0]) - int(row[1])
    ids = _counter_ids(conn, jti)
    if unspent > 0 and ids:
        c = _counter.c
        conn.execute(
            update(_counter).where(c.id.in_(ids)).values(reserved_micros=c.reserved_micros - unspent)
        )
    return unspent


def expired_open_slices(conn: Connection, now: int, limit: int = 500) -> list[str]:
    s = _slice.c
    rows = conn.execute(
        select(s.jti)
        .where(and_(s.released_at.is_(None), or_(s.expires_at < now, s.revoked_at.isnot(None))))
        .order_by(s.expires_at)
        .limit(limit)
    ).all()
    return [str(r[0]) for r in rows]


def slice_remaining(conn: Connection, jti: str) -> int | None:
    s = _slice.c
    row = conn.execute(
        select(s.budget_micros, s.spent_micros, s.held_micros, s.released_at).where(s.jti == jti)
    ).first()
    if row is None:
        return None
    if row[3] is not None:
        return 0
    return int(row[0]) - int(row[1]) - int(row[2])


# --- holds (gateway) -----------------------------------------------------------------------


def place_hold(conn: Connection, *, hold_id: str, jti: str, amount: int, now: int) -> int:
    """Hold ``amount`` inside the token's slice; raise :class:`InsufficientQuota` when it does
    not fit. Returns what remains of the slice after the hold."""
    s = _slice.c
    row = conn.execute(
        update(_slice)
        .where(
            and_(
                s.jti == jti,
                s.released_at.is_(None),
                s.spent_micros + s.held_micros + amount <= s.budget_micros,
            )
        )
        .values(held_micros=s.held_micros + amount)
        .returning(s.budget_micros - s.spent_micros - s.held_micros)
    ).first()
    if row is None:
        raise InsufficientQuota()
    conn.execute(insert(_hold).values(id=hold_id, jti=jti, amount_micros=amount, created_at=now))
    return int(row[0])


def settle_hold(conn: Connection, *, hold_id: str, cost: int, event: dict[str, Any]) -> int | None:
    """Close a hold: charge ``cost`` (at most the held amount), release the rest, and write the
    usage event (its identity fields default to the slice's), all at once. Returns what remains
    of the slice, or None when the hold was already settled (by the sweeper, say): then nothing
    is charged a second time."""
    h = _hold.c
    row = conn.execute(
        delete(_hold).where(h.id == hold_id).returning(h.jti, h.amount_micros)
    ).first()
    if row is None:
        return None
    jti, held = str(row[0]), int(row[1])
    cost = max(0, min(cost, held))
    s = _slice.c
    remaining, workload_id, tenant_id = conn.execute(
        update(_slice)
        .where(s.jti == jti)
        .values(held_micros=s.held_micros - held, spent_micros=s.spent_micros + cost)
        .returning(s.budget_micros - s.spent_micros - s.held_micros, s.workload_id, s.tenant_id)
    ).one()
    if cost:
        ids = _counter_ids(conn, jti)
        if ids:
            c = _counter.c
            conn.execute(
                update(_counter)
                .where(c.id.in_(ids))
                .values(reserved_micros=c.reserved_micros - cost, spent_micros=c.spent_micros + cost)
            )
    event = {"workload_id": workload_id, "tenant_id": tenant_id, **event,
             "id": hold_id, "jti": jti, "cost_micros": cost}
    conn.execute(insert(_usage).values(**event))
    return int(remaining)


def orphaned_holds(conn: Connection, older_than: int, limit: int = 500) -> list[tuple[str, str, int]]:
    h = _hold.c
    rows = conn.execute(
        select(h.id, h.jti, h.amount_micros).where(h.created_at < older_than).limit(limit)
    ).all()
    return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]


def now_s() -> int:
    return int(time.time())
