"""The reads the console's pages need that no domain module offers: the budget counters of the
current windows, spend per day, and a workload's live tokens. Read-only, and always scoped by
the caller's :class:`Actor` (or run after a domain read that was)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, and_, false, func, literal, or_, select, union_all

from broker.identity.identities import Actor
from broker.money.ledger import window_start
from broker.storage.models import BudgetCounter, TokenSlice, UsageEvent
from broker.storage.usage_models import UsageRollup

_counter = BudgetCounter.__table__  # type: ignore[attr-defined]
_slice = TokenSlice.__table__  # type: ignore[attr-defined]
_usage = UsageEvent.__table__  # type: ignore[attr-defined]
_rollup = UsageRollup.__table__  # type: ignore[attr-defined]

DAY = 86_400
CounterKey = tuple[str, str, str]  # (scope, scope_id, period)


def counters(conn: Connection, keys: list[CounterKey], now: int) -> dict[CounterKey, tuple[int, int]]:
    """(reserved, spent) of each budget's current window; a window nobody reserved from yet
    has no row, and is (0, 0)."""
    out: dict[CounterKey, tuple[int, int]] = {}
    c = _counter.c
    # A few hundred budgets at most: chunks keep each statement's parameter list modest.
    for i in range(0, len(keys), 200):
        chunk = keys[i:i + 200]
        cond = or_(*(and_(c.scope == scope, c.scope_id == scope_id, c.period == period,
                          c.window_start == window_start(period, now))
                     for scope, scope_id, period in chunk))
        for row in conn.execute(select(c.scope, c.scope_id, c.period, c.reserved_micros,
                                       c.spent_micros).where(cond)):
            out[(row[0], row[1], row[2])] = (int(row[3]), int(row[4]))
    return out


@dataclass(frozen=True)
class DailySpend:
    """Spend per day in the range, by tenant and by workload (micro-dollars)."""

    by_tenant: dict[str, dict[int, int]]
    by_workload: dict[str, dict[int, int]]
    total: dict[int, int]


def daily_spend(conn: Connection, actor: Actor, first_day: int, end: int) -> DailySpend:
    """What was spent each day (UTC) from ``first_day`` to before ``end``, as the actor may see
    it: the daily rollups plus the events not rolled up yet, read in one statement so that a
    rollup committing meanwhile is counted exactly once."""
    r, u = _rollup.c, _usage.c
    rolled = select(r.bucket.label("day"), r.tenant_id, r.workload_id,
                    r.cost_micros.label("cost")).where(
        r.period == "day", r.bucket >= first_day, r.bucket < end,
        actor.scope(r.tenant_id, None))
    raw = select((u.ts - u.ts % literal(DAY)).label("day"), u.tenant_id, u.workload_id,
                 u.cost_micros.label("cost")).where(
        u.rolled_up == false(), u.ts >= first_day, u.ts < end, actor.scope(u.tenant_id, None))
    both = union_all(rolled, raw).subquery()
    stmt = select(both.c.day, both.c.tenant_id, both.c.workload_id,
                  func.sum(both.c.cost)).group_by(both.c.day, both.c.tenant_id,
                                                  both.c.workload_id)
    spend = DailySpend({}, {}, {})
    for day, tenant_id, workload_id, cost in conn.execute(stmt):
        day, cost = int(day), int(cost or 0)  # PostgreSQL's SUM of a bigint is a Decimal
        for table, key in ((spend.by_tenant, tenant_id), (spend.by_workload, workload_id)):
            per_day = table.setdefault(str(key), {})
            per_day[day] = per_day.get(day, 0) + cost
        spend.total[day] = spend.total.get(day, 0) + cost
    return spend


@dataclass(frozen=True)
class LiveToken:
    jti: str
    issued_at: int
    expires_at: int
    budget_micros: int
    spent_micros: int
    held_micros: int


def live_tokens(conn: Connection, workload_id: str, now: int, limit: int = 100
                ) -> tuple[list[LiveToken], bool]:
    """The workload's tokens that are neither expired, revoked nor released, newest first
    (call it after a domain read that checked the actor may see the workload); and whether
    more exist than shown."""
    s = _slice.c
    rows = conn.execute(
        select(s.jti, s.issued_at, s.expires_at, s.budget_micros, s.spent_micros, s.held_micros)
        .where(s.workload_id == workload_id, s.kind == "token", s.released_at.is_(None),
               s.revoked_at.is_(None), s.expires_at > now)
        .order_by(s.issued_at.desc(), s.jti).limit(limit + 1)).all()
    tokens = [LiveToken(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]))
              for r in rows[:limit]]
    return tokens, len(rows) > limit
