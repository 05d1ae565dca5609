"""What every console page and action shares: the signed-in session, the checks a POST must pass
before anything changes, and the context every template gets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from broker.api.http import services_of
from broker.console import csrf, sessions
from broker.console.render import PREFIX, error_page, form, redirect
from broker.errors import BrokerError, Forbidden
from broker.identity.identities import Actor
from broker.services import Services

# Outcomes a redirect names in its query (``?notice=suspended``): fixed texts only, so nothing
# from the address is ever shown on the page.
NOTICES = {
    "suspended": "Suspended: its live tokens are revoked and it cannot get new ones.",
    "resumed": "Resumed: it may get tokens again (tokens from before stay revoked).",
    "revoked": "The token is revoked; its unspent budget was returned.",
    "approved": "Approved: the grant is live and its budget reserved.",
    "denied": "The request was denied.",
    "cleared": "The alert is cleared.",
    "signed-out": "You are signed out.",
    "ended": "Your session has ended. Sign in again.",
}


@dataclass(frozen=True)
class Ctx:
    """One request of a signed-in user."""

    request: Request
    svc: Services
    session: sessions.Session
    nav: str

    @property
    def actor(self) -> Actor:
        return self.session.actor

    def base(self, title: str) -> dict[str, Any]:
        """What every template of a signed-in page needs (``base.html``)."""
        notice = NOTICES.get(self.request.query_params.get("notice", ""))
        return {"actor": self.actor, "roles": ", ".join(sorted(self.actor.roles)),
                "csrf": self.session.csrf, "nav": self.nav, "title": title, "notice": notice,
                "can_write": self.actor.can_write()}

    def may_manage(self, roles: list[str] | None) -> bool:
        """Whether this user's buttons for an identity holding ``roles`` would be obeyed (the
        rule of :func:`broker.identity.identities.require_may_manage`): buttons that could only
        be refused are not shown. The server checks again on every POST all the same."""
        if not self.actor.can_write():
            return False
        return "org-admin" in self.actor.roles or not (set(roles or []) - {"tenant-admin"})


Endpoint = Callable[[Request], Awaitable[Response]]
PageHandler = Callable[[Ctx], Awaitable[Response]]
ActionHandler = Callable[[Ctx, dict[str, str]], Awaitable[Response]]

_SESSION_ENDED = ("Your console session has ended (signed out, expired, or its identity was "
                  "suspended or changed). Nothing was changed. Sign in again.")
_BAD_TOKEN = ("This form did not come from your console page: its security token is missing "
              "or wrong, or it was sent from another site. Nothing was changed. Reload the "
              "page and try again.")


async def _session(request: Request, svc: Services) -> tuple[sessions.Session | None, bool]:
    """The live session, and whether the request carried a session cookie at all."""
    sid = sessions.cookie_value(request)
    if sid is None:
        return None, request.cookies.get(sessions.cookie_name(sessions.is_https(request))) is not None
    return await sessions.load(svc, sid), True


def page(handler: PageHandler, nav: str) -> Endpoint:
    """A page for signed-in users; anyone else is sent to the sign-in page."""

    async def endpoint(request: Request) -> Response:
        svc = services_of(request)
        session, had_cookie = await _session(request, svc)
        if session is None:
            response = redirect(f"{PREFIX}/sign-in" + ("?notice=ended" if had_cookie else ""))
            if had_cookie:
                sessions.clear_cookie(response, request)
            return response
        ctx = Ctx(request, svc, session, nav)
        try:
            return await handler(ctx)
        except BrokerError as exc:
            return error_page(exc, ctx.base(exc.title))

    endpoint.__name__ = handler.__name__
    return endpoint


def action(handler: ActionHandler, nav: str) -> Endpoint:
    """A form's POST: only from a live session, from this site, with the session's CSRF token,
    by a role that may write; refused with a page (nothing changed) otherwise. What the
    action itself may do is then the domain's rule, as in the API."""

    async def endpoint(request: Request) -> Response:
        svc = services_of(request)
        session, had_cookie = await _session(request, svc)
        if session is None:
            response = error_page(Forbidden(_SESSION_ENDED))
            if had_cookie:
                sessions.clear_cookie(response, request)
            return response
        ctx = Ctx(request, svc, session, nav)
        try:
            if not csrf.same_origin(request):
                raise Forbidden(_BAD_TOKEN)
            fields = await form(request, svc.settings.server.admin_max_body_bytes)
            if not csrf.token_matches(session.csrf, fields.get(csrf.FIELD)):
                raise Forbidden(_BAD_TOKEN)
            ctx.actor.require_write()
            return await handler(ctx, fields)
        except BrokerError as exc:
            return error_page(exc, ctx.base(exc.title))

    endpoint.__name__ = handler.__name__
    return endpoint
