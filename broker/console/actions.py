"""The console's buttons (POST). Each calls the very domain functions the admin API's handler for
the same action calls, with the signed-in user's :class:`Actor` and the same request schema, in
the same order (the change and its audit entry in one transaction, then the revocation applied
here at once): a role or tenant rule that holds in the API holds here, and the audit chain
cannot tell a console action from an API call except by what the user typed as a reason.

:func:`broker.console.context.action` has already checked the session, the origin, the CSRF
token and that the role may write."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, select
from starlette.responses import Response

from broker.api.http import path_id, validate
from broker.api.revocation import ReasonBody, RotateSecretBody
from broker.approvals import requests as approval_store
from broker.approvals.requests import Decision, Denial
from broker.console.context import Ctx
from broker.console.render import PREFIX, html, redirect
from broker.errors import ValidationFailed
from broker.monitoring import alerts as alert_store
from broker.revocation import actions, rotation
from broker.revocation.actions import IdentityKind
from broker.revocation.denylist import apply_here
from broker.storage.models import TokenSlice

_slice = TokenSlice.__table__  # type: ignore[attr-defined]


# --- form values --------------------------------------------------------------------------


def _fields(form: dict[str, str], names: tuple[str, ...], ints: tuple[str, ...] = ()
            ) -> dict[str, Any]:
    """The named fields the user filled in, as the API's JSON body would carry them: an empty
    field is absent, a number is an integer (the schemas are strict)."""
    out: dict[str, Any] = {}
    for name in names:
        raw = form.get(name, "").strip()
        if not raw:
            continue
        if name in ints:
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
                raise ValidationFailed(f"{name}: must be a whole number")
            out[name] = int(raw)
        else:
            out[name] = raw
    return out


def _reason(form: dict[str, str]) -> str | None:
    body: ReasonBody = validate(ReasonBody, _fields(form, ("reason",)))
    return body.reason


# --- suspend, resume, revoke ----------------------------------------------------------------


async def _suspend(ctx: Ctx, form: dict[str, str], kind: IdentityKind) -> Response:
    ident = path_id(ctx.request)
    reason = _reason(form)
    now = int(time.time())
    _view, entry = await ctx.svc.db.run(
        lambda conn: actions.suspend(conn, ctx.actor, kind, ident, reason, now))
    apply_here(ctx.svc.token_gate, entry)
    return redirect(f"{PREFIX}/{kind}s/{ident}?notice=suspended")


async def _resume(ctx: Ctx, form: dict[str, str], kind: IdentityKind) -> Response:
    ident = path_id(ctx.request)
    reason = _reason(form)
    # As the API's resume: a token issued in the cut-off's second counts as before it, so the
    # resume waits for the database clock's next second; every token issued after it lives.
    cutoff = await ctx.svc.db.read(
        lambda conn: actions.suspension_cutoff(conn, ctx.actor, kind, ident))
    if cutoff is not None:
        await ctx.svc.db.wait_past_second(cutoff)
    now = int(time.time())
    _view, entry = await ctx.svc.db.run(
        lambda conn: actions.resume(conn, ctx.actor, kind, ident, reason, now))
    apply_here(ctx.svc.token_gate, entry)
    return redirect(f"{PREFIX}/{kind}s/{ident}?notice=resumed")


async def suspend_workload(ctx: Ctx, form: dict[str, str]) -> Response:
    return await _suspend(ctx, form, "workload")


async def resume_workload(ctx: Ctx, form: dict[str, str]) -> Response:
    return await _resume(ctx, form, "workload")


async def suspend_tenant(ctx: Ctx, form: dict[str, str]) -> Response:
    return await _suspend(ctx, form, "tenant")


async def resume_tenant(ctx: Ctx, form: dict[str, str]) -> Response:
    return await _resume(ctx, form, "tenant")


async def revoke_token(ctx: Ctx, form: dict[str, str]) -> Response:
    jti = path_id(ctx.request, "jti")
    reason = _reason(form)
    now = int(time.time())

    def txn(conn: Connection) -> tuple[actions.TokenRevocation, str]:
        done = actions.revoke_token(conn, ctx.actor, jti, reason, now)
        # Where to go back to: the token's workload (the domain call above found it visible).
        owner = conn.execute(select(_slice.c.workload_id).where(_slice.c.jti == jti)).scalar_one()
        return done, str(owner)

    done, workload_id = await ctx.svc.db.run(txn)
    apply_here(ctx.svc.token_gate, done.entry)
    return redirect(f"{PREFIX}/workloads/{workload_id}?notice=revoked")


# --- rotate a secret --------------------------------------------------------------------------


async def rotate_secret(ctx: Ctx, form: dict[str, str]) -> Response:
    """The new secret is shown once, in this response (never in an address, never stored):
    a reload does not show it again, it re-asks for the form."""
    wid = path_id(ctx.request)
    body: RotateSecretBody = validate(
        RotateSecretBody, _fields(form, ("reason", "grace_s"), ints=("grace_s",)))
    grace = ctx.svc.settings.auth.secret_grace_s if body.grace_s is None else body.grace_s
    now = int(time.time())
    done = await ctx.svc.db.run(lambda conn: rotation.rotate_workload_secret(
        conn, ctx.actor, wid, ctx.svc.pepper, grace, body.reason, now))
    context = {**ctx.base("New client secret"), "workload": done.workload,
               "client_secret": done.client_secret,
               "previous_expires_at": done.previous_expires_at if grace > 0 else None}
    return html("secret.html", context)


# --- approvals and alerts -------------------------------------------------------------------


async def approve(ctx: Ctx, form: dict[str, str]) -> Response:
    approval_id = path_id(ctx.request)
    body: Decision = validate(Decision, _fields(
        form, ("reason", "ttl_s", "budget_micros"), ints=("ttl_s", "budget_micros")))
    now = int(time.time())
    await ctx.svc.db.run(lambda conn: approval_store.approve(
        conn, ctx.svc.settings, ctx.actor, approval_id, body, now))
    return redirect(f"{PREFIX}/approvals?notice=approved")


async def deny(ctx: Ctx, form: dict[str, str]) -> Response:
    approval_id = path_id(ctx.request)
    body: Denial = validate(Denial, _fields(form, ("reason",)))
    now = int(time.time())
    await ctx.svc.db.run(lambda conn: approval_store.deny(conn, ctx.actor, approval_id, body, now))
    return redirect(f"{PREFIX}/approvals?notice=denied")


async def clear_alert(ctx: Ctx, form: dict[str, str]) -> Response:
    alert_id = path_id(ctx.request)
    reason = _reason(form)
    now = int(time.time())
    cleared = await ctx.svc.db.run(
        lambda conn: alert_store.clear(conn, ctx.actor, alert_id, now, reason))
    if ctx.svc.gateway is not None:
        ctx.svc.gateway.forget_policy(cleared.workload_id)
    return redirect(f"{PREFIX}/alerts?notice=cleared")
