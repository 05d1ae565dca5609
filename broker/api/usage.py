"""Usage reporting routes (``/v1/admin/usage...``): parse the query, call :mod:`broker.money.usage`,
render. Read-only, so every admin role may call them; what each one sees is the domain's rule."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.api.admin import admin
from broker.api.http import json_response, query_int, query_str
from broker.identity.identities import Actor
from broker.money import usage
from broker.services import Services


async def usage_totals(request: Request, svc: Services, actor: Actor) -> Response:
    """Requests, tokens and cost per workload, tenant or model over a time range."""
    group_by = usage.parse_group_by(query_str(request, "group_by", 16))
    start = usage.parse_instant("from", query_str(request, "from", 64))
    end = usage.parse_instant("to", query_str(request, "to", 64))
    usage.check_range(start, end)
    data = await svc.db.read(lambda conn: usage.totals(conn, actor, group_by, start, end))
    return json_response({
        "data": data,
        "next_cursor": None,
        "group_by": group_by,
        "from": start.rfc3339() if start else None,
        "to": end.rfc3339() if end else None,
    })


async def usage_events(request: Request, svc: Services, actor: Actor) -> Response:
    """Usage events, newest first, one cursor-paginated page at a time."""
    workload_id = query_str(request, "workload_id", 64)
    tenant_id = query_str(request, "tenant_id", 64)
    cursor = query_str(request, "cursor", 256)
    limit = query_int(request, "limit", 100, 1, 1000)
    if cursor is not None:
        usage.decode_cursor(cursor)  # a bad cursor is refused before any database work
    data, nxt = await svc.db.read(
        lambda conn: usage.list_events(
            conn, actor, workload_id=workload_id, tenant_id=tenant_id, cursor=cursor, limit=limit
        )
    )
    return json_response({"data": data, "next_cursor": nxt})


routes = [
    Route("/v1/admin/usage", admin(usage_totals), methods=["GET"]),
    Route("/v1/admin/usage/events", admin(usage_events), methods=["GET"]),
]
