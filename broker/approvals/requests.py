"""Approval requests: a workload asks (with its own token) for a model behind approval or for
burst capacity, for a while; an admin approves, which makes the grant
(:mod:`broker.approvals.grants`), or denies.

An approval may lower what was asked, never raise it. A request nobody answers expires after
``approvals.pending_ttl_s``. Once approved, the request's status follows its grant's:
``expired`` when the grant expired, ``revoked`` when it was revoked.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import Field, StrictInt, StrictStr, field_validator
from sqlalchemy import Connection, func, insert, select, update

from broker.approvals import grants
from broker.approvals.grants import Ask, GrantRecord, _Body, _printable
from broker.errors import Conflict, NotFound, RateLimited, ValidationFailed
from broker.identity.identities import Actor
from broker.identity.policy import Micros
from broker.settings import Settings
from broker.storage.audit import record
from broker.storage.models import AccessGrant, Approval
from broker.storage.paging import page

_approval = Approval.__table__  # type: ignore[attr-defined]
_grant = AccessGrant.__table__  # type: ignore[attr-defined]

# Requests one workload may have waiting at once: asking is free, so it is capped.
MAX_PENDING = 20
STATUSES = ("pending", "approved", "denied", "expired", "revoked")


class Decision(_Body):
    """``POST /v1/admin/approvals/{id}/approve``: what is granted, at most what was asked."""

    ttl_s: StrictInt | None = Field(default=None, ge=1)
    budget_micros: Micros | None = None
    rpm: StrictInt | None = Field(default=None, ge=1, le=1_000_000)
    tpm: StrictInt | None = Field(default=None, ge=1, le=10**12)
    reason: StrictStr | None = Field(default=None, min_length=1, max_length=512)

    _reason = field_validator("reason")(_printable)


class Denial(_Body):
    reason: StrictStr | None = Field(default=None, min_length=1, max_length=512)

    _reason = field_validator("reason")(_printable)


@dataclass(frozen=True)
class ApprovalRecord:
    id: str
    tenant_id: str
    workload_id: str
    model: str | None
    tool: str | None
    budget_micros: int
    rpm: int | None
    tpm: int | None
    ttl_s: int
    reason: str | None
    stored_status: str
    created_at: int
    expires_at: int
    decided_at: int | None
    decided_by: str | None
    decision_reason: str | None
    grant_id: str | None
    grant: GrantRecord | None = None

    def status(self, now: int) -> str:
        if self.stored_status == "pending" and self.expires_at <= now:
            return "expired"
        if self.stored_status == "approved" and self.grant is not None:
            grant_status = self.grant.status(now)
            return "approved" if grant_status == "live" else grant_status
        return self.stored_status


def _record(conn: Connection, row: Any) -> ApprovalRecord:
    grant = None
    if row.grant_id is not None:
        found = conn.execute(select(_grant).where(_grant.c.id == row.grant_id)).first()
        grant = grants._record(found) if found is not None else None
    return ApprovalRecord(
        id=row.id, tenant_id=row.tenant_id, workload_id=row.workload_id, model=row.model,
        tool=row.tool, budget_micros=int(row.budget_micros), rpm=row.rpm, tpm=row.tpm, ttl_s=int(row.ttl_s),
        reason=row.reason, stored_status=row.status, created_at=int(row.created_at),
        expires_at=int(row.expires_at), decided_at=row.decided_at, decided_by=row.decided_by,
        decision_reason=row.decision_reason, grant_id=row.grant_id, grant=grant)


def ask(conn: Connection, settings: Settings, workload_id: str, body: Ask,
        now: int) -> ApprovalRecord:
    """A workload's own request (its token proved who asks)."""
    workload = grants.target(conn, workload_id)
    grants.check_ask(settings, workload, body)
    a = _approval.c
    pending = conn.execute(select(func.count()).select_from(_approval).where(
        a.workload_id == workload_id, a.status == "pending", a.expires_at > now)).scalar_one()
    if pending >= MAX_PENDING:
        raise RateLimited(f"this workload already has {MAX_PENDING} requests waiting",
                          headers={"retry-after": "60"})
    approval_id = "ap_" + secrets.token_hex(8)
    conn.execute(insert(_approval).values(
        id=approval_id, tenant_id=workload.tenant_id, workload_id=workload_id, model=body.model,
        tool=body.tool, budget_micros=body.budget_micros, rpm=body.rpm, tpm=body.tpm, ttl_s=body.ttl_s,
        reason=body.reason, status="pending", created_at=now,
        expires_at=now + settings.approvals.pending_ttl_s))
    record(conn, workload_id, "approval.request", approval_id,
           {"workload_id": workload_id, "tenant_id": workload.tenant_id, "model": body.model,
            "tool": body.tool, "budget_micros": body.budget_micros, "rpm": body.rpm, "tpm": body.tpm,
            "ttl_s": body.ttl_s, "reason": body.reason}, now)
    return get_own(conn, workload_id, approval_id)


def get_own(conn: Connection, workload_id: str, approval_id: str) -> ApprovalRecord:
    """A workload's view of its own request: any other is 404."""
    row = conn.execute(select(_approval).where(_approval.c.id == approval_id)).first()
    if row is None or row.workload_id != workload_id:
        raise NotFound("no such approval")
    return _record(conn, row)


def get(conn: Connection, actor: Actor, approval_id: str) -> ApprovalRecord:
    row = conn.execute(select(_approval).where(_approval.c.id == approval_id)).first()
    if row is None or not actor.sees_tenant(row.tenant_id):
        raise NotFound("no such approval")
    return _record(conn, row)


def list_approvals(conn: Connection, actor: Actor, *, status: str | None,
                   tenant_id: str | None, workload_id: str | None, cursor: str | None,
                   limit: int, now: int) -> tuple[list[ApprovalRecord], str | None]:
    a = _approval.c
    stmt = select(_approval).order_by(a.id).limit(limit + 1)
    if cursor:
        stmt = stmt.where(a.id > cursor)
    stmt = stmt.where(actor.scope(a.tenant_id, tenant_id))
    if workload_id is not None:
        stmt = stmt.where(a.workload_id == workload_id)
    if status == "pending":
        stmt = stmt.where(a.status == "pending", a.expires_at > now)
    elif status in ("denied",):
        stmt = stmt.where(a.status == status)
    elif status is not None:
        # approved, expired and revoked depend on the grant: filtered after reading.
        stmt = stmt.where(a.status.in_(["approved", "pending", "expired"]))
    rows, last = page(conn.execute(stmt).all(), limit)
    records = [_record(conn, r) for r in rows]
    if status is not None:
        records = [r for r in records if r.status(now) == status]
    return records, None if last is None else str(last.id)


def _pending(conn: Connection, actor: Actor, approval_id: str, now: int) -> ApprovalRecord:
    found = get(conn, actor, approval_id)
    actor.require_write()
    if found.status(now) != "pending":
        raise Conflict(f"the request is {found.status(now)}, not pending")
    return found


def _decide(conn: Connection, approval_id: str, values: dict[str, Any]) -> None:
    a = _approval.c
    done = conn.execute(update(_approval).where(a.id == approval_id, a.status == "pending")
                        .values(**values).returning(a.id)).first()
    if done is None:
        raise Conflict("the request was decided meanwhile")


def approve(conn: Connection, settings: Settings, actor: Actor, approval_id: str,
            decision: Decision, now: int) -> ApprovalRecord:
    """Grant what was asked, or less: a decision above the request is 422."""
    found = _pending(conn, actor, approval_id, now)
    for name in ("ttl_s", "budget_micros", "rpm", "tpm"):
        given, asked = getattr(decision, name), getattr(found, name)
        if given is not None and (asked is None or given > asked):
            raise ValidationFailed(f"{name}: an approval may lower what was asked, never raise it")
    granted = Ask(
        model=found.model,
        tool=found.tool,
        budget_micros=found.budget_micros if decision.budget_micros is None else decision.budget_micros,
        rpm=found.rpm if decision.rpm is None else decision.rpm,
        tpm=found.tpm if decision.tpm is None else decision.tpm,
        ttl_s=found.ttl_s if decision.ttl_s is None else decision.ttl_s,
        reason=decision.reason or found.reason,
    )
    workload = grants.target(conn, found.workload_id, actor)
    grant = grants.create(conn, settings, actor, workload, granted, now, approval_id=approval_id)
    _decide(conn, approval_id, {"status": "approved", "decided_at": now, "decided_by": actor.id,
                                "decision_reason": decision.reason, "grant_id": grant.id})
    record(conn, actor.id, "approval.approve", approval_id,
           {"workload_id": found.workload_id, "tenant_id": found.tenant_id, "grant_id": grant.id,
            "reason": decision.reason}, now)
    return get(conn, actor, approval_id)


def deny(conn: Connection, actor: Actor, approval_id: str, denial: Denial,
         now: int) -> ApprovalRecord:
    found = _pending(conn, actor, approval_id, now)
    _decide(conn, approval_id, {"status": "denied", "decided_at": now, "decided_by": actor.id,
                                "decision_reason": denial.reason})
    record(conn, actor.id, "approval.deny", approval_id,
           {"workload_id": found.workload_id, "tenant_id": found.tenant_id,
            "reason": denial.reason}, now)
    return get(conn, actor, approval_id)


def expire_pending(conn: Connection, now: int, limit: int = 500) -> int:
    """Mark requests nobody answered in time expired, each with its audit entry."""
    a = _approval.c
    rows = conn.execute(
        update(_approval).where(a.id.in_(
            select(a.id).where(a.status == "pending", a.expires_at <= now).limit(limit)
        )).values(status="expired").returning(a.id, a.workload_id, a.tenant_id)).all()
    for approval_id, workload_id, tenant_id in rows:
        record(conn, "broker:scheduler", "approval.expire", approval_id,
               {"workload_id": workload_id, "tenant_id": tenant_id}, now)
    return len(rows)
