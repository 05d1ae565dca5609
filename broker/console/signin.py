"""Signing in and out of the console.

An admin proves who it is as it would to the API: with its client credentials, checked by the
very function ``/v1/token`` checks them with and under the same lockout (``svc.failures``,
per client id and address: failures here and there count together); or with an admin token it
already holds, verified as the API verifies a bearer (signature, expiry, revocation, role). A
wrong secret or token never says which part was wrong, and nothing typed is ever put back into
the page.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import Connection
from starlette.requests import Request
from starlette.responses import Response

from broker.api.auth import authenticate_admin, verify_bearer
from broker.api.http import client_address, services_of
from broker.console import csrf, sessions
from broker.console.context import NOTICES
from broker.console.render import PREFIX, error_page, form, html, redirect
from broker.errors import BrokerError, Forbidden, InvalidClient, InvalidToken
from broker.identity.identities import Actor, Client
from broker.services import Services
from broker.storage.db import db_now
from broker.tokens import issuance

# The lockout key of pasted tokens (per address): no client id holds a colon.
TOKEN_CLIENT = "console:token"
_FAILED = "Sign-in failed: the client id and secret do not match an active identity."
_BAD_TOKEN = "Sign-in failed: the token is not a valid, live admin token."
_NOT_ADMIN = "Sign-in refused: this identity holds no admin role."
_BAD_FORM = ("The sign-in form expired or did not come from this console. Nothing was sent; "
             "reload the page and try again.")


def _pre_id(request: Request) -> tuple[str, bool]:
    """The pre-session id (its cookie's value), and whether it is new."""
    current = sessions.cookie_value(request, pre=True)
    if current is not None:
        return current, False
    return secrets.token_urlsafe(32), True


async def sign_in_page(request: Request) -> Response:
    svc = services_of(request)
    sid = sessions.cookie_value(request)
    if sid is not None and await sessions.load(svc, sid) is not None:
        return redirect(f"{PREFIX}/")
    return await _form_page(request, svc)


async def _form_page(request: Request, svc: Services, error: str | None = None,
                     status: int = 200, headers: dict[str, str] | None = None) -> Response:
    pre, new = _pre_id(request)
    notice = NOTICES.get(request.query_params.get("notice", ""))
    context: dict[str, Any] = {
        "actor": None, "csrf": csrf.pre_session_token(svc.pepper, pre), "nav": "",
        "title": "Sign in", "notice": notice, "error": error,
    }
    response = html("sign_in.html", context, status=status, headers=headers)
    if new:
        sessions.set_cookie(response, request, pre, sessions.PRE_TTL_S, pre=True)
    return response


async def sign_in(request: Request) -> Response:
    svc = services_of(request)
    try:
        pre = sessions.cookie_value(request, pre=True)
        if not csrf.same_origin(request) or pre is None:
            raise Forbidden(_BAD_FORM)
        fields = await form(request, svc.settings.server.admin_max_body_bytes)
        if not csrf.token_matches(csrf.pre_session_token(svc.pepper, pre), fields.get(csrf.FIELD)):
            raise Forbidden(_BAD_FORM)
        if "token" in fields:
            proof = await _by_token(svc, fields["token"].strip(), client_address(request))
        else:
            proof = await _by_secret(svc, fields.get("client_id", "").strip(),
                                     fields.get("client_secret", ""), client_address(request))
    except _Refused as refused:
        return await _form_page(request, svc, refused.message, refused.status)
    except BrokerError as exc:
        if exc.code == "slow_down":
            wait = exc.headers.get("retry-after", "")
            message = ("Too many failed sign-ins for this client from your address. "
                       f"Try again in {wait} seconds." if wait else
                       "Too many failed sign-ins for this client from your address.")
            return await _form_page(request, svc, message, 429, headers=exc.headers)
        return error_page(exc)
    now = int(time.time())
    session_id, max_age = await sessions.create(svc, proof, now)
    response = redirect(f"{PREFIX}/")
    sessions.set_cookie(response, request, session_id, max_age)
    sessions.clear_cookie(response, request, pre=True)
    return response


class _Refused(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _admin_actor(client: Client) -> Actor | None:
    roles = frozenset(client.roles) & sessions.ADMIN_ROLES
    if client.kind != "admin" or not roles:
        return None
    return Actor(id=client.id, tenant_id=client.tenant_id, roles=roles)


async def _by_secret(svc: Services, client_id: str, secret: str, source: str) -> sessions.Proof:
    if not (0 < len(client_id) <= 128 and len(secret) <= 512) or not (
            client_id.isprintable() and secret.isprintable()):
        raise _Refused(_FAILED, 401)
    # The lockout of /v1/token, by the same key: a guesser gains nothing by switching doors.
    await svc.failures.ensure_allowed(client_id, source)
    now = int(time.time())

    def check(conn: Connection) -> tuple[Client | None, str | None, int]:
        client, known = issuance.check_client(svc, conn, client_id, secret, now)
        return client, known, db_now(conn, now)

    client, known, proven_at = await svc.db.read(check)
    if client is None:
        await svc.failures.record_failure(client_id, source)
        if svc.monitor is not None and known is not None:
            # As /v1/token reports it: anyone knowing a client id can cause this, so it only
            # counts toward an alert, never a suspension.
            svc.monitor.refusal(known, "bad_secret", authenticated=False, client_ip=source)
        raise _Refused(_FAILED, 401)
    actor = _admin_actor(client)
    if actor is None:
        raise _Refused(_NOT_ADMIN, 403)
    return sessions.Proof(actor=actor, method="secret", proven_at=proven_at)


async def _by_token(svc: Services, token: str, source: str) -> sessions.Proof:
    await svc.failures.ensure_allowed(TOKEN_CLIENT, source)
    try:
        if not token or len(token) > 8192 or not token.isascii():
            raise InvalidToken()
        verified = verify_bearer(svc, token)
        actor = authenticate_admin(svc, token)
    except InvalidToken:
        await svc.failures.record_failure(TOKEN_CLIENT, source)
        raise _Refused(_BAD_TOKEN, 401) from None
    except (Forbidden, InvalidClient):
        raise _Refused(_NOT_ADMIN, 403) from None
    return sessions.Proof(actor=actor, method="token", proven_at=verified.iat,
                          token_jti=verified.jti, token_exp=verified.exp)


async def sign_out(request: Request) -> Response:
    """Ends the session (its row is deleted). The form's token is checked as any other's, so a
    foreign page cannot sign a user out either."""
    svc = services_of(request)
    sid = sessions.cookie_value(request)
    if sid is not None:
        session = await sessions.load(svc, sid)
        if session is not None:
            try:
                fields = await form(request, svc.settings.server.admin_max_body_bytes)
            except BrokerError as exc:
                return error_page(exc)
            if not csrf.same_origin(request) or not csrf.token_matches(
                    session.csrf, fields.get(csrf.FIELD)):
                return error_page(Forbidden(_BAD_FORM.replace("sign-in", "sign-out")))
            await sessions.end(svc, sid)
    response = redirect(f"{PREFIX}/sign-in?notice=signed-out")
    sessions.clear_cookie(response, request)
    return response
