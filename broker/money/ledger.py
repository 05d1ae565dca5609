"""The money ledger. Every change of a budget is an atomic conditional UPDATE in the database.

Three layers hold money:

* budget counters (organisation, tenant, workload; one row per period window): ``reserved``
  is the budgets of the slices not yet released, ``spent`` what released slices spent;
  ``reserved + spent <= limit``. A slice's spending moves into ``spent`` once, when it is
  released, not per call: no row is touched by every call of the deployment, and the sum the
  limit checks does not change by the move. Reports read usage events, not counters;
* token slices: ``spent + held <= budget`` of the slice;
* holds: the worst-case cost of one running gateway request, inside its token's slice.

A grant's extra budget is a slice too (``kind`` ``grant``), reserved from the tenant and
organisation budgets when granted. The slices of the tokens it funds are carved out of it
instead of the budgets (their ``parent_jti``): the parent holds each child's whole slice in its
``held`` while the child lives, moves what the child spends from held to spent, and can only be
released once every child is.

A batch job's money is a slice too (``kind`` ``job``), carved out of the slice of the token that
launched it like a child's, but outliving that token: the job's holds stay in it until the
batch poller settles them from the provider's output (the sweeper leaves them alone), and the
token's slice cannot be released while the job holds part of it.

A hold is a proven upper bound on what the provider can bill (:mod:`broker.money.bounds`), so a
settlement normally charges at most the hold. If a provider ever bills more, the broker charges
what was billed: the slice's ``spent`` and the budgets' ``spent`` then pass their limits (an
*overrun*: visible as a negative remainder, never hidden), and the caller refuses the token from
then on. The inequalities above hold for everything the broker itself decides.

Functions here take a SQLAlchemy ``Connection`` inside a transaction opened by
:class:`broker.storage.db.Database`, so a caller composes them into one transaction. No function reads
a balance and writes it back: each check is part of the ``WHERE`` of the ``UPDATE`` that moves
the money, so concurrent requests can never spend past a cap.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, or_, select

from broker.errors import BudgetExhausted, InsufficientQuota, SlowDown
from broker.settings import BudgetLimit
from broker.storage.db import Sql
from broker.storage.models import BudgetCounter, Hold, SliceCounter, TokenSlice, UsageEvent

_counter = BudgetCounter.__table__  # type: ignore[attr-defined]
_slice = TokenSlice.__table__  # type: ignore[attr-defined]
_link = SliceCounter.__table__  # type: ignore[attr-defined]
_hold = Hold.__table__  # type: ignore[attr-defined]
_usage = UsageEvent.__table__  # type: ignore[attr-defined]

# The lock order of budget counters, everywhere (reservation, release, a mass release).
SCOPE_ORDER = {"org": 0, "tenant": 1, "workload": 2}


@dataclass(frozen=True)
class BudgetRef:
    """One budget a slice must fit in: whose it is, its period and its limit now."""

    scope: str  # org | tenant | workload
    scope_id: str
    period: str  # hour | day | month | total
    limit_micros: int


def tenant_and_org(tenant_id: str, tenant_budgets: list[dict[str, Any]],
                   org_budgets: tuple[BudgetLimit, ...]) -> list[BudgetRef]:
    """The budgets above every workload of a tenant: the tenant's own and the organisation's."""
    refs = [BudgetRef("tenant", tenant_id, b["period"], int(b["limit_micros"]))
            for b in tenant_budgets]
    return refs + [BudgetRef("org", "org", b.period, b.limit_micros) for b in org_budgets]


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


_INSERT_SLICE = Sql("""
    INSERT INTO token_slice (jti, kind, parent_jti, workload_id, tenant_id, budget_micros,
                             spent_micros, held_micros, issued_at, expires_at)
    VALUES (:jti, :kind, :parent, :workload_id, :tenant_id, :amount, 0, 0, :issued_at,
            :expires_at)""")
# A child's slice is held inside its parent's, like a gateway hold inside a token's slice.
_CARVE = Sql("""
    UPDATE token_slice SET held_micros = held_micros + :amount
    WHERE jti = :parent AND released_at IS NULL AND revoked_at IS NULL AND expires_at > :now
      AND spent_micros + held_micros + :amount <= budget_micros
    RETURNING expires_at""")
_RESERVE = Sql("""
    UPDATE budget_counter SET reserved_micros = reserved_micros + :amount
    WHERE scope = :scope AND scope_id = :scope_id AND period = :period
      AND window_start = :window_start
      AND reserved_micros + spent_micros + :amount <= :limit
    RETURNING id""")
_ENSURE_COUNTER = Sql("""
    INSERT INTO budget_counter (scope, scope_id, period, window_start, reserved_micros,
                                spent_micros)
    VALUES (:scope, :scope_id, :period, :window_start, 0, 0)
    ON CONFLICT DO NOTHING""")
_LINK = Sql("INSERT INTO slice_counter (jti, counter_id) VALUES (:jti, :counter_id)")
# The same order as reservation takes them (organisation, tenant, workload; then id, period):
# counter ids follow creation, and a tenant budget added after a workload's would otherwise be
# locked in the opposite order by settlements and issuances, a PostgreSQL deadlock.
_COUNTER_IDS = Sql("""
    SELECT l.counter_id FROM slice_counter l JOIN budget_counter c ON c.id = l.counter_id
    WHERE l.jti = :jti
    ORDER BY CASE c.scope WHEN 'org' THEN 0 WHEN 'tenant' THEN 1 ELSE 2 END, c.scope_id,
             c.period""")
_RELEASE = Sql("""
    UPDATE token_slice SET released_at = :now
    WHERE jti = :jti AND released_at IS NULL AND held_micros = 0
    RETURNING budget_micros, spent_micros, workload_id, kind, parent_jti""")
_UNHOLD_PARENT = Sql("""
    UPDATE token_slice SET held_micros = held_micros - :amount WHERE jti = :parent""")
_SPEND_PARENT = Sql("""
    UPDATE token_slice
    SET held_micros = held_micros - :within, spent_micros = spent_micros + :cost
    WHERE jti = :parent
    RETURNING budget_micros, spent_micros, parent_jti""")
_REVOKE_CHILDREN = Sql("""
    UPDATE token_slice SET revoked_at = :now
    WHERE parent_jti = :parent AND kind = 'token' AND revoked_at IS NULL
    RETURNING jti""")
_ENSURE_LIVE = Sql("""
    INSERT INTO live_slices (workload_id, count) VALUES (:workload_id, 0)
    ON CONFLICT DO NOTHING""")
_LIVE_UP = Sql("""
    UPDATE live_slices SET count = count + 1
    WHERE workload_id = :workload_id AND count < :cap
    RETURNING count""")
_LIVE_DOWN = Sql("""
    UPDATE live_slices SET count = count - 1 WHERE workload_id = :workload_id AND count > 0""")
_PRUNE_LINKS = Sql("""
    DELETE FROM slice_counter WHERE jti IN (
        SELECT jti FROM token_slice WHERE released_at IS NOT NULL AND released_at < :before
        LIMIT :batch)""")
_PRUNE_SLICES = Sql("""
    DELETE FROM token_slice WHERE jti IN (
        SELECT jti FROM token_slice WHERE released_at IS NOT NULL AND released_at < :before
          AND NOT EXISTS (SELECT 1 FROM slice_counter l WHERE l.jti = token_slice.jti)
        LIMIT :batch)""")
# A root slice's budget leaves ``reserved`` and what it spent enters ``spent`` together, once,
# when it is released: ``reserved + spent`` never changes while the slice lives, so settlements
# need not lock the counters (every call of a deployment would queue on the organisation's row).
_CLOSE_IN_COUNTER = Sql("""
    UPDATE budget_counter
    SET reserved_micros = reserved_micros - :budget, spent_micros = spent_micros + :spent
    WHERE id = :id""")
_REMAINING = Sql("""
    SELECT budget_micros, spent_micros, held_micros, released_at, revoked_at
    FROM token_slice WHERE jti = :jti""")
_HOLD = Sql("""
    UPDATE token_slice SET held_micros = held_micros + :amount
    WHERE jti = :jti AND released_at IS NULL AND revoked_at IS NULL
      AND spent_micros + held_micros + :amount <= budget_micros
    RETURNING budget_micros - spent_micros - held_micros""")
_INSERT_HOLD = Sql("""
    INSERT INTO hold (id, jti, amount_micros, created_at) VALUES (:id, :jti, :amount, :now)""")
_DELETE_HOLD = Sql("DELETE FROM hold WHERE id = :id RETURNING jti, amount_micros")
_SETTLE_SLICE = Sql("""
    UPDATE token_slice
    SET held_micros = held_micros - :held, spent_micros = spent_micros + :cost
    WHERE jti = :jti
    RETURNING budget_micros, spent_micros, held_micros, workload_id, tenant_id, parent_jti""")
_USAGE_COLUMNS = (
    "id", "request_id", "ts", "tenant_id", "workload_id", "jti", "model", "provider",
    "prompt_tokens", "completion_tokens", "cost_micros", "status", "latency_ms", "stream",
    "estimated", "client_ip", "tool_calls",
)
# Built from the constant column list above, never from input.
_INSERT_USAGE = Sql(
    f"INSERT INTO usage_event ({', '.join(_USAGE_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join(':' + c for c in _USAGE_COLUMNS)})"
)
_USAGE_DEFAULTS: dict[str, Any] = {
    "prompt_tokens": 0, "completion_tokens": 0, "latency_ms": 0, "stream": False,
    "estimated": False, "client_ip": None, "tool_calls": None,
}


def _reserve_in_counter(conn: Connection, ref: BudgetRef, amount: int, start: int) -> int | None:
    row = _RESERVE.run(
        conn, amount=amount, scope=ref.scope, scope_id=ref.scope_id, period=ref.period,
        window_start=start, limit=ref.limit_micros,
    ).first()
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
    max_live: int | None = None,
    retry_after_s: int = 10,
    kind: str = "token",
) -> None:
    """Record a token and reserve ``amount`` from every budget above it, or raise
    :class:`BudgetExhausted` (the caller's transaction then rolls back every partial step).

    ``max_live`` caps the workload's slices not yet released (a conditional update, so
    concurrent issuances cannot pass it): one workload cannot pin the budgets above it with a
    flood of tokens. Beyond it, :class:`SlowDown`. A grant's slice (``kind`` ``grant``) is not
    a token and does not count.

    Lock order, everywhere: budget counters (in a fixed order) before the live-slice row."""
    _INSERT_SLICE.run(conn, jti=jti, kind=kind, parent=None, workload_id=workload_id,
                      tenant_id=tenant_id, amount=amount, issued_at=issued_at,
                      expires_at=expires_at)
    if amount:
        _reserve_in_budgets(conn, jti, amount, budgets, issued_at)
    if kind == "token":
        _count_live(conn, workload_id, max_live, retry_after_s)


def reserve_child_slice(
    conn: Connection,
    *,
    jti: str,
    parent: str,
    workload_id: str,
    tenant_id: str,
    amount: int,
    issued_at: int,
    expires_at: int,
    max_live: int | None = None,
    retry_after_s: int = 10,
) -> bool:
    """Record a token whose slice is carved out of ``parent``'s (a grant's) remaining budget,
    instead of the budgets above: False, with nothing written, when the parent is gone,
    expired, revoked or has no room for ``amount``. The child never outlives the parent."""
    row = _CARVE.run(conn, amount=amount, parent=parent, now=issued_at).first()
    if row is None:
        return False
    _INSERT_SLICE.run(conn, jti=jti, kind="token", parent=parent, workload_id=workload_id,
                      tenant_id=tenant_id, amount=amount, issued_at=issued_at,
                      expires_at=min(expires_at, int(row[0])))
    _count_live(conn, workload_id, max_live, retry_after_s)
    return True


def reserve_job_slice(
    conn: Connection,
    *,
    jti: str,
    parent: str,
    workload_id: str,
    tenant_id: str,
    amount: int,
    now: int,
    expires_at: int,
) -> bool:
    """Record a background job's slice (``kind`` ``job``: a batch), carved out of ``parent``'s
    (the token that launched it) like a delegated token's: False, with nothing written, when the
    parent is gone, expired, revoked or has no room for ``amount``.

    Unlike a token's, the job's slice is not clamped to the parent's expiry: the job runs for
    hours at the provider after its token died, and its money must stay held until it is
    settled. The parent cannot be released meanwhile (it holds the job's whole slice in its
    ``held``), and the job is no live token (``live_slices`` does not count it)."""
    if _CARVE.run(conn, amount=amount, parent=parent, now=now).first() is None:
        return False
    _INSERT_SLICE.run(conn, jti=jti, kind="job", parent=parent, workload_id=workload_id,
                      tenant_id=tenant_id, amount=amount, issued_at=now, expires_at=expires_at)
    return True


def _count_live(conn: Connection, workload_id: str, max_live: int | None,
                retry_after_s: int) -> None:
    _ENSURE_LIVE.run(conn, workload_id=workload_id)
    cap = max_live if max_live is not None else 2**62
    if _LIVE_UP.run(conn, workload_id=workload_id, cap=cap).first() is None:
        raise SlowDown(f"this workload already has {cap} live tokens (policy.max_live_tokens)",
                       headers={"retry-after": str(retry_after_s)})


def _reserve_in_budgets(conn: Connection, jti: str, amount: int, budgets: list[BudgetRef],
                        issued_at: int) -> None:
    # A fixed lock order keeps concurrent PostgreSQL transactions from deadlocking.
    for ref in sorted(budgets, key=lambda r: (SCOPE_ORDER[r.scope], r.scope_id, r.period)):
        if amount > ref.limit_micros:
            raise BudgetExhausted(f"the {ref.scope} {ref.period} budget cannot hold this slice")
        start = window_start(ref.period, issued_at)
        counter_id = _reserve_in_counter(conn, ref, amount, start)
        if counter_id is None:
            _ENSURE_COUNTER.run(conn, scope=ref.scope, scope_id=ref.scope_id, period=ref.period,
                                window_start=start)
            counter_id = _reserve_in_counter(conn, ref, amount, start)
        if counter_id is None:
            raise BudgetExhausted(f"the {ref.scope} {ref.period} budget is exhausted")
        _LINK.run(conn, jti=jti, counter_id=counter_id)


def _counter_ids(conn: Connection, jti: str) -> list[int]:
    # Every transaction that touches several counters locks them in one order.
    return [int(r[0]) for r in _COUNTER_IDS.run(conn, jti=jti)]


def release_slice(conn: Connection, jti: str, now: int) -> int:
    """Return the unspent part of a slice to its budgets, once. Returns the amount returned
    (0 when already released, or while a hold is still open: the sweeper comes back later)."""
    row = _RELEASE.run(conn, now=now, jti=jti).first()
    if row is None:
        return 0
    budget, spent, parent = int(row[0]), int(row[1]), row[4]
    # After an overrun the slice spent more than its budget: nothing returns.
    unspent = max(0, budget - spent)
    if parent is not None:
        if unspent > 0:
            _UNHOLD_PARENT.run(conn, amount=unspent, parent=parent)
    elif budget or spent:
        for counter_id in _counter_ids(conn, jti):
            _CLOSE_IN_COUNTER.run(conn, budget=budget, spent=spent, id=counter_id)
    if row[3] == "token":
        _LIVE_DOWN.run(conn, workload_id=row[2])
    return unspent


def revoke_descendants(conn: Connection, jtis: list[str], now: int) -> list[str]:
    """Revoke every token delegated, at any depth, from the slices ``jtis`` (already revoked
    by the caller) and release what can be released now: a child's unspent part goes back into
    its parent's slice. Returns the descendants revoked, deepest last."""
    found: list[str] = []
    level = sorted(jtis)
    while level:
        children = sorted(str(r[0]) for parent in level
                          for r in _REVOKE_CHILDREN.run(conn, now=now, parent=parent))
        found.extend(children)
        level = children
    # Leaves first: a parent is released only once its children gave their money back.
    for jti in reversed(found):
        release_slice(conn, jti, now)
    return found


def prune_released_slices(conn: Connection, before: int, batch: int = 1000) -> int:
    """Delete up to ``batch`` slices released before ``before`` (and their links to budget
    counters): their money has returned, and their usage events keep the record."""
    _PRUNE_LINKS.run(conn, before=before, batch=batch)
    return int(_PRUNE_SLICES.run(conn, before=before, batch=batch).rowcount or 0)


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
    """What remains of a token's slice; None when the token has none any more (never had one,
    or it was revoked: the ledger knows a revocation before a lagging replica's denylist)."""
    row = _REMAINING.run(conn, jti=jti).first()
    if row is None or row[4] is not None:
        return None
    if row[3] is not None:
        return 0
    return int(row[0]) - int(row[1]) - int(row[2])


# --- holds (gateway) -----------------------------------------------------------------------


def place_hold(conn: Connection, *, hold_id: str, jti: str, amount: int, now: int) -> int:
    """Hold ``amount`` inside the token's slice; raise :class:`InsufficientQuota` when it does
    not fit (or the slice is released or revoked). Returns what remains of the slice after the
    hold."""
    row = _HOLD.run(conn, amount=amount, jti=jti).first()
    if row is None:
        raise InsufficientQuota()
    _INSERT_HOLD.run(conn, id=hold_id, jti=jti, amount=amount, now=now)
    return int(row[0])


@dataclass(frozen=True)
class Settlement:
    """What a settlement did: what remains of the slice (negative after an overrun), and how
    much was charged above the hold (0 unless the provider billed more than the bound)."""

    remaining: int
    excess: int
    workload_id: str
    tenant_id: str
    jti: str


def settle_hold(conn: Connection, *, hold_id: str, cost: int, event: dict[str, Any]) -> Settlement | None:
    """Close a hold: charge ``cost`` in full, release the rest of the hold, and write the usage
    event (its identity fields default to the slice's), all at once. None when the hold was
    already settled (by the sweeper, say): then nothing is charged a second time.

    A cost above the hold is charged too (an overrun, see the module's docstring). A delegated
    slice's parents are charged at once (the part each still held moves from held to spent, the
    rest is added to spent); the budget counters learn it when the root slice is released, and
    an overrun then shows there as ``spent`` past the limit."""
    row = _DELETE_HOLD.run(conn, id=hold_id).first()
    if row is None:
        return None
    jti, held = str(row[0]), int(row[1])
    cost = max(0, cost)
    budget, spent, held_left, workload_id, tenant_id, parent = _SETTLE_SLICE.run(
        conn, held=held, cost=cost, jti=jti
    ).one()
    if cost and parent is not None:
        _spend_above(conn, parent, cost, _within(int(budget), int(spent), cost))
    values = {**_USAGE_DEFAULTS, "workload_id": workload_id, "tenant_id": tenant_id, **event,
              "id": hold_id, "jti": jti, "cost_micros": cost}
    _INSERT_USAGE.run(conn, **{c: values[c] for c in _USAGE_COLUMNS})
    remaining = int(budget) - int(spent) - int(held_left)
    return Settlement(remaining, max(0, cost - held), str(workload_id), str(tenant_id), jti)


def _within(budget: int, spent_after: int, cost: int) -> int:
    """The part of ``cost`` that the slice still had reserved before this charge (its budget
    minus what it had spent): the rest of an overrun was never reserved above."""
    return min(cost, max(0, budget - (spent_after - cost)))


def _spend_above(conn: Connection, parent: str | None, cost: int, within: int) -> None:
    """Charge ``cost`` to the slices a delegated slice was carved from, up to the root slice
    that holds the budget counters. The counters themselves learn the root's spending when it
    is released (:data:`_CLOSE_IN_COUNTER`)."""
    while parent is not None:
        # A delegated slice's parent may itself be delegated (or funded by a grant).
        budget, spent, above = _SPEND_PARENT.run(
            conn, within=within, cost=cost, parent=parent).one()
        within = _within(int(budget), int(spent), cost)
        parent = above


def orphaned_holds(conn: Connection, older_than: int, limit: int = 500) -> list[tuple[str, str, int]]:
    """Holds older than ``older_than``: their request outlived any process that ran it. A job's
    holds (a batch, in a ``job`` slice) are not: they last as long as the job runs at the
    provider, and only its poller knows when it ended and what it cost."""
    h, s = _hold.c, _slice.c
    rows = conn.execute(
        select(h.id, h.jti, h.amount_micros)
        .select_from(_hold.join(_slice, s.jti == h.jti))
        .where(h.created_at < older_than, s.kind != "job")
        .limit(limit)
    ).all()
    return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]


def now_s() -> int:
    return int(time.time())
