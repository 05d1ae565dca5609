"""Usage reporting: totals over a time range and the usage events themselves, as an admin sees them.

Events are written by the gateway (:func:`broker.money.ledger.settle_hold`); this module only reads.
Visibility follows :class:`broker.identity.identities.Actor`: an org-admin or auditor sees every tenant, a
tenant-admin only its own, and a filter naming another tenant's objects simply finds nothing
(never 403), so ids cannot be probed.

Time ranges are half-open, ``from <= ts < to``: consecutive ranges neither overlap nor leave a
gap. Events are listed newest first (what an operator looks at), ordered by ``(ts, id)`` so the
order is total; the cursor is the position of the last event of a page, encoded opaquely.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, and_, func, or_, select

from broker.errors import InvalidRequest
from broker.identity.identities import Actor
from broker.storage.models import UsageEvent

_usage = UsageEvent.__table__  # type: ignore[attr-defined]

GroupBy = Literal["workload", "tenant", "model"]
GROUPS: tuple[GroupBy, ...] = ("workload", "tenant", "model")

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)
_CURSOR = re.compile(r"^[A-Za-z0-9_\-]{1,256}$")
_MAX_TS = 2**62
_MIN_SECONDS = calendar.timegm((1, 1, 1, 0, 0, 0, 0, 0, 0))
_MAX_SECONDS = calendar.timegm((9999, 12, 31, 23, 59, 59, 0, 0, 0))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --- query values --------------------------------------------------------------------------


def parse_group_by(raw: str | None) -> GroupBy:
    """The grouping of the totals; ``workload`` when none is asked for."""
    if raw is None:
        return "workload"
    if raw not in GROUPS:
        raise InvalidRequest("group_by must be one of workload, tenant, model")
    return raw


@dataclass(frozen=True)
class Instant:
    """A point in time from a query: exact for comparisons, and the whole second that bounds
    integer timestamps (events are stored to the second)."""

    seconds: int
    nanos: int

    @property
    def bound(self) -> int:
        """The first whole second at or after the instant: ``ts >= bound`` iff ``ts >= instant``."""
        return self.seconds + (1 if self.nanos else 0)

    def rfc3339(self) -> str:
        text = _iso(self.seconds)[:-1]
        if self.nanos:
            text += "." + f"{self.nanos:09d}".rstrip("0")
        return text + "Z"


def parse_instant(name: str, raw: str | None) -> Instant | None:
    """An RFC 3339 time with its offset (``Z`` or ``±HH:MM``), or None when absent."""
    if raw is None:
        return None
    match = _RFC3339.match(raw)
    if match is None:
        raise InvalidRequest(f"{name} must be an RFC 3339 time such as 2025-01-31T00:00:00Z")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    fraction, sign, off_h, off_m = match.group(7), match.group(9), match.group(10), match.group(11)
    if not (year >= 1 and 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
            and hour <= 23 and minute <= 59 and second <= 59):
        raise InvalidRequest(f"{name} is not a valid date and time")
    offset = 0
    if sign is not None:
        if int(off_h) > 23 or int(off_m) > 59:
            raise InvalidRequest(f"{name} has an invalid UTC offset")
        offset = (int(off_h) * 3600 + int(off_m) * 60) * (1 if sign == "+" else -1)
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) - offset
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise InvalidRequest(f"{name} is out of range")
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    return Instant(seconds, nanos)


def check_range(start: Instant | None, end: Instant | None) -> None:
    if start is not None and end is not None and (start.seconds, start.nanos) > (end.seconds, end.nanos):
        raise InvalidRequest("from must not be after to")


def encode_cursor(ts: int, event_id: str) -> str:
    raw = json.dumps([ts, event_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The position a cursor names; a cursor this module did not make is a 400."""
    invalid = InvalidRequest("cursor is not valid")
    if not _CURSOR.match(cursor):
        raise invalid
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise invalid from None
    if not (isinstance(value, list) and len(value) == 2):
        raise invalid
    ts, event_id = value
    if type(ts) is not int or not -_MAX_TS <= ts <= _MAX_TS:
        raise invalid
    if not isinstance(event_id, str) or not 1 <= len(event_id) <= 64 or not event_id.isprintable():
        raise invalid
    return ts, event_id


# --- queries -------------------------------------------------------------------------------


def _visible(actor: Actor) -> list[ColumnElement[bool]]:
    return [] if actor.org_wide else [_usage.c.tenant_id == actor.tenant_id]


def totals(
    conn: Connection, actor: Actor, group_by: GroupBy, start: Instant | None, end: Instant | None
) -> list[dict[str, Any]]:
    """Requests, tokens and cost per workload, tenant or model in ``[start, end)``."""
    u = _usage.c
    key = {"workload": u.workload_id, "tenant": u.tenant_id, "model": u.model}[group_by]
    where = _visible(actor)
    if start is not None:
        where.append(u.ts >= start.bound)
    if end is not None:
        where.append(u.ts < end.bound)
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
    return [
        {
            "key": row[0],
            "requests": int(row[1]),
            "prompt_tokens": int(row[2]),
            "completion_tokens": int(row[3]),
            "cost_micros": int(row[4]),
        }
        for row in conn.execute(stmt).all()
    ]


def _iso(ts: int) -> str:
    """RFC 3339 UTC, zero-padded for any year from 1 to 9999."""
    t = _EPOCH + timedelta(seconds=ts)
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}Z"


def event_view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "request_id": row.request_id,
        "ts": _iso(row.ts),
        "tenant_id": row.tenant_id,
        "workload_id": row.workload_id,
        "jti": row.jti,
        "model": row.model,
        "provider": row.provider,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cost_micros": row.cost_micros,
        "status": row.status,
        "latency_ms": row.latency_ms,
        "stream": bool(row.stream),
        "estimated": bool(row.estimated),
        "client_ip": row.client_ip,
    }


def list_events(
    conn: Connection,
    actor: Actor,
    *,
    workload_id: str | None,
    tenant_id: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of events, newest first, and the cursor of the next page (None on the last)."""
    u = _usage.c
    where = _visible(actor)
    if tenant_id is not None:
        where.append(u.tenant_id == tenant_id)  # within what _visible allows: another's is empty
    if workload_id is not None:
        where.append(u.workload_id == workload_id)
    if cursor is not None:
        ts, event_id = decode_cursor(cursor)
        where.append(or_(u.ts < ts, and_(u.ts == ts, u.id < event_id)))
    stmt = (
        select(_usage)
        .where(*where)
        .order_by(u.ts.desc(), u.id.desc())
        .limit(limit + 1)
    )
    rows = conn.execute(stmt).all()
    if len(rows) > limit:
        last = rows[limit - 1]
        return [event_view(r) for r in rows[:limit]], encode_cursor(int(last.ts), str(last.id))
    return [event_view(r) for r in rows], None
