"""The revocation log: one row per token revocation, suspension, resume or cut, the state of
record that every replica replays into its :class:`broker.revocation.denylist.Denylist`.

Each row is announced on the event bus (:mod:`broker.storage.bus`) in the transaction that
writes it, by id only: a replica reads the entry itself from here, so a forged message can make
it read, but never change, its denylist. Rows are kept a day after they stopped mattering, for
``GET /v1/admin/revocations``; the audit table keeps the permanent record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, insert, select

from broker.errors import InvalidRequest
from broker.identity.identities import Actor
from broker.storage.bus import publish
from broker.storage.models import Revocation
from broker.tokens.tokens import LEEWAY_S

_log = Revocation.__table__  # type: ignore[attr-defined]

MESSAGE_TYPE = "revocation"
# No token lives longer than this (decision 1), whatever a replica's configuration says: a
# cut-off older than this plus the clock leeway can no longer refuse anything.
MAX_TOKEN_LIFETIME_S = 900
LOG_RETENTION_S = 86_400
KINDS = ("token", "workload", "tenant", "grant")


def cutoff_relevant_until(cutoff: int) -> int:
    """When a cut-off stops mattering: every token issued at or before it has expired."""
    return cutoff + MAX_TOKEN_LIFETIME_S + LEEWAY_S


@dataclass(frozen=True)
class Entry:
    """One row of the revocation log."""

    id: int
    kind: str  # token | workload | tenant | grant
    action: str  # revoke | suspend | resume | cut (tokens ended, identity not suspended)
    target: str
    tenant_id: str
    cutoff: int | None
    expires_at: int | None
    relevant_until: int
    created_at: int
    actor: str
    reason: str | None

    @classmethod
    def from_row(cls, row: Any) -> Entry:
        # Through the row's mapping and by position: a replica applies 100,000 entries of a
        # mass revocation at once, and attribute lookups and keyword arguments took most of it.
        m = row._mapping
        return cls(
            int(m["id"]), m["kind"], m["action"], m["target"], m["tenant_id"], m["cutoff"],
            m["expires_at"], int(m["relevant_until"]), int(m["created_at"]), m["actor"],
            m["reason"],
        )


def append(
    conn: Connection, *, kind: str, action: str, target: str, tenant_id: str, cutoff: int | None,
    expires_at: int | None, relevant_until: int, created_at: int, actor: str, reason: str | None,
) -> Entry:
    """Write an entry and announce it to every replica at commit."""
    row = conn.execute(insert(_log).values(
        kind=kind, action=action, target=target, tenant_id=tenant_id, cutoff=cutoff,
        expires_at=expires_at, relevant_until=relevant_until, created_at=created_at, actor=actor,
        reason=reason,
    ).returning(*_log.c)).one()
    entry = Entry.from_row(row)
    publish(conn, MESSAGE_TYPE, {"id": entry.id})
    return entry


def read_entry(conn: Connection, entry_id: int) -> Entry | None:
    row = conn.execute(select(_log).where(_log.c.id == entry_id)).first()
    return None if row is None else Entry.from_row(row)


def latest_for(conn: Connection, kind: str, target: str) -> Entry | None:
    """The newest entry still kept about one token or identity."""
    row = conn.execute(
        select(_log).where(_log.c.kind == kind, _log.c.target == target)
        .order_by(_log.c.id.desc()).limit(1)
    ).first()
    return None if row is None else Entry.from_row(row)


def list_entries(
    conn: Connection, actor: Actor, *, before: int | None, limit: int,
    tenant_id: str | None = None, kind: str | None = None,
) -> tuple[list[Entry], bool]:
    """Up to ``limit`` entries numbered below ``before``, newest first, and whether more
    follow; a tenant-admin sees only its own tenant's entries."""
    c = _log.c
    stmt = select(_log).order_by(c.id.desc()).limit(limit + 1)
    if before is not None:
        stmt = stmt.where(c.id < before)
    stmt = stmt.where(actor.scope(c.tenant_id, tenant_id))
    if kind is not None:
        if kind not in KINDS:
            raise InvalidRequest("kind must be token, workload, tenant or grant")
        stmt = stmt.where(c.kind == kind)
    entries = [Entry.from_row(r) for r in conn.execute(stmt).all()]
    return entries[:limit], len(entries) > limit


def prune_log(conn: Connection, now: int) -> int:
    """Delete log rows that stopped mattering more than :data:`LOG_RETENTION_S` ago.

    Never a row of the catch-up's window, though: revoking a token that expired days ago
    writes a row that stopped mattering before it was made, and the catch-up's count of the
    window relies on the rows it applied staying there."""
    horizon = now - LOG_RETENTION_S
    result = conn.execute(
        delete(_log).where(_log.c.relevant_until < horizon, _log.c.created_at < horizon)
    )
    return int(result.rowcount or 0)
