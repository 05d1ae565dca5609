"""The console's routes and the middleware that serves them under ``/console``.

The console is not part of the API's routing table: that table is the API (each route is in
``/openapi.json`` and ``docs/api.md``, and answers errors as problem+json). A plain ASGI
middleware hands every ``/console`` request to the console's own small router instead, which
answers everything, errors and unknown paths included, as HTML pages.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.console import actions, pages
from broker.console.context import ActionHandler, PageHandler, action, page
from broker.console.overview import overview
from broker.console.render import (
    PREFIX,
    SECURITY_HEADERS,
    error_page,
    internal_error_page,
    not_found_page,
)
from broker.console.signin import sign_in, sign_in_page, sign_out
from broker.errors import MethodNotAllowed

_STATIC_DIR = Path(__file__).resolve().parent / "static"
_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".svg": "image/svg+xml"}
# Read once, by a fixed list: a name from the address only ever selects one of these.
STATIC: dict[str, tuple[bytes, str]] = {
    path.name: (path.read_bytes(), _TYPES[path.suffix])
    for path in sorted(_STATIC_DIR.iterdir()) if path.suffix in _TYPES
}


async def static_file(request: Request) -> Response:
    found = STATIC.get(str(request.path_params.get("name", "")))
    if found is None:
        return not_found_page()
    body, media_type = found
    headers = {**SECURITY_HEADERS, "cache-control": "public, max-age=300"}
    return Response(body, media_type=media_type, headers=headers)


def _get(path: str, handler: PageHandler, nav: str) -> Route:
    return Route(PREFIX + path, page(handler, nav), methods=["GET"])


def _post(path: str, handler: ActionHandler, nav: str) -> Route:
    return Route(PREFIX + path, action(handler, nav), methods=["POST"])


ROUTES: list[Route] = [
    _get("/", overview, "overview"),
    Route(PREFIX + "/sign-in", sign_in_page, methods=["GET"]),
    Route(PREFIX + "/sign-in", sign_in, methods=["POST"]),
    Route(PREFIX + "/sign-out", sign_out, methods=["POST"]),
    Route(PREFIX + "/static/{name}", static_file, methods=["GET"]),
    _get("/tenants", pages.tenants, "tenants"),
    _get("/tenants/{id}", pages.tenant, "tenants"),
    _post("/tenants/{id}/suspend", actions.suspend_tenant, "tenants"),
    _post("/tenants/{id}/resume", actions.resume_tenant, "tenants"),
    _get("/workloads/{id}", pages.workload, "tenants"),
    _post("/workloads/{id}/suspend", actions.suspend_workload, "tenants"),
    _post("/workloads/{id}/resume", actions.resume_workload, "tenants"),
    _post("/workloads/{id}/rotate-secret", actions.rotate_secret, "tenants"),
    _post("/tokens/{jti}/revoke", actions.revoke_token, "tenants"),
    _get("/approvals", pages.approvals, "approvals"),
    _post("/approvals/{id}/approve", actions.approve, "approvals"),
    _post("/approvals/{id}/deny", actions.deny, "approvals"),
    _get("/alerts", pages.alerts, "alerts"),
    _post("/alerts/{id}/clear", actions.clear_alert, "alerts"),
    _get("/audit", pages.audit, "audit"),
    _get("/providers", pages.providers, "providers"),
]


async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
    """Route one console request; every answer is a page of the console's own."""
    request = Request(scope, receive, send)
    response: Response | None = None
    if scope["path"] == PREFIX:
        # The app does not add slashes itself (an API path is exact): the console's root does.
        response = RedirectResponse(PREFIX + "/", status_code=308, headers=dict(SECURITY_HEADERS))
    allowed: set[str] = set()
    for route in ROUTES if response is None else ():
        match, child = route.matches(scope)
        if match == Match.FULL:
            scope.update(child)
            scope["route"] = route  # the metrics label: the template, never the ids in it
            request = Request(scope, receive, send)
            try:
                response = await route.endpoint(request)
            except Exception as exc:
                response = internal_error_page(request, exc)
            break
        if match == Match.PARTIAL:
            allowed |= set(route.methods or ())
    if response is None:
        if allowed:
            refused = MethodNotAllowed("This page does not take that kind of request.",
                                       headers={"allow": ", ".join(sorted(allowed))})
            response = error_page(refused)
            response.headers["allow"] = ", ".join(sorted(allowed))
        else:
            response = not_found_page()
    await response(scope, receive, send)


class ConsoleMiddleware:
    """Serves ``/console`` and everything under it; passes every other request on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == PREFIX or path.startswith(PREFIX + "/"):
            await dispatch(scope, receive, send)
            return
        await self.app(scope, receive, send)
