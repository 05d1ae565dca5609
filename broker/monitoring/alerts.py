"""Alerts: what the detectors found and what the broker did about it, listed and cleared by
admins (tenant-scoped like every admin object).

An open alert whose action is ``throttle`` is the throttle itself: while it is open the
workload's rpm, tpm and burst limits are multiplied by ``monitoring.throttle_factor``; an admin
clearing it lifts the throttle on every replica (the gateways drop the workload's cached
policy on the bus's ``limits`` message). A suspension is lifted with ``/resume``, not here.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from broker.approvals.grants import LIMITS_MESSAGE
from broker.errors import Conflict, NotFound
from broker.identity.identities import Actor
from broker.identity.policy import Policy
from broker.storage.audit import record
from broker.storage.bus import publish
from broker.storage.models import Alert
from broker.storage.paging import page

_alert = Alert.__table__  # type: ignore[attr-defined]

STATUSES = ("open", "cleared")


@dataclass(frozen=True)
class AlertRecord:
    id: str
    ts: int
    tenant_id: str
    workload_id: str
    detector: str
    severity: str
    action: str
    summary: str
    evidence: dict[str, Any]
    status: str
    cleared_at: int | None
    cleared_by: str | None


def _record(row: Any) -> AlertRecord:
    return AlertRecord(
        id=row.id, ts=int(row.ts), tenant_id=row.tenant_id, workload_id=row.workload_id,
        detector=row.detector, severity=row.severity, action=row.action, summary=row.summary,
        evidence=dict(row.evidence or {}), status=row.status, cleared_at=row.cleared_at,
        cleared_by=row.cleared_by)


def view(alert: AlertRecord) -> dict[str, Any]:
    """The alert as the admin API lists it and as webhooks receive it."""
    return {
        "id": alert.id, "ts": _iso(alert.ts), "tenant_id": alert.tenant_id,
        "workload_id": alert.workload_id, "detector": alert.detector,
        "severity": alert.severity, "action": alert.action, "summary": alert.summary,
        "evidence": alert.evidence, "status": alert.status,
        "cleared_at": None if alert.cleared_at is None else _iso(alert.cleared_at),
        "cleared_by": alert.cleared_by,
    }


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def create(conn: Connection, *, tenant_id: str, workload_id: str, detector: str, severity: str,
           action: str, summary: str, evidence: dict[str, Any], now: int) -> AlertRecord:
    # Time first, so that alerts of one second still list in the order they were raised.
    alert_id = f"al_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(4)}"
    conn.execute(insert(_alert).values(
        id=alert_id, ts=now, tenant_id=tenant_id, workload_id=workload_id, detector=detector,
        severity=severity, action=action, summary=summary[:512], evidence=evidence,
        status="open"))
    if action == "throttle":
        publish(conn, LIMITS_MESSAGE, {"workload_id": workload_id})
    row = conn.execute(select(_alert).where(_alert.c.id == alert_id)).one()
    return _record(row)


def get(conn: Connection, actor: Actor, alert_id: str) -> AlertRecord:
    row = conn.execute(select(_alert).where(_alert.c.id == alert_id)).first()
    if row is None or not actor.sees_tenant(row.tenant_id):
        raise NotFound("no such alert")
    return _record(row)


def list_alerts(conn: Connection, actor: Actor, *, tenant_id: str | None,
                workload_id: str | None, status: str | None, before: tuple[int, str] | None,
                limit: int) -> tuple[list[AlertRecord], bool]:
    """Newest first, ordered by ``(ts, id)`` descending, from below the position ``before``;
    and whether more follow."""
    a = _alert.c
    stmt = select(_alert).order_by(a.ts.desc(), a.id.desc()).limit(limit + 1)
    if before is not None:
        ts, last_id = before
        stmt = stmt.where((a.ts < ts) | ((a.ts == ts) & (a.id < last_id)))
    stmt = stmt.where(actor.scope(a.tenant_id, tenant_id))
    if workload_id is not None:
        stmt = stmt.where(a.workload_id == workload_id)
    if status is not None:
        stmt = stmt.where(a.status == status)
    rows, last_row = page(conn.execute(stmt).all(), limit)
    return [_record(r) for r in rows], last_row is not None


def clear(conn: Connection, actor: Actor, alert_id: str, now: int,
          reason: str | None = None) -> AlertRecord:
    """Clear an open alert (lifting its throttle); clearing a cleared alert changes nothing."""
    found = get(conn, actor, alert_id)
    actor.require_write()
    if found.status == "cleared":
        return found
    a = _alert.c
    done = conn.execute(update(_alert).where(a.id == alert_id, a.status == "open")
                        .values(status="cleared", cleared_at=now, cleared_by=actor.id)
                        .returning(a.id)).first()
    if done is None:
        raise Conflict("the alert changed meanwhile; try again")
    record(conn, actor.id, "alert.clear", alert_id,
           {"workload_id": found.workload_id, "tenant_id": found.tenant_id,
            "detector": found.detector, "action": found.action, "reason": reason}, now)
    if found.action == "throttle":
        publish(conn, LIMITS_MESSAGE, {"workload_id": found.workload_id})
    return get(conn, actor, alert_id)


def throttled(conn: Connection, workload_id: str) -> bool:
    a = _alert.c
    return conn.execute(select(a.id).where(a.workload_id == workload_id, a.status == "open",
                                           a.action == "throttle").limit(1)).first() is not None


def throttle(policy: Policy, factor: float) -> Policy:
    """The policy with its rates and burst cut by ``factor`` (never below one request, token or
    micro-dollar, so the workload slows down rather than stops)."""
    update_: dict[str, Any] = {}
    if policy.rate is not None:
        update_["rate"] = policy.rate.model_copy(update={
            "rpm": None if policy.rate.rpm is None else max(1, int(policy.rate.rpm * factor)),
            "tpm": None if policy.rate.tpm is None else max(1, int(policy.rate.tpm * factor)),
        })
    if policy.burst is not None:
        update_["burst"] = policy.burst.model_copy(
            update={"limit_micros": max(1, int(policy.burst.limit_micros * factor))})
    return policy.model_copy(update=update_)
