"""Revoking: a token by ``jti``, a workload or tenant by suspension (and its resume), a
workload's live tokens by a cut when its identity changed, and a token whose call cost more than
its hold.

Each runs inside the caller's transaction, writes the revocation log
(:mod:`broker.revocation.log`, which tells every replica), returns the unspent money of the
slices it ends, and writes the audit table. Each returns the new log entry (None when nothing
changed) for the caller to apply here at once (:func:`broker.revocation.denylist.apply_here`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Connection,
    Table,
    case,
    literal,
    select,
    update,
)

from broker.errors import Conflict, NotFound
from broker.identity.identities import (
    Actor,
    TenantRecord,
    WorkloadRecord,
    get_tenant,
    get_workload,
    require_may_manage,
)
from broker.money import ledger, releases
from broker.revocation import log as revocation_log
from broker.revocation.log import Entry, cutoff_relevant_until
from broker.storage.audit import record
from broker.storage.db import db_now
from broker.storage.models import (
    BudgetCounter,
    LiveSlices,
    SliceCounter,
    Tenant,
    TokenSlice,
    Workload,
)
from broker.tokens.tokens import LEEWAY_S

_slice = TokenSlice.__table__  # type: ignore[attr-defined]
_workload = Workload.__table__  # type: ignore[attr-defined]
_tenant = Tenant.__table__  # type: ignore[attr-defined]
_link = SliceCounter.__table__  # type: ignore[attr-defined]
_counter = BudgetCounter.__table__  # type: ignore[attr-defined]
_live = LiveSlices.__table__  # type: ignore[attr-defined]

# Who revokes a token whose call the provider billed above its hold.
OVERRUN_ACTOR = "broker:overrun"

IdentityKind = Literal["workload", "tenant"]


def _revoke_slices(conn: Connection, column: str, ident: str, cutoff: int, now: int) -> int:
    """Mark every live slice of an identity issued at or before ``cutoff`` revoked, with the
    tokens delegated from them, and return their unspent money now; a slice with a hold still
    open is released by the sweeper once the hold closes. Returns the micro-dollars the
    identity's own slices returned now.

    Set-based, as a workload may hold 100,000 live tokens and more: a constant number of
    statements (plus a few per level of delegation), whatever their number, where
    :func:`broker.money.ledger.release_slice` takes several per slice. The effects are the
    ledger's, slice by slice (tests/test_mass_revocation.py compares the two)."""
    s = _slice.c
    # Revoked and, when nothing holds part of it, released in the same statement: each
    # statement rewrites every row it touches, the slowest part of a mass suspension.
    rows = releases.released_rows(conn.execute(
        update(_slice)
        .where(s[column] == ident, s.kind == "token", s.released_at.is_(None),
               s.revoked_at.is_(None), s.issued_at <= cutoff)
        .values(revoked_at=now,
                released_at=case((s.held_micros == 0, literal(now, BigInteger)), else_=None))
        .returning(*releases.RELEASED)
    ))
    own = {r.jti for r in rows}
    released = [r for r in rows if r.released_at is not None]
    returned = releases.unspent(released)
    releases.give_back(conn, released)
    # Tokens delegated from these die with them, whoever they were delegated to.
    descendants = releases.revoke_descendants(conn, sorted(own), now)
    held = [r.jti for r in rows if r.released_at is None]
    return returned + releases.release_slices(conn, [*held, *descendants], own, now)


# --- tokens --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRevocation:
    """What revoking a token did: ``entry`` is the new log entry, None when the token was
    already revoked (``previous`` is then that revocation, while the log still keeps it)."""

    jti: str
    tenant_id: str
    returned_micros: int
    entry: Entry | None
    previous: Entry | None = None


def revoke_token(
    conn: Connection, actor: Actor, jti: str, reason: str | None, now: int
) -> TokenRevocation:
    """Revoke one token by ``jti`` and return its unspent slice to the budgets. Revoking an
    already revoked token changes nothing and answers the same."""
    s = _slice.c
    row = conn.execute(
        select(s.tenant_id, s.workload_id, s.expires_at).where(s.jti == jti)
    ).first()
    if row is None or not actor.sees_tenant(row.tenant_id):
        raise NotFound("no such token")
    owner = conn.execute(select(_workload.c.roles).where(_workload.c.id == row.workload_id)).first()
    require_may_manage(actor, owner[0] if owner is not None else [])
    marked = conn.execute(
        update(_slice).where(s.jti == jti, s.revoked_at.is_(None)).values(revoked_at=now)
        .returning(s.jti)
    ).first()
    if marked is None:
        previous = revocation_log.latest_for(conn, "token", jti)
        return TokenRevocation(jti, row.tenant_id, 0, None, previous)
    ledger.revoke_descendants(conn, [jti], now)
    returned = ledger.release_slice(conn, jti, now)
    entry = revocation_log.append(
        conn, kind="token", action="revoke", target=jti, tenant_id=row.tenant_id,
        cutoff=None, expires_at=int(row.expires_at),
        relevant_until=int(row.expires_at) + LEEWAY_S, created_at=now, actor=actor.id,
        reason=reason,
    )
    record(conn, actor.id, "token.revoke", jti,
           {"reason": reason, "workload_id": row.workload_id, "tenant_id": row.tenant_id,
            "returned_micros": returned}, now)
    return TokenRevocation(jti, row.tenant_id, returned, entry)


def revoke_for_overrun(
    conn: Connection, *, jti: str, workload_id: str, tenant_id: str, excess: int,
    detail: dict[str, Any], now: int,
) -> Entry | None:
    """Refuse a token from now on, everywhere, because the provider billed one of its calls
    more than the broker held (an overrun): the bound was wrong for this caller's requests, so
    none of them should go on. The charge itself is already in the ledger."""
    s = _slice.c
    row = conn.execute(
        update(_slice).where(s.jti == jti, s.revoked_at.is_(None)).values(revoked_at=now)
        .returning(s.expires_at)
    ).first()
    record(conn, OVERRUN_ACTOR, "usage.overrun", jti,
           {**detail, "workload_id": workload_id, "tenant_id": tenant_id,
            "excess_micros": excess}, now)
    if row is None:
        return None  # already revoked: the audit entry above still tells of this overrun
    ledger.revoke_descendants(conn, [jti], now)
    # Released at once (unless another call still holds part of it: the sweeper then does it
    # later), so that the budgets above show the overrun now: they learn a slice's spending
    # at its release.
    ledger.release_slice(conn, jti, now)
    return revocation_log.append(
        conn, kind="token", action="revoke", target=jti, tenant_id=tenant_id, cutoff=None,
        expires_at=int(row[0]), relevant_until=int(row[0]) + LEEWAY_S, created_at=now,
        actor=OVERRUN_ACTOR, reason="the provider billed more than the broker held",
    )


# --- identities: suspend, resume, cut ------------------------------------------------------


def _table(kind: IdentityKind) -> Table:
    table: Table = _workload if kind == "workload" else _tenant
    return table


def _view(conn: Connection, actor: Actor, kind: IdentityKind,
          ident: str) -> WorkloadRecord | TenantRecord:
    """The identity as the actor sees it (NotFound when it may not)."""
    if kind == "workload":
        return get_workload(conn, actor, ident)
    return get_tenant(conn, actor, ident)


def _managed(conn: Connection, actor: Actor, kind: IdentityKind,
             ident: str) -> tuple[WorkloadRecord | TenantRecord, str]:
    """The identity and its tenant, for an actor who may manage it."""
    view = _view(conn, actor, kind, ident)
    if isinstance(view, WorkloadRecord):
        require_may_manage(actor, view.roles)
        return view, view.tenant_id
    return view, ident


def _cut_entry(
    conn: Connection, actor: Actor, kind: IdentityKind, target: str, tenant_id: str,
    action: str, cutoff: int, reason: str | None, now: int,
) -> Entry:
    return revocation_log.append(
        conn, kind=kind, action=action, target=target, tenant_id=tenant_id, cutoff=cutoff,
        expires_at=None, relevant_until=max(cutoff_relevant_until(cutoff), now),
        created_at=now, actor=actor.id, reason=reason,
    )


def _audit_detail(kind: IdentityKind, reason: str | None, tenant_id: str) -> dict[str, Any]:
    # A tenant's own entry needs no tenant_id: it is the target.
    return {"reason": reason, "tenant_id": tenant_id} if kind == "workload" else {"reason": reason}


def suspend(
    conn: Connection, actor: Actor, kind: IdentityKind, ident: str, reason: str | None, now: int
) -> tuple[WorkloadRecord | TenantRecord, Entry | None]:
    """Suspend a workload or a whole tenant (the kill switch): its live tokens die, its new
    exchanges are refused (as a wrong secret is), and the unspent part of its slices returns.
    Returns the identity's view and the new entry (None when already suspended)."""
    view, tenant_id = _managed(conn, actor, kind, ident)
    if ident == (actor.id if kind == "workload" else actor.tenant_id):
        raise Conflict(f"an admin cannot suspend its own {'identity' if kind == 'workload' else 'tenant'}")
    table = _table(kind)
    # Read from the clock that dated the tokens' iat (broker.storage.db.db_now): this
    # replica's own may be seconds off the issuer's.
    cutoff = db_now(conn, now)
    # The UPDATE comes before the log insert: it locks the row, so entries for one identity
    # are numbered in the order their transactions commit.
    done = conn.execute(
        update(table).where(table.c.id == ident, table.c.suspended_at.is_(None))
        .values(suspended_at=cutoff).returning(table.c.id)
    ).first()
    if done is None:
        return view, None
    returned = _revoke_slices(conn, f"{kind}_id", ident, cutoff, now)
    entry = _cut_entry(conn, actor, kind, ident, tenant_id, "suspend", cutoff, reason, now)
    record(conn, actor.id, f"{kind}.suspend", ident,
           {**_audit_detail(kind, reason, tenant_id), "returned_micros": returned}, now,
           tenant_id=tenant_id)
    return _view(conn, actor, kind, ident), entry


def resume(
    conn: Connection, actor: Actor, kind: IdentityKind, ident: str, reason: str | None, now: int
) -> tuple[WorkloadRecord | TenantRecord, Entry | None]:
    """Let a workload or tenant get tokens again; tokens issued before its suspension stay
    dead. Returns the identity's view and the new entry (None when it was not suspended)."""
    view, tenant_id = _managed(conn, actor, kind, ident)
    table = _table(kind)
    cutoff = conn.execute(select(table.c.suspended_at).where(table.c.id == ident)).scalar()
    if cutoff is None:
        return view, None
    done = conn.execute(
        update(table).where(table.c.id == ident, table.c.suspended_at == cutoff)
        .values(suspended_at=None).returning(table.c.id)
    ).first()
    if done is None:
        raise Conflict(f"the {kind} changed meanwhile; try again")
    entry = _cut_entry(conn, actor, kind, ident, tenant_id, "resume", int(cutoff), reason, now)
    record(conn, actor.id, f"{kind}.resume", ident, _audit_detail(kind, reason, tenant_id), now,
           tenant_id=tenant_id)
    return _view(conn, actor, kind, ident), entry


def suspension_cutoff(conn: Connection, actor: Actor, kind: IdentityKind, ident: str) -> int | None:
    """The cut-off of a suspension in force (None when not suspended), for an actor who may
    see the identity."""
    _view(conn, actor, kind, ident)
    table = _table(kind)
    found = conn.execute(select(table.c.suspended_at).where(table.c.id == ident)).scalar()
    return None if found is None else int(found)


def cut_workload(
    conn: Connection, actor: Actor, workload_id: str, tenant_id: str, reason: str, now: int
) -> Entry:
    """End every live token of a workload without suspending it: its identity changed (roles,
    kind or policy), so tokens minted under the old one must not outlive the change. New
    exchanges work at once; the unspent part of the cut slices returns."""
    cutoff = db_now(conn, now)  # the tokens' clock, as in suspend()
    returned = _revoke_slices(conn, "workload_id", workload_id, cutoff, now)
    entry = _cut_entry(conn, actor, "workload", workload_id, tenant_id, "cut", cutoff, reason, now)
    record(conn, actor.id, "workload.tokens_cut", workload_id,
           {"reason": reason, "tenant_id": tenant_id, "returned_micros": returned}, now)
    return entry
