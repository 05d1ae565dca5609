"""Usage reporting routes (``/v1/admin/usage...``): parse the query, call :mod:`broker.money.usage`,
render. Read-only, so every admin role may call them; what each one sees is the domain's rule."""

from __future__ import annotations

import calendar
import csv
import io
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from broker.api.admin import admin
from broker.api.http import json_response, query_str
from broker.api.pagination import encode_position, position_page_params
from broker.api.views import event_view, iso
from broker.errors import InvalidRequest
from broker.identity.identities import Actor
from broker.money import usage
from broker.services import Services

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)
_MIN_SECONDS = calendar.timegm((1, 1, 1, 0, 0, 0, 0, 0, 0))
_MAX_SECONDS = calendar.timegm((9999, 12, 31, 23, 59, 59, 0, 0, 0))


# --- query values --------------------------------------------------------------------------


def parse_group_by(raw: str | None) -> usage.GroupBy:
    """The grouping of the totals; ``workload`` when none is asked for."""
    if raw is None:
        return "workload"
    if raw not in usage.GROUPS:
        raise InvalidRequest("group_by must be one of workload, tenant, model")
    return raw


def parse_interval(raw: str | None) -> usage.Interval | None:
    """The buckets of a series; None (totals) when none is asked for."""
    if raw is None:
        return None
    if raw not in usage.INTERVALS:
        raise InvalidRequest("interval must be one of hour, day")
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
        text = iso(self.seconds)[:-1]
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


# --- routes --------------------------------------------------------------------------------


async def usage_totals(request: Request, svc: Services, actor: Actor) -> Response:
    """Requests, tokens and cost per workload, tenant or model over a time range; per hour or
    day with ``interval``."""
    group_by = parse_group_by(query_str(request, "group_by", 16))
    interval = parse_interval(query_str(request, "interval", 16))
    start = parse_instant("from", query_str(request, "from", 64))
    end = parse_instant("to", query_str(request, "to", 64))
    check_range(start, end)
    lo = start.bound if start else None
    hi = end.bound if end else None
    rng = {"from": start.rfc3339() if start else None, "to": end.rfc3339() if end else None}
    if interval is None:
        totals = await svc.db.read(lambda conn: usage.totals(conn, actor, group_by, lo, hi))
        return json_response({
            "data": [{"key": t.key, "requests": t.requests, "prompt_tokens": t.prompt_tokens,
                      "completion_tokens": t.completion_tokens, "cost_micros": t.cost_micros}
                     for t in totals],
            "next_cursor": None,
            "group_by": group_by,
            **rng,
        })
    step = interval
    points = await svc.db.read(lambda conn: usage.series(conn, actor, group_by, step, lo, hi))
    return json_response({
        "data": [{"bucket": iso(p.bucket), "key": p.key, "requests": p.requests,
                  "prompt_tokens": p.prompt_tokens, "completion_tokens": p.completion_tokens,
                  "cost_micros": p.cost_micros} for p in points],
        "next_cursor": None,
        "group_by": group_by,
        "interval": interval,
        **rng,
    })


async def usage_events(request: Request, svc: Services, actor: Actor) -> Response:
    """Usage events, newest first, one cursor-paginated page at a time."""
    workload_id = query_str(request, "workload_id", 64)
    tenant_id = query_str(request, "tenant_id", 64)
    # A bad cursor is refused before any database work.
    after, limit = position_page_params(request)
    rows, last = await svc.db.read(
        lambda conn: usage.list_events(
            conn, actor, workload_id=workload_id, tenant_id=tenant_id, after=after, limit=limit
        )
    )
    return json_response({"data": [event_view(r) for r in rows],
                          "next_cursor": None if last is None else encode_position(*last)})


# --- export --------------------------------------------------------------------------------

# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """One exported value as CSV text: times RFC 3339, booleans ``true``/``false``, absent
    empty; a text that a spreadsheet would run as a formula gets a leading ``'``. Numbers
    (never negative in an event) are written as they are."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def csv_text(rows: Iterable[Iterable[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue()


def export_cells(row: Any) -> list[str]:
    return [iso(int(row.ts)) if name == "ts" else csv_cell(getattr(row, name))
            for name in usage.EXPORT_COLUMNS]


def _file_time(instant: Instant | None, default: str) -> str:
    return default if instant is None else iso(instant.seconds).replace("-", "").replace(":", "")


async def usage_export(request: Request, svc: Services, actor: Actor) -> Response:
    """Usage events of a time range, oldest first, as a CSV file (``format=csv``), streamed."""
    if query_str(request, "format", 16) != "csv":
        raise InvalidRequest("format must be csv")
    start = parse_instant("from", query_str(request, "from", 64))
    end = parse_instant("to", query_str(request, "to", 64))
    check_range(start, end)
    lo = start.bound if start else None
    hi = end.bound if end else None
    pages = usage.export(svc.db, actor, lo, hi)
    # The first page is read before the answer starts, so a database that does not answer is
    # still a 503 in the API's error shape, not a cut-off file.
    first: list[Any] = await anext(pages, [])

    async def body() -> AsyncIterator[str]:
        yield csv_text([usage.EXPORT_COLUMNS])
        if first:
            yield csv_text(export_cells(row) for row in first)
        async for rows in pages:
            yield csv_text(export_cells(row) for row in rows)

    name = f"usage-{_file_time(start, 'start')}-{_file_time(end, 'now')}.csv"
    return StreamingResponse(body(), media_type="text/csv; charset=utf-8", headers={
        "content-disposition": f'attachment; filename="{name}"',
        "cache-control": "no-store",
    })


routes = [
    Route("/v1/admin/usage", admin(usage_totals), methods=["GET"]),
    Route("/v1/admin/usage/events", admin(usage_events), methods=["GET"]),
    Route("/v1/admin/usage/export", admin(usage_export), methods=["GET"]),
]
