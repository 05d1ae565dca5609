"""Prometheus metrics. Labels are route templates and error codes: never ids, keys or tokens."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "broker_http_requests_total", "HTTP requests", ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "broker_http_request_seconds", "HTTP request latency until the response starts",
            ["route"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.tokens_issued = Counter(
            "broker_tokens_issued_total", "Access tokens issued", ["kind"], registry=self.registry
        )
        self.reserved = Counter(
            "broker_budget_reserved_micros_total", "Micro-dollars reserved by issued tokens",
            registry=self.registry,
        )
        self.errors = Counter(
            "broker_errors_total", "Requests refused, by error code", ["code"],
            registry=self.registry,
        )
        self.overruns = Counter(
            "broker_overruns_total",
            "Calls the provider billed above the broker's hold (each one also audited)",
            ["provider"], registry=self.registry,
        )
        self.overrun_micros = Counter(
            "broker_overrun_micros_total", "Micro-dollars charged above the hold",
            ["provider"], registry=self.registry,
        )
        self.released = Counter(
            "broker_budget_released_micros_total", "Unspent micro-dollars returned by the sweeper",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
