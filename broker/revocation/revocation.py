"""Revocation: revoked tokens, suspended identities, and how every replica learns of them.

The state of record is the ``revocation`` log in the database (one row per revocation,
suspension or resume) plus the ``suspended_at`` columns of workloads and tenants. Each replica
replays the log into a :class:`Denylist` held in memory, which answers the gateway's hot-path
question ("is this verified token still live?") with dictionary lookups only.

Keyed on ``jti`` and on identity cut-off times, never on the token string (decision 2). A
suspension is one cut-off per identity: every token of that identity issued at or before it is
dead for good, so a resume lets new tokens live but never revives an old one. Entries leave
memory once they can refuse nothing: a token's once it has expired, a cut-off's once every
token issued before it has.

Propagation (:class:`broker.storage.propagation.Propagator`): on PostgreSQL, each change is
announced with ``NOTIFY``
in the transaction that makes it (delivered at commit) and each replica ``LISTEN``\\s on a
dedicated connection; a periodic catch-up read of the log covers a missed notification. The
replica that made a change applies it to its own memory in the same request, so on SQLite
(one process) it takes effect at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Connection, delete, func, insert, select, text, update

from broker.errors import Conflict, InvalidRequest, NotFound
from broker.identity.identities import Actor, get_tenant, get_workload, require_may_manage
from broker.money import ledger
from broker.storage.audit import record
from broker.storage.models import Revocation, Tenant, TokenSlice, Workload
from broker.tokens.tokens import LEEWAY_S, VerifiedToken

log = logging.getLogger("broker.revocation")

_log = Revocation.__table__  # type: ignore[attr-defined]
_slice = TokenSlice.__table__  # type: ignore[attr-defined]
_workload = Workload.__table__  # type: ignore[attr-defined]
_tenant = Tenant.__table__  # type: ignore[attr-defined]

CHANNEL = "broker_events"
# No token lives longer than this (decision 1), whatever a replica's configuration says: a
# cut-off older than this plus the clock leeway can no longer refuse anything.
MAX_TOKEN_LIFETIME_S = 900
# The catch-up re-checks this much recent log, so an entry whose transaction committed after a
# later one (PostgreSQL sequence ids are not commit-ordered) is still seen.
CATCHUP_OVERLAP_S = 60
# Ids per ``IN (...)`` when the catch-up fetches the entries it lacks (under SQLite's old limit
# of 999 bound parameters).
FETCH_CHUNK = 900
# Who revokes a token whose call the provider billed above its hold.
OVERRUN_ACTOR = "broker:overrun"
# Log rows are kept this long after they stopped mattering, for ``GET /v1/admin/revocations``;
# the audit table keeps the permanent record.
LOG_RETENTION_S = 86_400


# --- request body --------------------------------------------------------------------------


class ReasonBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    reason: str | None = Field(default=None, min_length=1, max_length=512)

    @field_validator("reason")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and not value.isprintable():
            raise ValueError("reason must be printable text")
        return value


# --- log entries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One row of the revocation log, as stored and as sent in a notification."""

    id: int
    kind: str  # token | workload | tenant
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
        return cls(
            id=int(row.id), kind=row.kind, action=row.action, target=row.target,
            tenant_id=row.tenant_id, cutoff=row.cutoff, expires_at=row.expires_at,
            relevant_until=int(row.relevant_until), created_at=int(row.created_at),
            actor=row.actor, reason=row.reason,
        )

    def view(self) -> dict[str, Any]:
        return {
            "id": f"rv_{self.id}",
            "kind": self.kind,
            "action": self.action,
            "target": self.target,
            "tenant_id": self.tenant_id,
            "cutoff": _iso(self.cutoff),
            "expires_at": _iso(self.expires_at),
            "created_at": _iso(self.created_at),
            "actor": self.actor,
            "reason": self.reason,
        }


def _iso(ts: int | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# --- the in-memory denylist (the gateway's hot path) ---------------------------------------


class Denylist:
    """Answers :meth:`is_live` from memory. Implements :class:`broker.api.auth.TokenGate`.

    Writers (requests, the propagation thread) hold a lock; readers take none: each check is a
    few dictionary and set lookups, which are atomic in CPython.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Told of every entry applied (outside the lock): caches keyed on an identity (the
        # gateway's policies) drop what a change of that identity made stale.
        self.listeners: list[Callable[[Entry], None]] = []
        self._tokens: dict[str, int] = {}  # jti -> relevant until
        self._cutoffs: dict[tuple[str, str], tuple[int, int]] = {}  # key -> (cutoff, until)
        self._suspended: set[tuple[str, str]] = set()
        self._last_change: dict[tuple[str, str], int] = {}  # key -> id of the newest entry applied
        self.last_id = 0
        # The ids of the entries applied that were created inside the catch-up's window, so
        # that it can tell what it lacks without reading the window's entries again. Bounded
        # by time: ids leave once their creation falls behind the window.
        self._recent: set[int] = set()
        self._recent_by_second: dict[int, list[int]] = {}  # created_at -> ids
        self._recent_sum = 0
        self._horizon = 0

    def is_live(self, token: VerifiedToken) -> bool:
        if token.jti in self._tokens:
            return False
        if not self._cutoffs and not self._suspended:
            return True
        for key in (("workload", token.sub), ("tenant", token.tenant)):
            if key in self._suspended:
                return False
            cut = self._cutoffs.get(key)
            if cut is not None and token.iat <= cut[0]:
                return False
        return True

    def __len__(self) -> int:
        return len(self._tokens) + len(self._cutoffs) + len(self._suspended)

    def apply(self, entry: Entry) -> None:
        """Idempotent: applying an entry twice, or an older entry after a newer one for the
        same identity, leaves the state as it was."""
        self._apply(entry)
        for listener in self.listeners:
            listener(entry)

    def _apply(self, entry: Entry) -> None:
        with self._lock:
            self.last_id = max(self.last_id, entry.id)
            if entry.created_at >= self._horizon and entry.id not in self._recent:
                self._recent.add(entry.id)
                self._recent_by_second.setdefault(entry.created_at, []).append(entry.id)
                self._recent_sum += entry.id
            if entry.kind == "token":
                if entry.relevant_until > int(time.time()):
                    self._tokens[entry.target] = max(
                        self._tokens.get(entry.target, 0), entry.relevant_until
                    )
                return
            key = (entry.kind, entry.target)
            if entry.cutoff is not None:
                self._raise_cutoff(key, entry.cutoff)
            if entry.action == "cut":
                return  # a cut-off alone: it neither suspends nor resumes
            if entry.id <= self._last_change.get(key, 0):
                return
            self._last_change[key] = entry.id
            if entry.action == "suspend":
                self._suspended.add(key)
            elif entry.action == "resume":
                self._suspended.discard(key)

    def _raise_cutoff(self, key: tuple[str, str], cutoff: int) -> None:
        old = self._cutoffs.get(key)
        if old is None or cutoff > old[0]:
            self._cutoffs[key] = (cutoff, cutoff + MAX_TOKEN_LIFETIME_S + LEEWAY_S)

    def has_applied(self, entry_id: int) -> bool:
        """Whether an entry created inside the catch-up's window has been applied here."""
        return entry_id in self._recent

    def applied_since(self, horizon: int) -> tuple[int, int, int]:
        """Forget the applied ids of entries created before ``horizon`` (or before a later
        horizon given earlier: what is forgotten stays so) and return (how many remain, their
        sum, :attr:`last_id`), all read at once."""
        with self._lock:
            self._horizon = max(self._horizon, horizon)
            for second in [s for s in self._recent_by_second if s < self._horizon]:
                for entry_id in self._recent_by_second.pop(second):
                    self._recent.discard(entry_id)
                    self._recent_sum -= entry_id
            return len(self._recent), self._recent_sum, self.last_id

    def reset_suspended(self, suspended: dict[tuple[str, str], int]) -> None:
        """Take the suspension state of the identity tables as the truth (at load)."""
        with self._lock:
            self._suspended = set(suspended)
            for key, cutoff in suspended.items():
                self._raise_cutoff(key, cutoff)

    def prune(self, now: int) -> int:
        """Forget entries that can no longer refuse a live token; returns how many went."""
        with self._lock:
            gone = [jti for jti, until in self._tokens.items() if until <= now]
            for jti in gone:
                del self._tokens[jti]
            old = [k for k, (_c, until) in self._cutoffs.items()
                   if until <= now and k not in self._suspended]
            for key in old:
                del self._cutoffs[key]
                self._last_change.pop(key, None)
            return len(gone) + len(old)


# --- reading and writing the log -----------------------------------------------------------


def apply_here(gate: object, entry: Entry | None) -> None:
    """This replica need not wait for its own notification: the change holds from the
    response on (and on SQLite there is no other replica to tell)."""
    if entry is not None and isinstance(gate, Denylist):
        gate.apply(entry)


def _append(conn: Connection, **values: Any) -> Entry:
    row = conn.execute(insert(_log).values(**values).returning(*_log.c)).one()
    entry = Entry.from_row(row)
    # Delivered to every listener when (and only if) this transaction commits. It carries only
    # the id: listeners read the entry itself from the log, so a forged notification (anyone
    # who can connect may NOTIFY) can make a replica read, but never change, its denylist.
    notify(conn, {"type": "revocation", "id": entry.id})
    return entry


def notify(conn: Connection, message: dict[str, Any]) -> None:
    """Announce a change to every replica at commit (PostgreSQL; a no-op on SQLite)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_notify(:channel, :payload)"),
                     {"channel": CHANNEL, "payload": json.dumps(message)})


def read_entry(conn: Connection, entry_id: int) -> Entry | None:
    row = conn.execute(select(_log).where(_log.c.id == entry_id)).first()
    return None if row is None else Entry.from_row(row)


def load(conn: Connection, denylist: Denylist, now: int) -> None:
    """Fill a fresh denylist: every log entry that still matters, then the suspensions in
    force according to the identity tables (which outlive pruned log entries)."""
    denylist.applied_since(now - CATCHUP_OVERLAP_S)
    # Through the index on ``relevant_until``, not the whole day of log kept; in any order, as
    # applying is (see Denylist.apply).
    for row in conn.execute(select(_log).where(_log.c.relevant_until > now)):
        denylist.apply(Entry.from_row(row))
    top = conn.execute(select(_log.c.id).order_by(_log.c.id.desc()).limit(1)).first()
    if top is not None:
        denylist.last_id = max(denylist.last_id, int(top[0]))
    suspended: dict[tuple[str, str], int] = {}
    for kind, table in (("workload", _workload), ("tenant", _tenant)):
        for ident, at in conn.execute(
            select(table.c.id, table.c.suspended_at).where(table.c.suspended_at.isnot(None))
        ).all():
            suspended[(kind, str(ident))] = int(at)
    denylist.reset_suspended(suspended)


def catch_up(conn: Connection, denylist: Denylist, now: int) -> int:
    """Apply log entries this replica may have missed; returns how many were read.

    Two kinds can be missing: entries numbered above the highest one applied (read by primary
    key), and entries of the last :data:`CATCHUP_OVERLAP_S` numbered below it, whose
    transactions committed after a later-numbered one was applied. For the second kind the
    database counts and sums the window's ids through the index on ``created_at``, and the
    denylist compares them with the ids it applied from that window: when they agree nothing
    is missing (every id applied is of a committed row), so a mass revocation is not read
    again on every tick. Only when they differ are the window's ids read, and only the entries
    missing from memory fetched.
    """
    c = _log.c
    rows = list(conn.execute(select(_log).where(c.id > denylist.last_id).order_by(c.id)))
    for row in rows:
        denylist.apply(Entry.from_row(row))
    since = now - CATCHUP_OVERLAP_S
    count, total, last_id = denylist.applied_since(since)
    window = (c.created_at >= since, c.id <= last_id)
    found = conn.execute(select(func.count(), func.coalesce(func.sum(c.id), 0)).where(*window)).one()
    # The sum too: a row deleted by hand and a late one arriving in the same tick would
    # balance the count alone.
    if (int(found[0]), int(found[1])) == (count, total):
        return len(rows)
    missing = [i for i in conn.execute(select(c.id).where(*window)).scalars()
               if not denylist.has_applied(i)]
    late: list[Any] = []
    for start in range(0, len(missing), FETCH_CHUNK):
        late.extend(conn.execute(select(_log).where(c.id.in_(missing[start:start + FETCH_CHUNK]))))
    for row in late:
        denylist.apply(Entry.from_row(row))
    return len(rows) + len(late)


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


def list_entries(
    conn: Connection, actor: Actor, *, cursor: str | None, limit: int,
    tenant_id: str | None = None, kind: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first; a tenant-admin sees only its own tenant's entries."""
    c = _log.c
    stmt = select(_log).order_by(c.id.desc()).limit(limit + 1)
    if cursor is not None:
        raw = cursor.removeprefix("rv_")
        if not raw.isdigit() or len(raw) > 18:
            raise InvalidRequest("cursor is not valid")
        stmt = stmt.where(c.id < int(raw))
    if tenant_id is not None:
        if not actor.sees_tenant(tenant_id):
            return [], None
        stmt = stmt.where(c.tenant_id == tenant_id)
    elif not actor.org_wide:
        stmt = stmt.where(c.tenant_id == actor.tenant_id)
    if kind is not None:
        if kind not in ("token", "workload", "tenant"):
            raise InvalidRequest("kind must be token, workload or tenant")
        stmt = stmt.where(c.kind == kind)
    items = [Entry.from_row(r).view() for r in conn.execute(stmt).all()]
    if len(items) > limit:
        return items[:limit], str(items[limit - 1]["id"])
    return items, None


# --- the operations (each inside the caller's transaction) ---------------------------------


def _revoke_slices(conn: Connection, column: str, ident: str, cutoff: int, now: int) -> int:
    """Mark every live slice of an identity issued at or before ``cutoff`` revoked and return
    its unspent money now; a slice with a hold still open is released by the sweeper once the
    hold closes. Returns the micro-dollars returned now."""
    s = _slice.c
    jtis = conn.execute(
        update(_slice)
        .where(s[column] == ident, s.released_at.is_(None), s.revoked_at.is_(None),
               s.issued_at <= cutoff)
        .values(revoked_at=now)
        .returning(s.jti)
    ).all()
    return sum(ledger.release_slice(conn, str(j[0]), now) for j in sorted(jtis))


def revoke_token(
    conn: Connection, actor: Actor, jti: str, reason: str | None, now: int
) -> tuple[dict[str, Any], Entry | None]:
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
        previous = conn.execute(
            select(_log).where(_log.c.kind == "token", _log.c.target == jti)
            .order_by(_log.c.id.desc()).limit(1)
        ).first()
        view = Entry.from_row(previous).view() if previous is not None else {
            "kind": "token", "action": "revoke", "target": jti, "tenant_id": row.tenant_id}
        return {**view, "returned_micros": 0}, None
    returned = ledger.release_slice(conn, jti, now)
    entry = _append(
        conn, kind="token", action="revoke", target=jti, tenant_id=row.tenant_id,
        cutoff=None, expires_at=int(row.expires_at),
        relevant_until=int(row.expires_at) + LEEWAY_S, created_at=now, actor=actor.id,
        reason=reason,
    )
    record(conn, actor.id, "token.revoke", jti,
           {"reason": reason, "workload_id": row.workload_id, "tenant_id": row.tenant_id,
            "returned_micros": returned}, now)
    return {**entry.view(), "returned_micros": returned}, entry


def _suspension_entry(
    conn: Connection, actor: Actor, kind: str, target: str, tenant_id: str, action: str,
    cutoff: int, reason: str | None, now: int,
) -> Entry:
    return _append(
        conn, kind=kind, action=action, target=target, tenant_id=tenant_id, cutoff=cutoff,
        expires_at=None, relevant_until=max(cutoff + MAX_TOKEN_LIFETIME_S + LEEWAY_S, now),
        created_at=now, actor=actor.id, reason=reason,
    )


def suspend_workload(
    conn: Connection, actor: Actor, workload_id: str, reason: str | None, now: int
) -> tuple[dict[str, Any], Entry | None]:
    """Suspend a workload: its live tokens die, its new exchanges are refused (as a wrong
    secret is), and the unspent part of its slices returns."""
    view = get_workload(conn, actor, workload_id)
    require_may_manage(actor, view["roles"])
    if workload_id == actor.id:
        raise Conflict("an admin cannot suspend its own identity")
    w = _workload.c
    # The UPDATE comes before the log insert: it locks the row, so entries for one identity
    # are numbered in the order their transactions commit.
    done = conn.execute(
        update(_workload).where(w.id == workload_id, w.suspended_at.is_(None))
        .values(suspended_at=now).returning(w.id)
    ).first()
    if done is None:
        return view, None
    returned = _revoke_slices(conn, "workload_id", workload_id, now, now)
    entry = _suspension_entry(conn, actor, "workload", workload_id, view["tenant_id"],
                              "suspend", now, reason, now)
    record(conn, actor.id, "workload.suspend", workload_id,
           {"reason": reason, "tenant_id": view["tenant_id"], "returned_micros": returned}, now)
    return get_workload(conn, actor, workload_id), entry


def suspension_cutoff(conn: Connection, actor: Actor, kind: str, ident: str) -> int | None:
    """The cut-off of a suspension in force (None when not suspended), for an actor who may
    see the identity."""
    if kind == "workload":
        get_workload(conn, actor, ident)
        value = conn.execute(select(_workload.c.suspended_at).where(_workload.c.id == ident))
    else:
        get_tenant(conn, actor, ident)
        value = conn.execute(select(_tenant.c.suspended_at).where(_tenant.c.id == ident))
    found = value.scalar()
    return None if found is None else int(found)


def resume_workload(
    conn: Connection, actor: Actor, workload_id: str, reason: str | None, now: int
) -> tuple[dict[str, Any], Entry | None]:
    """Let a workload get tokens again; tokens issued before its suspension stay dead."""
    view = get_workload(conn, actor, workload_id)
    require_may_manage(actor, view["roles"])
    w = _workload.c
    cutoff = conn.execute(select(w.suspended_at).where(w.id == workload_id)).scalar()
    if cutoff is None:
        return view, None
    done = conn.execute(
        update(_workload).where(w.id == workload_id, w.suspended_at == cutoff)
        .values(suspended_at=None).returning(w.id)
    ).first()
    if done is None:
        raise Conflict("the workload changed meanwhile; try again")
    entry = _suspension_entry(conn, actor, "workload", workload_id, view["tenant_id"],
                              "resume", int(cutoff), reason, now)
    record(conn, actor.id, "workload.resume", workload_id,
           {"reason": reason, "tenant_id": view["tenant_id"]}, now)
    return get_workload(conn, actor, workload_id), entry


def cut_workload(
    conn: Connection, actor: Actor, workload_id: str, tenant_id: str, reason: str, now: int
) -> Entry:
    """End every live token of a workload without suspending it: its identity changed (roles,
    kind or policy), so tokens minted under the old one must not outlive the change. New
    exchanges work at once; the unspent part of the cut slices returns."""
    returned = _revoke_slices(conn, "workload_id", workload_id, now, now)
    entry = _suspension_entry(conn, actor, "workload", workload_id, tenant_id, "cut", now,
                              reason, now)
    record(conn, actor.id, "workload.tokens_cut", workload_id,
           {"reason": reason, "tenant_id": tenant_id, "returned_micros": returned}, now)
    return entry


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
    return _append(
        conn, kind="token", action="revoke", target=jti, tenant_id=tenant_id, cutoff=None,
        expires_at=int(row[0]), relevant_until=int(row[0]) + LEEWAY_S, created_at=now,
        actor=OVERRUN_ACTOR, reason="the provider billed more than the broker held",
    )


def suspend_tenant(
    conn: Connection, actor: Actor, tenant_id: str, reason: str | None, now: int
) -> tuple[dict[str, Any], Entry | None]:
    """The tenant kill switch: every token of every workload of the tenant dies at once."""
    view = get_tenant(conn, actor, tenant_id)
    if tenant_id == actor.tenant_id:
        raise Conflict("an admin cannot suspend its own tenant")
    t = _tenant.c
    done = conn.execute(
        update(_tenant).where(t.id == tenant_id, t.suspended_at.is_(None))
        .values(suspended_at=now).returning(t.id)
    ).first()
    if done is None:
        return view, None
    returned = _revoke_slices(conn, "tenant_id", tenant_id, now, now)
    entry = _suspension_entry(conn, actor, "tenant", tenant_id, tenant_id, "suspend", now,
                              reason, now)
    record(conn, actor.id, "tenant.suspend", tenant_id,
           {"reason": reason, "returned_micros": returned}, now)
    return get_tenant(conn, actor, tenant_id), entry


def resume_tenant(
    conn: Connection, actor: Actor, tenant_id: str, reason: str | None, now: int
) -> tuple[dict[str, Any], Entry | None]:
    view = get_tenant(conn, actor, tenant_id)
    t = _tenant.c
    cutoff = conn.execute(select(t.suspended_at).where(t.id == tenant_id)).scalar()
    if cutoff is None:
        return view, None
    done = conn.execute(
        update(_tenant).where(t.id == tenant_id, t.suspended_at == cutoff)
        .values(suspended_at=None).returning(t.id)
    ).first()
    if done is None:
        raise Conflict("the tenant changed meanwhile; try again")
    entry = _suspension_entry(conn, actor, "tenant", tenant_id, tenant_id, "resume",
                              int(cutoff), reason, now)
    record(conn, actor.id, "tenant.resume", tenant_id, {"reason": reason}, now)
    return get_tenant(conn, actor, tenant_id), entry
