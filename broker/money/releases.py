"""Releasing many slices at once: what :func:`broker.money.ledger.release_slice` and
:func:`broker.money.ledger.revoke_descendants` do slice by slice, done set-based for a mass
revocation (a workload may hold 100,000 live tokens and more): a constant number of statements
whatever their number, plus a few per level of delegation. The effects are the ledger's, slice
by slice; tests/test_mass_revocation.py compares the two on every kind of slice.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from sqlalchemy import ARRAY, ColumnElement, Connection, Text, any_, bindparam, case, func, select, update

from broker.money import ledger
from broker.storage.models import BudgetCounter, LiveSlices, SliceCounter, TokenSlice

_slice = TokenSlice.__table__  # type: ignore[attr-defined]
_link = SliceCounter.__table__  # type: ignore[attr-defined]
_counter = BudgetCounter.__table__  # type: ignore[attr-defined]
_live = LiveSlices.__table__  # type: ignore[attr-defined]


class Released(NamedTuple):
    """What a release needs to know of each slice it released (a tuple, not the database
    row: reading a row's fields by name costs more than the rest of a mass release)."""

    jti: str
    released_at: int | None
    budget_micros: int
    spent_micros: int
    workload_id: str
    kind: str
    parent_jti: str | None


RELEASED = tuple(_slice.c[name] for name in Released._fields)


def released_rows(rows: Iterable[Any]) -> list[Released]:
    return [Released._make(row) for row in rows]


def among(conn: Connection, column: ColumnElement[Any], values: list[str]) -> ColumnElement[bool]:
    """``column`` is one of ``values``, bound as one parameter whatever their number (an array
    on PostgreSQL, a JSON array on SQLite): an ``IN`` list takes a parameter per value, and
    both databases cap how many one statement may have."""
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam(None, value=values, type_=ARRAY(Text)))
    listed = func.json_each(bindparam(None, value=json.dumps(values))).table_valued("value")
    return column.in_(select(listed.c.value))


def revoke_descendants(conn: Connection, jtis: list[str], now: int) -> list[str]:
    """:func:`broker.money.ledger.revoke_descendants` for many parents at once, one statement
    per level, without the release (:func:`release_slices` does it). A job's slice is not a
    token and stays: it outlives the token that launched it."""
    s = _slice.c
    found: list[str] = []
    level = jtis
    while level:
        level = sorted(str(r[0]) for r in conn.execute(
            update(_slice)
            .where(among(conn, s.parent_jti, level), s.kind == "token", s.revoked_at.is_(None))
            .values(revoked_at=now)
            .returning(s.jti)))
        found.extend(level)
    return found


def release_slices(conn: Connection, jtis: list[str], counted: set[str], now: int) -> int:
    """:func:`broker.money.ledger.release_slice` for many slices at once, in rounds: a round
    releases every slice whose ``held`` is 0 and gives back their money; a parent among
    ``jtis`` held only by its children reaches 0 then, so the next round takes it (the rounds
    are bounded by the delegation depth). Returns the unspent money of the slices in
    ``counted``."""
    s = _slice.c
    pending = set(jtis)
    returned = 0
    while pending:
        released = released_rows(conn.execute(
            update(_slice)
            .where(among(conn, s.jti, sorted(pending)), s.released_at.is_(None),
                   s.held_micros == 0)
            .values(released_at=now)
            .returning(*RELEASED)
        ))
        if not released:
            break
        pending.difference_update(r.jti for r in released)
        returned += unspent(r for r in released if r.jti in counted)
        if not give_back(conn, released) & pending:
            break
    return returned


def unspent(released: Iterable[Released]) -> int:
    # After an overrun a slice spent more than its budget: nothing returns.
    return sum(max(0, int(r.budget_micros) - int(r.spent_micros)) for r in released)


def give_back(conn: Connection, released: Sequence[Released]) -> set[str]:
    """What the ledger does after releasing each slice, for all of ``released`` at once: the
    unspent part of a delegated slice back into its parent's ``held``, a root slice closed in
    its budget counters, the live-token count down. Returns the parents given money back."""
    carved = sorted(r.jti for r in released if r.parent_jti is not None)
    roots = sorted(r.jti for r in released if r.parent_jti is None)
    parents = _return_to_parents(conn, carved) if carved else set()
    if roots:
        _return_to_counters(conn, roots)
    live = Counter(r.workload_id for r in released if r.kind == "token")
    for workload_id in sorted(live):
        _live_down(conn, workload_id, live[workload_id])
    return parents


def _return_to_parents(conn: Connection, released: list[str]) -> set[str]:
    """A delegated slice's unspent part goes back into its parent's ``held``, in one statement
    for every parent; returns the parents."""
    s = _slice.c
    child = _slice.alias("child")
    c = child.c
    per_parent = (
        select(c.parent_jti.label("jti"), func.sum(c.budget_micros - c.spent_micros).label("amount"))
        .where(among(conn, c.jti, released), c.budget_micros > c.spent_micros)
        .group_by(c.parent_jti)
        .subquery()
    )
    rows = conn.execute(
        update(_slice).where(s.jti == per_parent.c.jti)
        .values(held_micros=s.held_micros - per_parent.c.amount)
        .returning(s.jti)
    ).all()
    return {str(r[0]) for r in rows}


def _return_to_counters(conn: Connection, released: list[str]) -> None:
    """Root slices (reserved from budget counters, not carved from a parent) close in their
    counters: each one's budget leaves ``reserved`` and what it spent enters ``spent``. Summed
    per counter in one read, then one update per counter (a handful: the budgets above the
    identity, in the period windows its live tokens were issued in), in the ledger's lock
    order, so that this transaction and an issuance never wait on each other in a cycle."""
    s, link, counter = _slice.c, _link.c, _counter.c
    per_counter = conn.execute(
        select(counter.id, counter.scope, counter.scope_id, counter.period,
               func.sum(s.budget_micros), func.sum(s.spent_micros))
        .select_from(_link.join(_slice, s.jti == link.jti)
                     .join(_counter, counter.id == link.counter_id))
        .where(among(conn, link.jti, released))
        .group_by(counter.id, counter.scope, counter.scope_id, counter.period)
    ).all()
    for row in sorted(per_counter, key=lambda r: (ledger.SCOPE_ORDER.get(r[1], 3), r[2], r[3], r[0])):
        budget, spent = int(row[4]), int(row[5])
        if budget or spent:
            conn.execute(update(_counter).where(counter.id == row[0]).values(
                reserved_micros=counter.reserved_micros - budget,
                spent_micros=counter.spent_micros + spent))


def _live_down(conn: Connection, workload_id: str, released: int) -> None:
    """The live-token count of a workload down by ``released``, never below 0 (as that many
    single decrements would leave it)."""
    live = _live.c
    conn.execute(
        update(_live).where(live.workload_id == workload_id, live.count > 0)
        .values(count=case((live.count > released, live.count - released), else_=0))
    )
