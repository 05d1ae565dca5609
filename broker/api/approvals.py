"""Approval and grant routes: a workload asks with its own token (``/v1/approvals``); admins
decide and grant (``/v1/admin/approvals``, ``/v1/admin/grants``). Errors are problem+json."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broker.api.admin import admin
from broker.api.auth import verify_bearer
from broker.api.http import (
    bearer_token,
    json_object,
    json_response,
    path_id,
    query_str,
    services_of,
    validate,
)
from broker.api.openapi import ApiRoute
from broker.api.pagination import id_page_params
from broker.api.revocation import ReasonBody
from broker.api.views import iso, iso_or_none
from broker.approvals import grants, requests
from broker.approvals.grants import Ask, GrantBody, GrantRecord
from broker.approvals.requests import ApprovalRecord, Decision, Denial
from broker.errors import InvalidRequest
from broker.identity.identities import Actor
from broker.revocation.denylist import apply_here
from broker.services import Services


def grant_view(grant: GrantRecord, now: int) -> dict[str, Any]:
    return {
        "id": grant.id, "workload_id": grant.workload_id, "tenant_id": grant.tenant_id,
        "approval_id": grant.approval_id, "model": grant.model, "tool": grant.tool,
        "budget_micros": grant.budget_micros, "spent_micros": grant.spent_micros,
        "rpm": grant.rpm, "tpm": grant.tpm, "status": grant.status(now),
        "created_at": iso(grant.created_at), "expires_at": iso(grant.expires_at),
        "created_by": grant.created_by, "reason": grant.reason,
        "revoked_at": iso_or_none(grant.revoked_at), "revoked_by": grant.revoked_by,
    }


def approval_view(approval: ApprovalRecord, now: int) -> dict[str, Any]:
    return {
        "id": approval.id, "workload_id": approval.workload_id,
        "tenant_id": approval.tenant_id, "model": approval.model, "tool": approval.tool,
        "budget_micros": approval.budget_micros, "rpm": approval.rpm, "tpm": approval.tpm,
        "ttl_s": approval.ttl_s, "reason": approval.reason, "status": approval.status(now),
        "created_at": iso(approval.created_at),
        "pending_until": iso(approval.expires_at),
        "decided_at": iso_or_none(approval.decided_at), "decided_by": approval.decided_by,
        "decision_reason": approval.decision_reason, "grant_id": approval.grant_id,
        "grant_expires_at": iso(approval.grant.expires_at) if approval.grant else None,
    }


async def _admin_body(request: Request, svc: Services, *, empty: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    return await json_object(request, svc.settings.server.admin_max_body_bytes, empty=empty)


@dataclass(frozen=True)
class _ListQuery:
    """What a list of approvals or grants is asked for: a page, a status, an owner."""

    cursor: str | None
    limit: int
    status: str | None
    tenant_id: str | None
    workload_id: str | None


def _list_query(request: Request, statuses: tuple[str, ...]) -> _ListQuery:
    cursor, limit = id_page_params(request)
    status = query_str(request, "status", 16)
    if status is not None and status not in statuses:
        raise InvalidRequest(f"status must be one of {', '.join(statuses)}")
    return _ListQuery(cursor, limit, status, query_str(request, "tenant_id", 64),
                      query_str(request, "workload_id", 64))


# --- the workload asks ------------------------------------------------------------------------


async def ask_approval(request: Request) -> Response:
    """Ask for a model behind approval, or for burst capacity, for a while (the caller's own
    broker token says which workload asks)."""
    svc = services_of(request)
    token = verify_bearer(svc, bearer_token(request))
    body: Ask = validate(Ask, await _admin_body(request, svc))
    now = int(time.time())
    found = await svc.db.run(lambda conn: requests.ask(conn, svc.settings, token.sub, body, now))
    return json_response(approval_view(found, now), status=201)


async def get_own_approval(request: Request) -> Response:
    """A workload's own request and its status (any other request is 404)."""
    svc = services_of(request)
    token = verify_bearer(svc, bearer_token(request))
    approval_id = path_id(request)
    now = int(time.time())
    found = await svc.db.read(lambda conn: requests.get_own(conn, token.sub, approval_id))
    return json_response(approval_view(found, now))


# --- admins decide ----------------------------------------------------------------------------


async def list_approvals(request: Request, svc: Services, actor: Actor) -> Response:
    """Requests, by id; ``status=pending`` is the queue."""
    q = _list_query(request, requests.STATUSES)
    now = int(time.time())
    data, nxt = await svc.db.read(lambda conn: requests.list_approvals(
        conn, actor, status=q.status, tenant_id=q.tenant_id, workload_id=q.workload_id,
        cursor=q.cursor, limit=q.limit, now=now))
    return json_response({"data": [approval_view(a, now) for a in data], "next_cursor": nxt})


async def get_approval(request: Request, svc: Services, actor: Actor) -> Response:
    approval_id = path_id(request)
    now = int(time.time())
    found = await svc.db.read(lambda conn: requests.get(conn, actor, approval_id))
    return json_response(approval_view(found, now))


async def approve(request: Request, svc: Services, actor: Actor) -> Response:
    """Approve a pending request (lowering, never raising, what was asked): the grant is made
    and its budget reserved now."""
    approval_id = path_id(request)
    body: Decision = validate(Decision, await _admin_body(request, svc, empty={}))
    now = int(time.time())
    found = await svc.db.run(
        lambda conn: requests.approve(conn, svc.settings, actor, approval_id, body, now))
    return json_response(approval_view(found, now))


async def deny(request: Request, svc: Services, actor: Actor) -> Response:
    approval_id = path_id(request)
    body: Denial = validate(Denial, await _admin_body(request, svc, empty={}))
    now = int(time.time())
    found = await svc.db.run(lambda conn: requests.deny(conn, actor, approval_id, body, now))
    return json_response(approval_view(found, now))


async def create_grant(request: Request, svc: Services, actor: Actor) -> Response:
    """Grant without a request."""
    body: GrantBody = validate(GrantBody, await _admin_body(request, svc))
    now = int(time.time())
    ask = Ask(**body.model_dump(exclude={"workload_id"}))

    def txn(conn: Any) -> GrantRecord:
        workload = grants.target(conn, body.workload_id, actor)
        return grants.create(conn, svc.settings, actor, workload, ask, now)

    return json_response(grant_view(await svc.db.run(txn), now), status=201)


async def list_grants(request: Request, svc: Services, actor: Actor) -> Response:
    q = _list_query(request, grants.GRANT_STATUSES)
    now = int(time.time())
    data, nxt = await svc.db.read(lambda conn: grants.list_grants(
        conn, actor, tenant_id=q.tenant_id, workload_id=q.workload_id, status=q.status,
        cursor=q.cursor, limit=q.limit, now=now))
    return json_response({"data": [grant_view(g, now) for g in data], "next_cursor": nxt})


async def get_grant(request: Request, svc: Services, actor: Actor) -> Response:
    grant_id = path_id(request)
    now = int(time.time())
    return json_response(grant_view(await svc.db.read(lambda conn: grants.get(conn, actor, grant_id)), now))


async def revoke_grant(request: Request, svc: Services, actor: Actor) -> Response:
    """End a grant now: tokens carrying it are refused on every replica within a second."""
    grant_id = path_id(request)
    body: ReasonBody = validate(ReasonBody, await _admin_body(request, svc, empty={}))
    now = int(time.time())
    grant, entry = await svc.db.run(lambda conn: grants.revoke(conn, actor, grant_id, body.reason, now))
    apply_here(svc.token_gate, entry)
    return json_response(grant_view(grant, now))


routes: list[BaseRoute] = [
    ApiRoute("/v1/approvals", ask_approval, methods=["POST"], body=Ask),
    Route("/v1/approvals/{id}", get_own_approval, methods=["GET"]),
    Route("/v1/admin/approvals", admin(list_approvals), methods=["GET"]),
    Route("/v1/admin/approvals/{id}", admin(get_approval), methods=["GET"]),
    ApiRoute("/v1/admin/approvals/{id}/approve", admin(approve, write=True), methods=["POST"],
             body=Decision),
    ApiRoute("/v1/admin/approvals/{id}/deny", admin(deny, write=True), methods=["POST"],
             body=Denial),
    ApiRoute("/v1/admin/grants", admin(create_grant, write=True), methods=["POST"],
             body=GrantBody),
    Route("/v1/admin/grants", admin(list_grants), methods=["GET"]),
    Route("/v1/admin/grants/{id}", admin(get_grant), methods=["GET"]),
    ApiRoute("/v1/admin/grants/{id}/revoke", admin(revoke_grant, write=True), methods=["POST"],
             body=ReasonBody),
]
