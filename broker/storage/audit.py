"""The audit trail: who did what to which object, when and why. Never holds a secret."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, select

from broker.storage.db import Sql
from broker.storage.models import AuditEvent

_audit = AuditEvent.__table__  # type: ignore[attr-defined]
_INSERT = Sql("""
    INSERT INTO audit_event (ts, actor, action, target, detail)
    VALUES (:ts, :actor, :action, :target, :detail)""")


def record(
    conn: Connection, actor: str, action: str, target: str, detail: dict[str, Any], now: int
) -> None:
    """Write one audit entry inside the caller's transaction: the change and its record land
    together or not at all."""
    # A fixed statement: issuance audits every exchange and delegation, and building and
    # compiling an expression per entry cost as much as the rest of the entry.
    _INSERT.run(conn, ts=now, actor=actor, action=action, target=target,
                detail=json.dumps(detail))


def recent(conn: Connection, limit: int = 100) -> list[dict[str, Any]]:
    rows = conn.execute(select(_audit).order_by(_audit.c.id.desc()).limit(limit)).all()
    return [
        {"id": r.id, "ts": r.ts, "actor": r.actor, "action": r.action, "target": r.target,
         "detail": r.detail}
        for r in rows
    ]
