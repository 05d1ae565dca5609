"""Audit routes (``/v1/admin/audit...``): the chain's entries, its signed checkpoints, the
audit keys that sign them, and the chain's status. Read-only, so every admin role may call
them; a tenant-admin reads only its own tenant's entries (and so cannot walk the chain)."""

from __future__ import annotations

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.api.admin import admin
from broker.api.http import json_response, query_str
from broker.api.pagination import decode_number_cursor, page_limit
from broker.audit import checkpoints
from broker.audit.verify import chain_status
from broker.errors import Forbidden, InvalidRequest
from broker.identity.identities import Actor
from broker.services import Services
from broker.storage import audit

_CURSOR_PREFIX = "seq_"


def _cursor(request: Request) -> int | None:
    raw = query_str(request, "cursor", 64)
    return None if raw is None else decode_number_cursor(raw, _CURSOR_PREFIX)


def _next(seq: int | None) -> str | None:
    return None if seq is None else f"{_CURSOR_PREFIX}{seq}"


async def list_audit(request: Request, svc: Services, actor: Actor) -> Response:
    """Entries newest first (``order=asc``: in chain order, as a verifier reads them)."""
    tenant_id = query_str(request, "tenant_id", 64)
    action = query_str(request, "action", 64)
    order = query_str(request, "order", 8) or "desc"
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be asc or desc")
    if not actor.org_wide:
        if tenant_id is not None and tenant_id != actor.tenant_id:
            return json_response({"data": [], "next_cursor": None})  # another's: nothing
        tenant_id = actor.tenant_id
    cursor, limit = _cursor(request), page_limit(request)
    ascending = order == "asc"
    data, nxt = await svc.db.read(lambda conn: audit.page(
        conn, tenant_id=tenant_id, action=action, limit=limit,
        before=None if ascending else cursor, after=(cursor or 0) if ascending else None))
    return json_response({"data": data, "next_cursor": _next(nxt)})


async def list_checkpoints(request: Request, svc: Services, actor: Actor) -> Response:
    """Signed checkpoints in chain order."""
    after, limit = _cursor(request) or 0, page_limit(request)
    rows = await svc.db.read(lambda conn: checkpoints.stored(conn, after, limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"data": rows, "next_cursor": _next(rows[-1]["seq"] if more else None)})


async def audit_keys(request: Request, svc: Services, actor: Actor) -> Response:
    """The audit keys' JWKS: what verifies a checkpoint's signature."""
    return json_response(await anyio.to_thread.run_sync(svc.audit_keys.jwks))


async def audit_status(request: Request, svc: Services, actor: Actor) -> Response:
    """The whole chain verified now, as ``broker audit verify`` would: org-wide roles only,
    since it speaks of every tenant's entries."""
    if not actor.org_wide:
        raise Forbidden("only an org-admin or auditor may verify the whole chain")
    report = await chain_status(svc)
    return json_response({"ok": report.ok, "entries": report.entries,
                          "checkpoints": report.checkpoints, "head_seq": report.head_seq,
                          "problem": report.problem, "seq": report.seq, "kind": report.kind})


routes = [
    Route("/v1/admin/audit", admin(list_audit), methods=["GET"]),
    Route("/v1/admin/audit/checkpoints", admin(list_checkpoints), methods=["GET"]),
    Route("/v1/admin/audit/keys", admin(audit_keys), methods=["GET"]),
    Route("/v1/admin/audit/status", admin(audit_status), methods=["GET"]),
]
