"""Admin API routes (``/v1/admin/...``): thin wrappers that parse, call the domain, render."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Connection
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.api.auth import authenticate_admin
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
from broker.api.views import binding_view, tenant_view, workload_view
from broker.identity import bindings
from broker.identity import identities as ids
from broker.identity.identities import Actor
from broker.revocation import actions
from broker.revocation.denylist import apply_here
from broker.revocation.log import Entry
from broker.services import Services
from broker.storage.audit import record

Handler = Callable[[Request, Services, Actor], Awaitable[Response]]


def admin(handler: Handler, *, write: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate the admin bearer before the handler; read-only roles may not write."""

    async def endpoint(request: Request) -> Response:
        svc = services_of(request)
        actor = authenticate_admin(svc, bearer_token(request))
        if write:
            actor.require_write()
        return await handler(request, svc, actor)

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


async def _body(request: Request, svc: Services) -> dict[str, Any]:
    return await json_object(request, svc.settings.server.admin_max_body_bytes)


# --- tenants -------------------------------------------------------------------------------


async def create_tenant(request: Request, svc: Services, actor: Actor) -> Response:
    body = validate(ids.TenantCreate, await _body(request, svc))
    now = int(time.time())

    def txn(conn: Connection) -> ids.TenantRecord:
        tenant = ids.create_tenant(conn, actor, body, now)
        record(conn, actor.id, "tenant.create", tenant.id, {"name": tenant.name}, now,
               tenant_id=tenant.id)
        return tenant

    return json_response(tenant_view(await svc.db.run(txn)), status=201)


async def list_tenants(request: Request, svc: Services, actor: Actor) -> Response:
    cursor, limit = id_page_params(request)
    data, nxt = await svc.db.read(lambda conn: ids.list_tenants(conn, actor, cursor, limit))
    return json_response({"data": [tenant_view(t) for t in data], "next_cursor": nxt})


async def get_tenant(request: Request, svc: Services, actor: Actor) -> Response:
    tid = path_id(request)
    return json_response(tenant_view(await svc.db.read(lambda conn: ids.get_tenant(conn, actor, tid))))


async def patch_tenant(request: Request, svc: Services, actor: Actor) -> Response:
    tid = path_id(request)
    body = validate(ids.TenantPatch, await _body(request, svc))
    now = int(time.time())

    def txn(conn: Connection) -> ids.TenantRecord:
        tenant = ids.patch_tenant(conn, actor, tid, body)
        record(conn, actor.id, "tenant.update", tid, body.model_dump(exclude_none=True), now,
               tenant_id=tid)
        return tenant

    return json_response(tenant_view(await svc.db.run(txn)))


async def delete_tenant(request: Request, svc: Services, actor: Actor) -> Response:
    tid = path_id(request)
    now = int(time.time())

    def txn(conn: Connection) -> None:
        ids.delete_tenant(conn, actor, tid)
        record(conn, actor.id, "tenant.delete", tid, {}, now, tenant_id=tid)

    await svc.db.run(txn)
    return Response(status_code=204)


# --- workloads -----------------------------------------------------------------------------


async def create_workload(request: Request, svc: Services, actor: Actor) -> Response:
    body = validate(ids.WorkloadCreate, await _body(request, svc))
    now = int(time.time())

    def txn(conn: Connection) -> ids.NewWorkload:
        created = ids.create_workload(conn, actor, body, svc.pepper, now, svc.binding_pinning)
        record(conn, actor.id, "workload.create", created.workload.id,
               {"kind": body.kind, "name": created.workload.name}, now,
               tenant_id=created.workload.tenant_id)
        return created

    created = await svc.db.run(txn)
    return json_response({**workload_view(created.workload), "client_secret": created.client_secret},
                         status=201, headers={"cache-control": "no-store"})


async def list_workloads(request: Request, svc: Services, actor: Actor) -> Response:
    cursor, limit = id_page_params(request)
    tenant_id = query_str(request, "tenant_id", 64)
    data, nxt = await svc.db.read(
        lambda conn: ids.list_workloads(conn, actor, tenant_id, cursor, limit)
    )
    return json_response({"data": [workload_view(w) for w in data], "next_cursor": nxt})


async def get_workload(request: Request, svc: Services, actor: Actor) -> Response:
    wid = path_id(request)
    return json_response(workload_view(await svc.db.read(lambda conn: ids.get_workload(conn, actor, wid))))


async def patch_workload(request: Request, svc: Services, actor: Actor) -> Response:
    wid = path_id(request)
    body = validate(ids.WorkloadPatch, await _body(request, svc))
    now = int(time.time())

    def txn(conn: Connection) -> tuple[ids.WorkloadRecord, Entry | None]:
        workload, changed = ids.patch_workload(conn, actor, wid, body, now, svc.binding_pinning)
        record(conn, actor.id, "workload.update", wid, body.model_dump(exclude_none=True), now,
               tenant_id=workload.tenant_id)
        entry = None
        if changed:
            # Tokens carry the identity they were minted for: a new one must not ride on them.
            entry = actions.cut_workload(conn, actor, wid, workload.tenant_id,
                                         "roles or policy changed", now)
        return workload, entry

    workload, entry = await svc.db.run(txn)
    apply_here(svc.token_gate, entry)
    if entry is not None and entry.cutoff is not None:
        # Tokens carry whole seconds and the cut-off kills those of its own second: answer
        # only once a token issued after this answer is sure to live. The cut-off was read
        # from the database's clock, so the second passes by that clock, not this replica's.
        await svc.db.wait_past_second(entry.cutoff)
    return json_response(workload_view(workload))


async def delete_workload(request: Request, svc: Services, actor: Actor) -> Response:
    wid = path_id(request)
    now = int(time.time())

    def txn(conn: Connection) -> Entry | None:
        # Deleting is suspending for good: the identity's live tokens die with it, on every
        # replica, and their unspent slices return.
        workload = ids.get_workload(conn, actor, wid)
        _view, entry = actions.suspend(conn, actor, "workload", wid, "workload deleted", now)
        ids.delete_workload(conn, actor, wid)
        record(conn, actor.id, "workload.delete", wid, {}, now, tenant_id=workload.tenant_id)
        return entry

    apply_here(svc.token_gate, await svc.db.run(txn))
    return Response(status_code=204)


async def list_bindings(request: Request, svc: Services, actor: Actor) -> Response:
    """Every binding in the caller's sight, of one tenant or issuer if asked: who may exchange
    which outside identity for which workload."""
    cursor, limit = id_page_params(request)
    tenant_id = query_str(request, "tenant_id", 64)
    issuer = query_str(request, "issuer", 64)
    data, nxt = await svc.db.read(lambda conn: bindings.list_page(
        conn, lambda column: actor.scope(column, tenant_id), issuer, cursor, limit))
    return json_response({"data": [binding_view(b) for b in data], "next_cursor": nxt})


routes = [
    ApiRoute("/v1/admin/tenants", admin(create_tenant, write=True), methods=["POST"],
             body=ids.TenantCreate),
    Route("/v1/admin/tenants", admin(list_tenants), methods=["GET"]),
    Route("/v1/admin/tenants/{id}", admin(get_tenant), methods=["GET"]),
    ApiRoute("/v1/admin/tenants/{id}", admin(patch_tenant, write=True), methods=["PATCH"],
             body=ids.TenantPatch),
    Route("/v1/admin/tenants/{id}", admin(delete_tenant, write=True), methods=["DELETE"]),
    ApiRoute("/v1/admin/workloads", admin(create_workload, write=True), methods=["POST"],
             body=ids.WorkloadCreate),
    Route("/v1/admin/workloads", admin(list_workloads), methods=["GET"]),
    Route("/v1/admin/workloads/{id}", admin(get_workload), methods=["GET"]),
    ApiRoute("/v1/admin/workloads/{id}", admin(patch_workload, write=True), methods=["PATCH"],
             body=ids.WorkloadPatch),
    Route("/v1/admin/workloads/{id}", admin(delete_workload, write=True), methods=["DELETE"]),
    Route("/v1/admin/bindings", admin(list_bindings), methods=["GET"]),
]
