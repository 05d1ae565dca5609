"""Grants: time-bound exceptions to a workload's policy, made by an admin (directly, or by
approving the workload's request, :mod:`broker.approvals.requests`).

A live grant may do three things for its workload:

* **a model** that the policy lists in ``approval_models``: tokens issued while the grant lives
  carry it (``grant_models``) and the gateway lets them call it;
* **a tool** that the policy lists in ``approval_tools`` (or ``batch``, when the policy puts batch
  jobs behind approval): tokens carry it in ``grant_tools`` and the gateway lets them use it;
* **extra budget**: reserved from the tenant and organisation budgets when granted, as a slice
  of kind ``grant`` with the grant's id (:mod:`broker.money.ledger`). Tokens whose slice the
  workload's own budgets cannot hold are funded from it (their slice is carved out of it), and
  none outlives it. What was not spent returns when it ends, once its tokens' slices have;
* **higher rates**: the workload's rpm and tpm are at least the grant's while it lives.

Every token issued while a grant lives carries its id in ``grants`` and expires with it at the
latest. Revoking a grant writes the revocation log (kind ``grant``), so each replica's gate
refuses those tokens within a second, as it does revoked tokens.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator
from sqlalchemy import Connection, insert, select, update

from broker.errors import Conflict, NotFound, ValidationFailed
from broker.identity.identities import Actor, require_may_manage
from broker.identity.policy import Micros, Policy, Rate, ToolName, effective, model_allowed
from broker.money import ledger
from broker.revocation import log as revocation_log
from broker.revocation.log import Entry
from broker.settings import Settings
from broker.storage.audit import record
from broker.storage.bus import publish
from broker.storage.models import AccessGrant, Tenant, TokenSlice, Workload
from broker.storage.paging import page
from broker.tokens.tokens import LEEWAY_S

_grant = AccessGrant.__table__  # type: ignore[attr-defined]
_workload = Workload.__table__  # type: ignore[attr-defined]
_tenant = Tenant.__table__  # type: ignore[attr-defined]
_slice = TokenSlice.__table__  # type: ignore[attr-defined]

# Told to every replica when a workload's limits change (a grant, a throttle, its clearing):
# gateways drop the workload's cached policy.
LIMITS_MESSAGE = "limits"
GRANT_STATUSES = ("live", "expired", "revoked")


def _printable(value: str | None) -> str | None:
    if value is not None and not value.isprintable():
        raise ValueError("must be printable text")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Ask(_Body):
    """What a grant gives: the fields of a workload's request and of an admin's direct grant."""

    model: StrictStr | None = Field(default=None, min_length=1, max_length=256)
    tool: ToolName | None = None
    budget_micros: Micros = 0
    rpm: StrictInt | None = Field(default=None, ge=1, le=1_000_000)
    tpm: StrictInt | None = Field(default=None, ge=1, le=10**12)
    ttl_s: StrictInt = Field(ge=1)
    reason: StrictStr | None = Field(default=None, min_length=1, max_length=512)

    _reason = field_validator("reason")(_printable)


class GrantBody(Ask):
    """``POST /v1/admin/grants``: a grant without a request."""

    workload_id: StrictStr = Field(min_length=1, max_length=40)


@dataclass(frozen=True)
class GrantRecord:
    id: str
    tenant_id: str
    workload_id: str
    approval_id: str | None
    model: str | None
    tool: str | None
    budget_micros: int
    rpm: int | None
    tpm: int | None
    created_at: int
    expires_at: int
    created_by: str
    reason: str | None
    revoked_at: int | None
    revoked_by: str | None
    ended_at: int | None
    spent_micros: int = 0

    def status(self, now: int) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "live" if self.expires_at > now else "expired"


def _record(row: Any, spent: int = 0) -> GrantRecord:
    return GrantRecord(
        id=row.id, tenant_id=row.tenant_id, workload_id=row.workload_id,
        approval_id=row.approval_id, model=row.model, tool=row.tool,
        budget_micros=int(row.budget_micros),
        rpm=row.rpm, tpm=row.tpm, created_at=int(row.created_at), expires_at=int(row.expires_at),
        created_by=row.created_by, reason=row.reason, revoked_at=row.revoked_at,
        revoked_by=row.revoked_by, ended_at=row.ended_at, spent_micros=spent)


def _spent(conn: Connection, grant_id: str) -> int:
    found = conn.execute(select(_slice.c.spent_micros).where(_slice.c.jti == grant_id)).scalar()
    return 0 if found is None else int(found)


# --- checks shared with requests ------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The workload a grant is for, as the checks need it."""

    id: str
    tenant_id: str
    kind: str
    roles: list[str]
    policy: Policy


def target(conn: Connection, workload_id: str, actor: Actor | None = None) -> Target:
    """The workload (NotFound when the actor may not see it)."""
    row = conn.execute(select(_workload).where(_workload.c.id == workload_id)).first()
    if row is None or (actor is not None and not actor.sees_tenant(row.tenant_id)):
        raise NotFound("no such workload")
    return Target(row.id, row.tenant_id, row.kind, list(row.roles or []),
                  Policy.model_validate(row.policy))


def check_ask(settings: Settings, workload: Target, ask: Ask) -> None:
    """What may be asked or granted at all: 422 otherwise."""
    if ask.ttl_s > settings.approvals.max_ttl_s:
        raise ValidationFailed(f"ttl_s: at most {settings.approvals.max_ttl_s} (approvals.max_ttl_s)")
    if (ask.model is None and ask.tool is None and not ask.budget_micros and ask.rpm is None
            and ask.tpm is None):
        raise ValidationFailed("a grant needs a model, a tool, budget_micros, rpm or tpm")
    if ask.tool is not None:
        policy = effective(workload.policy, workload.kind)
        gated = ask.tool in policy.approval_tools or (ask.tool == "batch"
                                                      and policy.batch == "approval")
        if not gated:
            raise ValidationFailed("tool: not one this workload's policy puts behind approval "
                                   "(policy.approval_tools, or batch = \"approval\")")
    if ask.model is not None:
        if ask.model not in settings.models:
            raise ValidationFailed(f"model: {ask.model[:200]!r} is not a configured model")
        if not model_allowed(ask.model, workload.policy.approval_models):
            raise ValidationFailed("model: not one this workload's policy puts behind approval "
                                   "(policy.approval_models)")


# --- making and ending grants ---------------------------------------------------------------


def create(conn: Connection, settings: Settings, actor: Actor, workload: Target, ask: Ask,
           now: int, approval_id: str | None = None) -> GrantRecord:
    """Grant ``ask`` to ``workload``; its budget is reserved from the tenant's and the
    organisation's budgets now (:class:`broker.errors.BudgetExhausted` when they cannot)."""
    actor.require_write()
    require_may_manage(actor, workload.roles)
    check_ask(settings, workload, ask)
    grant_id = "gr_" + secrets.token_hex(8)
    expires_at = now + ask.ttl_s
    if ask.budget_micros:
        budgets = conn.execute(
            select(_tenant.c.budgets).where(_tenant.c.id == workload.tenant_id)).scalar() or []
        refs = ledger.tenant_and_org(workload.tenant_id, budgets, settings.org.budgets)
        ledger.reserve_slice(conn, jti=grant_id, workload_id=workload.id,
                             tenant_id=workload.tenant_id, amount=ask.budget_micros,
                             budgets=refs, issued_at=now, expires_at=expires_at, kind="grant")
    conn.execute(insert(_grant).values(
        id=grant_id, tenant_id=workload.tenant_id, workload_id=workload.id,
        approval_id=approval_id, model=ask.model, tool=ask.tool, budget_micros=ask.budget_micros,
        rpm=ask.rpm,
        tpm=ask.tpm, created_at=now, expires_at=expires_at, created_by=actor.id,
        reason=ask.reason))
    record(conn, actor.id, "grant.create", grant_id,
           {"workload_id": workload.id, "tenant_id": workload.tenant_id, "model": ask.model,
            "tool": ask.tool, "budget_micros": ask.budget_micros, "rpm": ask.rpm, "tpm": ask.tpm,
            "expires_at": expires_at, "approval_id": approval_id, "reason": ask.reason}, now)
    publish(conn, LIMITS_MESSAGE, {"workload_id": workload.id})
    return get(conn, actor, grant_id)


def get(conn: Connection, actor: Actor, grant_id: str) -> GrantRecord:
    row = conn.execute(select(_grant).where(_grant.c.id == grant_id)).first()
    if row is None or not actor.sees_tenant(row.tenant_id):
        raise NotFound("no such grant")
    return _record(row, _spent(conn, grant_id))


def revoke(conn: Connection, actor: Actor, grant_id: str, reason: str | None,
           now: int) -> tuple[GrantRecord, Entry | None]:
    """End a grant now: the tokens carrying it die on every replica, the slices it funds are
    revoked, and its unspent budget returns once they are released. Revoking a grant that
    already ended changes nothing (409 when it expired: there is nothing left to revoke)."""
    grant = get(conn, actor, grant_id)
    owner = conn.execute(select(_workload.c.roles).where(_workload.c.id == grant.workload_id)).first()
    actor.require_write()
    require_may_manage(actor, list(owner[0] or []) if owner is not None else [])
    if grant.revoked_at is not None:
        return grant, None
    if grant.expires_at <= now:
        raise Conflict("the grant has expired already")
    g = _grant.c
    done = conn.execute(update(_grant).where(g.id == grant_id, g.revoked_at.is_(None))
                        .values(revoked_at=now, revoked_by=actor.id).returning(g.id)).first()
    if done is None:
        return get(conn, actor, grant_id), None
    s = _slice.c
    children = conn.execute(
        update(_slice).where(s.parent_jti == grant_id, s.released_at.is_(None),
                             s.revoked_at.is_(None))
        .values(revoked_at=now).returning(s.jti)).all()
    ledger.revoke_descendants(conn, [str(c[0]) for c in children], now)
    for (jti,) in sorted(children):
        ledger.release_slice(conn, str(jti), now)
    conn.execute(update(_slice).where(s.jti == grant_id, s.revoked_at.is_(None))
                 .values(revoked_at=now))
    returned = ledger.release_slice(conn, grant_id, now)
    entry = revocation_log.append(
        conn, kind="grant", action="revoke", target=grant_id, tenant_id=grant.tenant_id,
        cutoff=None, expires_at=grant.expires_at, relevant_until=grant.expires_at + LEEWAY_S,
        created_at=now, actor=actor.id, reason=reason)
    record(conn, actor.id, "grant.revoke", grant_id,
           {"workload_id": grant.workload_id, "tenant_id": grant.tenant_id, "reason": reason,
            "returned_micros": returned}, now)
    publish(conn, LIMITS_MESSAGE, {"workload_id": grant.workload_id})
    return get(conn, actor, grant_id), entry


def list_grants(conn: Connection, actor: Actor, *, tenant_id: str | None,
                workload_id: str | None, status: str | None, cursor: str | None, limit: int,
                now: int) -> tuple[list[GrantRecord], str | None]:
    g = _grant.c
    stmt = select(_grant).order_by(g.id).limit(limit + 1)
    if cursor:
        stmt = stmt.where(g.id > cursor)
    stmt = stmt.where(actor.scope(g.tenant_id, tenant_id))
    if workload_id is not None:
        stmt = stmt.where(g.workload_id == workload_id)
    if status == "live":
        stmt = stmt.where(g.revoked_at.is_(None), g.expires_at > now)
    elif status == "expired":
        stmt = stmt.where(g.revoked_at.is_(None), g.expires_at <= now)
    elif status == "revoked":
        stmt = stmt.where(g.revoked_at.isnot(None))
    rows, last = page(conn.execute(stmt).all(), limit)
    return [_record(r, _spent(conn, r.id)) for r in rows], None if last is None else str(last.id)


def live_for(conn: Connection, workload_id: str, now: int) -> list[GrantRecord]:
    """The workload's live grants, soonest to expire first."""
    g = _grant.c
    rows = conn.execute(
        select(_grant).where(g.workload_id == workload_id, g.revoked_at.is_(None),
                             g.expires_at > now).order_by(g.expires_at, g.id)).all()
    return [_record(r) for r in rows]


def end_finished(conn: Connection, now: int, limit: int = 200) -> int:
    """Record the end of grants that expired or were revoked, once their budget is back
    (their funded tokens' slices released first): an audit entry for each expiry, with what
    returned. Idempotent; returns how many ended."""
    g = _grant.c
    rows = conn.execute(
        select(_grant).where(g.ended_at.is_(None), (g.expires_at <= now) | g.revoked_at.isnot(None))
        .order_by(g.expires_at).limit(limit)).all()
    ended = 0
    for row in rows:
        returned = 0
        if row.budget_micros:
            ledger.release_slice(conn, row.id, now)
            left = conn.execute(select(_slice.c.released_at, _slice.c.spent_micros)
                                .where(_slice.c.jti == row.id)).first()
            if left is not None and left[0] is None:
                continue  # a token it funds is still open: its money is not all back yet
            returned = max(0, int(row.budget_micros) - int(left[1])) if left is not None else 0
        done = conn.execute(update(_grant).where(g.id == row.id, g.ended_at.is_(None))
                            .values(ended_at=now).returning(g.id)).first()
        if done is None:
            continue
        ended += 1
        if row.revoked_at is None:
            record(conn, "broker:scheduler", "grant.expire", row.id,
                   {"workload_id": row.workload_id, "tenant_id": row.tenant_id,
                    "returned_micros": returned}, now)
            publish(conn, LIMITS_MESSAGE, {"workload_id": row.workload_id})
    return ended


def raise_rates(policy: Policy, live: list[GrantRecord]) -> Policy:
    """The policy with rpm and tpm at least each live grant's."""
    rpm = max((g.rpm for g in live if g.rpm is not None), default=None)
    tpm = max((g.tpm for g in live if g.tpm is not None), default=None)
    if rpm is None and tpm is None:
        return policy
    rate = policy.rate
    base_rpm = rate.rpm if rate is not None else None
    base_tpm = rate.tpm if rate is not None else None
    return policy.model_copy(update={"rate": Rate(
        rpm=base_rpm if rpm is None or base_rpm is None else max(base_rpm, rpm),
        tpm=base_tpm if tpm is None or base_tpm is None else max(base_tpm, tpm),
    )})
