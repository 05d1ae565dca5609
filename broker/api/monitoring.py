"""Alert routes, and the extension that starts the monitor and its webhook sender and plugs in
the alert, approval and grant routes."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broker.api import approvals as approval_routes
from broker.api.admin import admin
from broker.api.http import json_object, json_response, path_id, query_str, validate
from broker.api.openapi import ApiRoute
from broker.api.pagination import encode_position, position_page_params
from broker.api.revocation import ReasonBody
from broker.errors import InvalidRequest
from broker.identity.identities import Actor
from broker.monitoring import alerts
from broker.monitoring.monitor import Monitor, fingerprint_key
from broker.monitoring.webhooks import WebhookSender
from broker.revocation.denylist import Denylist, apply_here
from broker.services import Services


async def list_alerts(request: Request, svc: Services, actor: Actor) -> Response:
    """Alerts, newest first; filter by ``tenant_id``, ``workload_id``, ``status``."""
    before, limit = position_page_params(request)
    tenant_id = query_str(request, "tenant_id", 64)
    workload_id = query_str(request, "workload_id", 64)
    status = query_str(request, "status", 16)
    if status is not None and status not in alerts.STATUSES:
        raise InvalidRequest("status must be open or cleared")
    data, more = await svc.db.read(lambda conn: alerts.list_alerts(
        conn, actor, tenant_id=tenant_id, workload_id=workload_id, status=status,
        before=before, limit=limit))
    nxt = encode_position(data[-1].ts, data[-1].id) if more else None
    return json_response({"data": [alerts.view(a) for a in data], "next_cursor": nxt})


async def get_alert(request: Request, svc: Services, actor: Actor) -> Response:
    alert_id = path_id(request)
    return json_response(alerts.view(await svc.db.read(lambda conn: alerts.get(conn, actor, alert_id))))


async def clear_alert(request: Request, svc: Services, actor: Actor) -> Response:
    """Clear an alert: a throttle it put on is lifted (a suspension is lifted with /resume)."""
    alert_id = path_id(request)
    body: ReasonBody = validate(ReasonBody, await json_object(
        request, svc.settings.server.admin_max_body_bytes, empty={}))
    now = int(time.time())
    cleared = await svc.db.run(lambda conn: alerts.clear(conn, actor, alert_id, now, body.reason))
    if svc.gateway is not None:
        svc.gateway.forget_policy(cleared.workload_id)
    return json_response(alerts.view(cleared))


routes: list[BaseRoute] = [
    Route("/v1/admin/alerts", admin(list_alerts), methods=["GET"]),
    Route("/v1/admin/alerts/{id}", admin(get_alert), methods=["GET"]),
    ApiRoute("/v1/admin/alerts/{id}/clear", admin(clear_alert, write=True), methods=["POST"],
             body=ReasonBody),
]


def monitoring_extension(svc: Services) -> list[BaseRoute]:
    """Start the webhook sender and the monitor (unless ``monitoring.enabled`` is false; the
    routes answer either way)."""
    settings = svc.settings
    sender = WebhookSender(svc.db, svc.vault, settings.alerts, metrics=svc.metrics)
    sender.start()
    svc.closers.append(sender.stop)
    if settings.monitoring.enabled:
        monitor = Monitor(svc.db, settings, svc.metrics, sender=sender,
                          applied=lambda entry: apply_here(svc.token_gate, entry),
                          key=fingerprint_key(svc.pepper))
        gate = svc.token_gate
        if isinstance(gate, Denylist):
            # A workload's policy edit, suspension or resume reaches the monitor at once.
            gate.listeners.append(
                lambda entry: monitor.forget_workload(entry.target)
                if entry.kind == "workload" else None)
        monitor.start()
        svc.monitor = monitor
        svc.closers.append(monitor.stop)
    return [*routes, *approval_routes.routes]
