"""The audit trail: who did what to which object, when and why. Never holds a secret."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, insert, select

from broker.storage.models import AuditEvent

_audit = AuditEvent.__table__  # type: ignore[attr-defined]


def record(
    conn: Connection, actor: str, action: str, target: str, detail: dict[str, Any], now: int
) -> None:
    """Write one audit entry inside the caller's transaction: the change and its record land
    together or not at all."""
    conn.execute(
        insert(_audit).values(ts=now, actor=actor, action=action, target=target, detail=detail)
    )


def recent(conn: Connection, limit: int = 100) -> list[dict[str, Any]]:
    rows = conn.execute(select(_audit).order_by(_audit.c.id.desc()).limit(limit)).all()
    return [
        {"id": r.id, "ts": r.ts, "actor": r.actor, "action": r.action, "target": r.target,
         "detail": r.detail}
        for r in rows
    ]
