"""Admin routes for revocation and rotation, and the extension that wires them in: the
in-memory denylist and its propagation thread."""

from __future__ import annotations

import functools
import time

import anyio
import anyio.to_thread
from pydantic import Field, StrictInt
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broker.api.admin import admin
from broker.api.http import json_object, json_response, path_id, query_int, query_str, validate
from broker.api.openapi import ApiRoute
from broker.identity.identities import Actor
from broker.revocation import revocation, rotation
from broker.revocation.revocation import Denylist, Entry, ReasonBody
from broker.services import Services
from broker.storage.propagation import Propagator

_NO_STORE = {"cache-control": "no-store"}


class RotateSecretBody(ReasonBody):
    """How long the old secret keeps working: ``auth.secret_grace_s`` when absent; 0 ends it
    at once (a leaked secret)."""

    grace_s: StrictInt | None = Field(default=None, ge=0, le=30 * 86_400)


async def _reason(request: Request, svc: Services) -> ReasonBody:
    """The optional ``{"reason": ...}`` body: an empty body is no reason."""
    body: ReasonBody = validate(
        ReasonBody, await json_object(request, svc.settings.server.admin_max_body_bytes, empty={})
    )
    return body


def _apply_here(svc: Services, entry: Entry | None) -> None:
    revocation.apply_here(svc.token_gate, entry)


# --- revocation ----------------------------------------------------------------------------


async def revoke_token(request: Request, svc: Services, actor: Actor) -> Response:
    """Revoke one token by its jti; its unspent budget returns."""
    jti = path_id(request, "jti")
    body = await _reason(request, svc)
    now = int(time.time())
    view, entry = await svc.db.run(
        lambda conn: revocation.revoke_token(conn, actor, jti, body.reason, now)
    )
    _apply_here(svc, entry)
    return json_response(view)


async def suspend_workload(request: Request, svc: Services, actor: Actor) -> Response:
    """Suspend a workload: its tokens die and its exchanges are refused until resumed."""
    wid = path_id(request)
    body = await _reason(request, svc)
    now = int(time.time())
    view, entry = await svc.db.run(
        lambda conn: revocation.suspend_workload(conn, actor, wid, body.reason, now)
    )
    _apply_here(svc, entry)
    return json_response(view)


async def _past_cutoff_second(svc: Services, actor: Actor, kind: str, ident: str) -> None:
    """Tokens carry whole seconds: one issued in the second of the cut-off counts as before
    it and stays dead. So a resume within that second waits for the next one, and every token
    issued after the resume answers is live."""
    cutoff = await svc.db.read(lambda conn: revocation.suspension_cutoff(conn, actor, kind, ident))
    if cutoff is not None and time.time() < cutoff + 1:
        await anyio.sleep(cutoff + 1 - time.time())


async def resume_workload(request: Request, svc: Services, actor: Actor) -> Response:
    """Resume a workload; tokens issued before its suspension stay dead."""
    wid = path_id(request)
    body = await _reason(request, svc)
    await _past_cutoff_second(svc, actor, "workload", wid)
    now = int(time.time())
    view, entry = await svc.db.run(
        lambda conn: revocation.resume_workload(conn, actor, wid, body.reason, now)
    )
    _apply_here(svc, entry)
    return json_response(view)


async def suspend_tenant(request: Request, svc: Services, actor: Actor) -> Response:
    """Suspend a tenant: every token of each of its workloads dies at once."""
    tid = path_id(request)
    body = await _reason(request, svc)
    now = int(time.time())
    view, entry = await svc.db.run(
        lambda conn: revocation.suspend_tenant(conn, actor, tid, body.reason, now)
    )
    _apply_here(svc, entry)
    return json_response(view)


async def resume_tenant(request: Request, svc: Services, actor: Actor) -> Response:
    """Resume a tenant; tokens issued before its suspension stay dead."""
    tid = path_id(request)
    body = await _reason(request, svc)
    await _past_cutoff_second(svc, actor, "tenant", tid)
    now = int(time.time())
    view, entry = await svc.db.run(
        lambda conn: revocation.resume_tenant(conn, actor, tid, body.reason, now)
    )
    _apply_here(svc, entry)
    return json_response(view)


async def list_revocations(request: Request, svc: Services, actor: Actor) -> Response:
    """Revocations, suspensions and resumes, newest first."""
    cursor = query_str(request, "cursor", 64)
    limit = query_int(request, "limit", 100, 1, 1000)
    tenant_id = query_str(request, "tenant_id", 64)
    kind = query_str(request, "kind", 16)
    data, nxt = await svc.db.read(
        lambda conn: revocation.list_entries(
            conn, actor, cursor=cursor, limit=limit, tenant_id=tenant_id, kind=kind
        )
    )
    return json_response({"data": data, "next_cursor": nxt})


# --- rotation ------------------------------------------------------------------------------


async def list_signing_keys(request: Request, svc: Services, actor: Actor) -> Response:
    """The signing keys' ids, states and times (never their material)."""
    return json_response({"data": rotation.signing_keys(svc.keyring), "next_cursor": None})


async def rotate_signing_key(request: Request, svc: Services, actor: Actor) -> Response:
    """Rotate the signing key now (org-admin)."""
    actor.require_org_admin()
    body = await _reason(request, svc)
    key = await anyio.to_thread.run_sync(
        functools.partial(rotation.rotate_signing_key, svc, actor.id, body.reason)
    )
    return json_response({"current_kid": key.kid, "keys": rotation.signing_keys(svc.keyring)})


async def rotate_workload_secret(request: Request, svc: Services, actor: Actor) -> Response:
    """Give a workload a new client secret, shown once; the old one works during the grace."""
    wid = path_id(request)
    body: RotateSecretBody = validate(RotateSecretBody, await json_object(
        request, svc.settings.server.admin_max_body_bytes, empty={}))
    now = int(time.time())
    grace = svc.settings.auth.secret_grace_s if body.grace_s is None else body.grace_s
    view = await svc.db.run(
        lambda conn: rotation.rotate_workload_secret(
            conn, actor, wid, svc.pepper, grace, body.reason, now
        )
    )
    return json_response(view, headers=_NO_STORE)


async def rotate_provider_key(request: Request, svc: Services, actor: Actor) -> Response:
    """Rotate a provider's key now (org-admin); without a key admin API, re-read it from Vault."""
    actor.require_org_admin()
    name = path_id(request, "name")
    body = await _reason(request, svc)
    result = await anyio.to_thread.run_sync(
        functools.partial(rotation.rotate_provider_key, svc, name, actor.id, body.reason)
    )
    return json_response(result)


_REASON_ROUTES = [
    ("/v1/admin/tokens/{jti}/revoke", revoke_token),
    ("/v1/admin/workloads/{id}/suspend", suspend_workload),
    ("/v1/admin/workloads/{id}/resume", resume_workload),
    ("/v1/admin/tenants/{id}/suspend", suspend_tenant),
    ("/v1/admin/tenants/{id}/resume", resume_tenant),
    ("/v1/admin/keys/signing/rotate", rotate_signing_key),
    ("/v1/admin/workloads/{id}/rotate-secret", rotate_workload_secret),
    ("/v1/admin/providers/{name}/rotate", rotate_provider_key),
]

routes: list[BaseRoute] = [
    *(ApiRoute(path, admin(handler, write=True), methods=["POST"],
               body=RotateSecretBody if handler is rotate_workload_secret else ReasonBody)
      for path, handler in _REASON_ROUTES),
    Route("/v1/admin/revocations", admin(list_revocations), methods=["GET"]),
    Route("/v1/admin/keys/signing", admin(list_signing_keys), methods=["GET"]),
]



# --- wiring --------------------------------------------------------------------------------

def revocation_extension(svc: Services) -> list[BaseRoute]:
    """Load the denylist, make it the token gate, and start its propagation."""
    denylist = Denylist()
    now = int(time.time())
    svc.db.transaction(lambda conn: revocation.load(conn, denylist, now))
    svc.token_gate = denylist

    propagator = Propagator(svc.db, denylist, svc.settings.revocation.catchup_interval_s)
    propagator.on("keys", lambda _message: svc.keyring.refresh())
    propagator.on(rotation.PROVIDER_MESSAGE_TYPE,
                  lambda message: rotation.reload_provider_key(svc, str(message["provider"])))
    propagator.every_interval(svc.keyring.refresh)  # rotations by `broker keys rotate`
    svc.propagator = propagator
    propagator.start()
    svc.closers.append(propagator.stop)
    return list(routes)
