"""Admin routes for revocation and rotation, their bodies and JSON views, and the extension that
wires them in: the in-memory denylist and the event bus that keeps it (and the keys) in step
with the other replicas."""

from __future__ import annotations

import functools
import time
from typing import Any

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broker.api.admin import admin
from broker.api.http import json_object, json_response, path_id, query_str, validate
from broker.api.openapi import ApiRoute
from broker.api.pagination import decode_number_cursor, page_limit
from broker.api.views import identity_view, iso, iso_or_none, workload_view
from broker.credentials import rotating
from broker.credentials.assertions import ASSERTION_KEYS_MESSAGE_TYPE
from broker.identity.identities import Actor
from broker.revocation import actions, rotation, sync
from broker.revocation import log as revocation_log
from broker.revocation.actions import IdentityKind, TokenRevocation
from broker.revocation.denylist import Denylist, apply_here
from broker.revocation.log import Entry
from broker.revocation.rotation import NewSecret
from broker.services import Services
from broker.storage.bus import EventBus, Message
from broker.tokens.keys import Keyring

_NO_STORE = {"cache-control": "no-store"}
_ENTRY_PREFIX = "rv_"
_KEY_STATE_ORDER = {"next": 0, "current": 1, "previous": 2}


# --- bodies --------------------------------------------------------------------------------


class ReasonBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    reason: str | None = Field(default=None, min_length=1, max_length=512)

    @field_validator("reason")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and not value.isprintable():
            raise ValueError("reason must be printable text")
        return value


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


# --- views ---------------------------------------------------------------------------------


def entry_view(entry: Entry) -> dict[str, Any]:
    return {
        "id": f"{_ENTRY_PREFIX}{entry.id}",
        "kind": entry.kind,
        "action": entry.action,
        "target": entry.target,
        "tenant_id": entry.tenant_id,
        "cutoff": iso_or_none(entry.cutoff),
        "expires_at": iso_or_none(entry.expires_at),
        "created_at": iso(entry.created_at),
        "actor": entry.actor,
        "reason": entry.reason,
    }


def token_revocation_view(done: TokenRevocation) -> dict[str, Any]:
    """The revocation made, or for a token already revoked the one before (while the log keeps
    it): a repeated revocation answers the same."""
    shown = done.entry or done.previous
    view = entry_view(shown) if shown is not None else {
        "kind": "token", "action": "revoke", "target": done.jti, "tenant_id": done.tenant_id}
    return {**view, "returned_micros": done.returned_micros}


def signing_key_views(keyring: Keyring) -> list[dict[str, Any]]:
    """Each key's id, state and times: never its material."""
    keys = sorted(keyring.keys.values(),
                  key=lambda k: (_KEY_STATE_ORDER.get(k.state, 3), -k.created_at))
    return [
        {"kid": k.kid, "state": k.state, "alg": k.alg, "created_at": iso(k.created_at),
         "retire_at": iso_or_none(k.retire_at)}
        for k in keys
    ]


def new_secret_view(done: NewSecret) -> dict[str, Any]:
    return {**workload_view(done.workload), "client_secret": done.client_secret,
            "previous_secret_expires_at": iso(done.previous_expires_at)}


def _apply_here(svc: Services, entry: Entry | None) -> None:
    apply_here(svc.token_gate, entry)


# --- revocation ----------------------------------------------------------------------------


async def revoke_token(request: Request, svc: Services, actor: Actor) -> Response:
    """Revoke one token by its jti; its unspent budget returns."""
    jti = path_id(request, "jti")
    body = await _reason(request, svc)
    now = int(time.time())
    done = await svc.db.run(
        lambda conn: actions.revoke_token(conn, actor, jti, body.reason, now)
    )
    _apply_here(svc, done.entry)
    return json_response(token_revocation_view(done))


async def _suspend(request: Request, svc: Services, actor: Actor, kind: IdentityKind) -> Response:
    ident = path_id(request)
    body = await _reason(request, svc)
    now = int(time.time())
    view, entry = await svc.db.run(
        lambda conn: actions.suspend(conn, actor, kind, ident, body.reason, now)
    )
    _apply_here(svc, entry)
    return json_response(identity_view(view))


async def _resume(request: Request, svc: Services, actor: Actor, kind: IdentityKind) -> Response:
    ident = path_id(request)
    body = await _reason(request, svc)
    await _past_cutoff_second(svc, actor, kind, ident)
    now = int(time.time())
    view, entry = await svc.db.run(
        lambda conn: actions.resume(conn, actor, kind, ident, body.reason, now)
    )
    _apply_here(svc, entry)
    return json_response(identity_view(view))


async def _past_cutoff_second(svc: Services, actor: Actor, kind: IdentityKind, ident: str) -> None:
    """Tokens carry whole seconds: one issued in the second of the cut-off counts as before
    it and stays dead. So a resume within that second waits for the next one, and every token
    issued after the resume answers is live. The second is the database's, which dated both
    the cut-off and the tokens: this replica's clock may be seconds off it."""
    cutoff = await svc.db.read(lambda conn: actions.suspension_cutoff(conn, actor, kind, ident))
    if cutoff is not None:
        await svc.db.wait_past_second(cutoff)


async def suspend_workload(request: Request, svc: Services, actor: Actor) -> Response:
    """Suspend a workload: its tokens die and its exchanges are refused until resumed."""
    return await _suspend(request, svc, actor, "workload")


async def resume_workload(request: Request, svc: Services, actor: Actor) -> Response:
    """Resume a workload; tokens issued before its suspension stay dead."""
    return await _resume(request, svc, actor, "workload")


async def suspend_tenant(request: Request, svc: Services, actor: Actor) -> Response:
    """Suspend a tenant: every token of each of its workloads dies at once."""
    return await _suspend(request, svc, actor, "tenant")


async def resume_tenant(request: Request, svc: Services, actor: Actor) -> Response:
    """Resume a tenant; tokens issued before its suspension stay dead."""
    return await _resume(request, svc, actor, "tenant")


async def list_revocations(request: Request, svc: Services, actor: Actor) -> Response:
    """Revocations, suspensions and resumes, newest first."""
    cursor = query_str(request, "cursor", 64)
    limit = page_limit(request)
    tenant_id = query_str(request, "tenant_id", 64)
    kind = query_str(request, "kind", 16)
    before = None if cursor is None else decode_number_cursor(cursor, _ENTRY_PREFIX)
    entries, more = await svc.db.read(
        lambda conn: revocation_log.list_entries(
            conn, actor, before=before, limit=limit, tenant_id=tenant_id, kind=kind
        )
    )
    data = [entry_view(e) for e in entries]
    return json_response({"data": data, "next_cursor": data[-1]["id"] if more else None})


# --- rotation ------------------------------------------------------------------------------


async def list_signing_keys(request: Request, svc: Services, actor: Actor) -> Response:
    """The signing keys' ids, states and times (never their material)."""
    return json_response({"data": signing_key_views(svc.keyring), "next_cursor": None})


async def rotate_signing_key(request: Request, svc: Services, actor: Actor) -> Response:
    """Rotate the signing key now (org-admin)."""
    actor.require_org_admin()
    body = await _reason(request, svc)
    key = await anyio.to_thread.run_sync(
        functools.partial(rotation.rotate_signing_key, svc, actor.id, body.reason)
    )
    return json_response({"current_kid": key.kid, "keys": signing_key_views(svc.keyring)})


async def rotate_workload_secret(request: Request, svc: Services, actor: Actor) -> Response:
    """Give a workload a new client secret, shown once; the old one works during the grace."""
    wid = path_id(request)
    body: RotateSecretBody = validate(RotateSecretBody, await json_object(
        request, svc.settings.server.admin_max_body_bytes, empty={}))
    now = int(time.time())
    grace = svc.settings.auth.secret_grace_s if body.grace_s is None else body.grace_s
    done = await svc.db.run(
        lambda conn: rotation.rotate_workload_secret(
            conn, actor, wid, svc.pepper, grace, body.reason, now
        )
    )
    return json_response(new_secret_view(done), headers=_NO_STORE)


_REASON_ROUTES = [
    ("/v1/admin/tokens/{jti}/revoke", revoke_token),
    ("/v1/admin/workloads/{id}/suspend", suspend_workload),
    ("/v1/admin/workloads/{id}/resume", resume_workload),
    ("/v1/admin/tenants/{id}/suspend", suspend_tenant),
    ("/v1/admin/tenants/{id}/resume", resume_tenant),
    ("/v1/admin/keys/signing/rotate", rotate_signing_key),
    ("/v1/admin/workloads/{id}/rotate-secret", rotate_workload_secret),
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
    """Load the denylist, make it the token gate, and start the event bus that keeps it, the
    keyring and the provider keys in step with the other replicas."""
    denylist = Denylist()
    now = int(time.time())
    svc.db.transaction(lambda conn: sync.load(conn, denylist, now))
    svc.token_gate = denylist

    bus = EventBus(svc.db, svc.settings.revocation.catchup_interval_s)
    sync.follow(bus, svc.db, denylist)
    bus.on(rotation.KEYS_MESSAGE_TYPE, lambda _message: svc.keyring.refresh())
    bus.on(ASSERTION_KEYS_MESSAGE_TYPE, lambda _message: svc.assertion_keys.refresh())
    bus.on(rotating.PROVIDER_MESSAGE_TYPE, functools.partial(_reload_provider_key, svc))
    bus.every_interval(svc.keyring.refresh)  # rotations by `broker keys rotate`
    svc.bus = bus
    bus.start()
    svc.closers.append(bus.stop)
    return list(routes)


def _reload_provider_key(svc: Services, message: Message) -> None:
    rotating.reload_provider_key(svc, message.get_str("provider"))
