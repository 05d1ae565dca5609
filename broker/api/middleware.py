"""The ASGI middleware around every route: request ids and the last-resort error answer, the
real client address behind trusted proxies, and request metrics."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import time
import traceback
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.api.http import REQUEST_ID_PATTERN, error_response
from broker.errors import BrokerError, InvalidRequest
from broker.metrics import Metrics

log = logging.getLogger("broker.http")


class EdgeMiddleware:
    """Echo a valid incoming ``x-request-id`` or mint one and put it on every response; turn
    any unexpected exception into a 500 in the spec's shape.

    A plain ASGI middleware (not ``BaseHTTPMiddleware``) so streaming responses pass through
    untouched and the hot path pays one dict lookup.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if REQUEST_ID_PATTERN.match(candidate):
                    rid = candidate
                break
        if rid is None:
            rid = "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = rid
        raw = rid.encode()

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", raw))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # Last line of defence: an unexpected error is answered in the caller's dialect
            # and logged by its shape only (its message may carry driver text), never re-raised
            # to the server, which would log it whole.
            frames = "".join(traceback.format_tb(exc.__traceback__))
            log.error("unhandled %s in request %s\n%s", type(exc).__name__, rid, frames)
            if started:
                return
            response = error_response(BrokerError("internal error"), scope.get("path", ""))
            await response(scope, receive, send_with_id)


class ClientAddressMiddleware:
    """Sets the request's client address to the real caller's.

    The TCP peer is the client, unless it is one of ``server.trusted_proxies``: then
    ``X-Forwarded-For`` is read from the right, skipping the trusted proxies, and the first
    address that is not one of them is the client. Every entry must be an IP address (400
    otherwise), so no string from a header reaches a counter key or a usage record. A peer
    that is not trusted has its ``X-Forwarded-For`` ignored: anyone can write that header.
    """

    def __init__(self, app: ASGIApp, trusted_proxies: tuple[str, ...] = ()):
        self.app = app
        self.trusted = tuple(ipaddress.ip_network(c, strict=False) for c in trusted_proxies)

    def _is_trusted(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(ip in net for net in self.trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.trusted:
            await self.app(scope, receive, send)
            return
        peer = scope.get("client")
        try:
            ip = ipaddress.ip_address(str(peer[0])) if peer else None
        except ValueError:
            ip = None  # not an IP peer (a unix socket): nothing to trust
        if ip is not None and self._is_trusted(ip):
            values = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"]
            hops = [h.strip() for h in ",".join(values).split(",") if h.strip()]
            for hop in reversed(hops):
                try:
                    ip = ipaddress.ip_address(hop)
                except ValueError:
                    response = error_response(
                        InvalidRequest("X-Forwarded-For must list IP addresses"),
                        scope.get("path", ""))
                    await response(scope, receive, send)
                    return
                if not self._is_trusted(ip):
                    break
            scope["client"] = (str(ip), 0)
        await self.app(scope, receive, send)


class MetricsMiddleware:
    """Counts requests by route template (not raw path: ids must not become labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics
        # The labelled children by (route, method, status): ``labels()`` validates and locks on
        # every call, and the set of keys is small (route templates, not paths).
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _observe(self, template: str, method: str, status: int, seconds: float) -> None:
        key = (template, method, status)
        children = self._children.get(key)
        if children is None:
            if len(self._children) >= 10_000:
                self._children.clear()
            children = self._children[key] = (
                self.metrics.latency.labels(template),
                self.metrics.requests.labels(template, method, str(status)),
            )
        latency, requests = children
        latency.observe(seconds)
        requests.inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                self._observe(template, scope["method"], status, time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, observe)
