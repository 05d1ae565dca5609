"""Provider routes: ``GET /v1/admin/providers`` (org-wide roles: org-admin and auditor) and
``POST /v1/admin/providers/{name}/rotate`` (org-admin)."""

from __future__ import annotations

import functools
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broker.api.admin import admin
from broker.api.http import json_object, json_response, path_id, validate
from broker.api.openapi import ApiRoute
from broker.api.revocation import ReasonBody
from broker.api.views import iso_or_none
from broker.credentials import rotating, status
from broker.errors import Forbidden
from broker.identity.identities import Actor
from broker.services import Services


def rotation_view(done: rotating.Rotation) -> dict[str, Any]:
    if done.mode == "reloaded":
        return {"provider": done.provider, "mode": done.mode, "version": done.version}
    return {"provider": done.provider, "mode": done.mode, "key_id": done.key_id,
            "version": done.version, "previous_key_id": done.previous_key_id,
            "previous_key_revoke_at": iso_or_none(done.previous_key_revoke_at)}


async def list_providers(request: Request, svc: Services, actor: Actor) -> Response:
    """Each provider's credential and health; never key material."""
    if not actor.org_wide:
        raise Forbidden("only an org-admin or an auditor may list the providers")
    views = await anyio.to_thread.run_sync(functools.partial(status.provider_views, svc))
    return json_response({"data": views})


async def rotate_provider_key(request: Request, svc: Services, actor: Actor) -> Response:
    """Rotate a provider's key now (org-admin); without a key admin API, re-read it from
    Vault."""
    actor.require_org_admin()
    name = path_id(request, "name")
    body: ReasonBody = validate(ReasonBody, await json_object(
        request, svc.settings.server.admin_max_body_bytes, empty={}))
    result = await anyio.to_thread.run_sync(
        functools.partial(rotating.rotate, svc, name, actor.id, body.reason))
    return json_response(rotation_view(result))


routes: list[BaseRoute] = [
    Route("/v1/admin/providers", admin(list_providers), methods=["GET"]),
    ApiRoute("/v1/admin/providers/{name}/rotate", admin(rotate_provider_key, write=True),
             methods=["POST"], body=ReasonBody),
]
