"""``create_app``: wires routes, middleware, error handlers and the typed lifespan state."""

from __future__ import annotations

import contextlib
import hmac
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broker.api import admin as admin_routes
from broker.api import audit as audit_routes
from broker.api import federation as federation_routes
from broker.api import oauth as oauth_routes
from broker.api import providers as provider_routes
from broker.api import usage as usage_routes
from broker.api.extensions import DEFAULT_EXTENSIONS, Extension
from broker.api.http import error_response, json_response
from broker.api.middleware import ClientAddressMiddleware, EdgeMiddleware, MetricsMiddleware
from broker.api.openapi import build_openapi
from broker.errors import BrokerError, InvalidToken, MethodNotAllowed, NotFound, Unavailable
from broker.jobs import scheduled_jobs
from broker.metrics import Metrics
from broker.services import Services
from broker.settings import Settings
from broker.storage.scheduler import Scheduler

log = logging.getLogger("broker")

async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc: Services = request.app.state.services
    db_ok = await anyio.to_thread.run_sync(svc.db.ping)
    vault_ok = await anyio.to_thread.run_sync(svc.vault.is_ready)
    body = {"database": "ok" if db_ok else "down", "vault": "ok" if vault_ok else "down"}
    if not (db_ok and vault_ok):
        raise Unavailable(f"not ready: {body}")
    return json_response({"status": "ready", **body})


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text. With ``metrics.token`` set, only for a bearer of it (compared in
    constant time): the counters tell which routes, providers and errors are in use."""
    expected = request.app.state.metrics_token
    if expected is not None:
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise InvalidToken("the metrics token is required")
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi_endpoint(request: Request) -> Response:
    return json_response(request.app.state.openapi)


async def _broker_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BrokerError)
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(exc.code).inc()
    return error_response(exc, request.url.path)


def _allowed_methods(request: Request) -> str:
    """Every method the path serves (RFC 9110 §15.5.6); Starlette's own ``Allow`` names only
    the methods of the first route object with a matching path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.path_regex.match(request.scope["path"]):
            methods |= route.methods
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    mapped: BrokerError
    if exc.status_code == 404:
        mapped = NotFound("no such route")
    elif exc.status_code == 405:
        mapped = MethodNotAllowed(
            "method not allowed on this route", headers={"allow": _allowed_methods(request)}
        )
    else:
        mapped = BrokerError(exc.detail)
        mapped.status = exc.status_code
    return error_response(mapped, request.url.path)


def drain(app: Starlette, deadline: float) -> None:
    """The server's shutdown has begun (it refuses new connections): whatever runs long ends
    by ``deadline`` (``time.monotonic()``), settled as usual. Before the lifespan started, there
    is nothing to end."""
    svc: Services | None = getattr(app.state, "services", None)
    for end in svc.drains if svc is not None else ():
        end(deadline)


async def _close(svc: Services) -> None:
    """Stop what the app and its extensions started (background threads, connections), newest
    first."""
    closers, svc.closers = svc.closers, []
    for close in reversed(closers):
        if inspect.iscoroutinefunction(close):
            await close()  # e.g. an async HTTP client, which must close on its own loop
        else:
            await anyio.to_thread.run_sync(close)


def create_app(
    settings: Settings,
    *,
    services: Services | None = None,
    auto_migrate: bool = False,
    extensions: tuple[Extension, ...] | None = None,
    run_background: bool = True,
) -> Starlette:
    """The ASGI app. ``services`` may be passed in (tests, ``broker dev``); otherwise the
    lifespan builds them, which refuses to start without Vault or on an un-migrated database.
    ``extensions`` defaults to every capability in :data:`DEFAULT_EXTENSIONS`."""
    if extensions is None:
        extensions = DEFAULT_EXTENSIONS
    metrics = Metrics()
    routes: list[BaseRoute] = [
        *oauth_routes.routes,
        *federation_routes.routes,
        *admin_routes.routes,
        *audit_routes.routes,
        *usage_routes.routes,
        *provider_routes.routes,
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if services is not None:
            svc = services
        else:
            svc = await anyio.to_thread.run_sync(
                lambda: Services.build(settings, auto_migrate=auto_migrate)
            )
        svc.metrics = metrics
        app.state.services = svc
        for extension in extensions:
            for route in extension(svc):
                app.router.routes.append(route)
        app.state.openapi = build_openapi(app.router.routes, settings)
        if run_background:
            scheduler = Scheduler(svc.db, settings.scheduler.tick_s)
            for job in scheduled_jobs(svc):
                scheduler.add(job)
            svc.scheduler = scheduler
            scheduler.start()
            svc.closers.append(scheduler.stop)
        try:
            yield
        finally:
            await _close(svc)
            if services is None:
                svc.close()

    handlers: dict[Any, Any] = {
        BrokerError: _broker_error,
        HTTPException: _http_error,
    }
    middleware = [
        Middleware(EdgeMiddleware),
        Middleware(ClientAddressMiddleware, trusted_proxies=settings.server.trusted_proxies),
        Middleware(MetricsMiddleware, metrics=metrics),
    ]
    if settings.console.enabled:
        # The admin console's HTML pages under /console/: served beside the API's routing
        # table, not in it (that table is the API, each route in /openapi.json), and innermost,
        # so its requests get an id, the real client address and metrics like any other.
        from broker.console import ConsoleMiddleware

        middleware.append(Middleware(ConsoleMiddleware))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    # An API answers a mistyped path with a 404 in its dialect, not a redirect built from the
    # request's Host header.
    app.router.redirect_slashes = False
    app.state.metrics = metrics
    token = settings.metrics.token
    app.state.metrics_token = token.get_secret_value() if token is not None else None
    return app

