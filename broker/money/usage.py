"""Usage reporting: totals over a time range and the usage events themselves, as an admin sees them.

Events are written by the gateway (:func:`broker.money.ledger.settle_hold`); this module only reads.
Visibility follows :class:`broker.identity.identities.Actor`: an org-admin or auditor sees every tenant, a
tenant-admin only its own, and a filter naming another tenant's objects simply finds nothing
(never 403), so ids cannot be probed.

Time ranges are half-open, ``from <= ts < to``: consecutive ranges neither overlap nor leave a
gap. Events are listed newest first (what an operator looks at), ordered by ``(ts, id)`` so the
order is total; a page starts after the position of the last event of the page before (the
edge encodes it as an opaque cursor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, and_, func, or_, select

from broker.identity.identities import Actor
from broker.storage.models import UsageEvent
from broker.storage.paging import page

_usage = UsageEvent.__table__  # type: ignore[attr-defined]

GroupBy = Literal["workload", "tenant", "model"]
GROUPS: tuple[GroupBy, ...] = ("workload", "tenant", "model")


# --- queries -------------------------------------------------------------------------------


def _visible(actor: Actor) -> list[ColumnElement[bool]]:
    return [] if actor.org_wide else [_usage.c.tenant_id == actor.tenant_id]


@dataclass(frozen=True)
class Total:
    key: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int


def totals(
    conn: Connection, actor: Actor, group_by: GroupBy, start: int | None, end: int | None
) -> list[Total]:
    """Requests, tokens and cost per workload, tenant or model with ``start <= ts < end``
    (whole seconds)."""
    u = _usage.c
    key = {"workload": u.workload_id, "tenant": u.tenant_id, "model": u.model}[group_by]
    where = _visible(actor)
    if start is not None:
        where.append(u.ts >= start)
    if end is not None:
        where.append(u.ts < end)
    stmt = (
        select(
            key,
            func.count(),
            func.coalesce(func.sum(u.prompt_tokens), 0),
            func.coalesce(func.sum(u.completion_tokens), 0),
            func.coalesce(func.sum(u.cost_micros), 0),
        )
        .where(*where)
        .group_by(key)
        .order_by(key)
    )
    # int(): PostgreSQL's SUM of a bigint is a numeric, which the driver hands over as Decimal.
    return [Total(row[0], int(row[1]), int(row[2]), int(row[3]), int(row[4]))
            for row in conn.execute(stmt).all()]


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
