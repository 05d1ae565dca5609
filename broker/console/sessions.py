"""Console sessions, kept on the server (table ``console_session``).

The browser holds a random session id in an HttpOnly, ``SameSite=Strict`` cookie; the table
holds only its HMAC keyed with the pepper, so neither a copy of the database nor a log line of
it can sign anyone in. A session records who proved what at sign-in, and ends at the first of:
its own lifetime (``console.session_ttl_s``), ``console.idle_timeout_s`` without a request, the
expiry of the token it was opened with, sign-out, or anything that would end that identity's
tokens: a suspension of it or its tenant, a change of its roles, its deletion, the revocation of
the pasted token. Each request asks the revocation gate (as the API's bearer check does) and the
identity's row, so an admin's kill switch ends a console session at its next request.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import Connection, delete, insert, select, update
from starlette.requests import Request
from starlette.responses import Response

from broker.console.csrf import derive, session_token
from broker.identity.identities import Actor, Client, find_by_workload_id
from broker.services import Services
from broker.storage.audit import record
from broker.storage.console_models import ConsoleSession, prune_sessions
from broker.storage.models import TokenSlice
from broker.tokens import delegation
from broker.tokens.tokens import VerifiedToken

_session = ConsoleSession.__table__  # type: ignore[attr-defined]
_slice = TokenSlice.__table__  # type: ignore[attr-defined]

ADMIN_ROLES = frozenset({"org-admin", "tenant-admin", "auditor"})
COOKIE = "broker_console"
PRE_COOKIE = "broker_console_pre"
# The pre-session cookie only protects the sign-in form: an hour to fill it in.
PRE_TTL_S = 3600
# ``last_seen`` is written at most this often: a page view is otherwise a read only.
TOUCH_EVERY_S = 30


# --- cookies ------------------------------------------------------------------------------


def is_https(request: Request) -> bool:
    """Whether the browser reached the broker over HTTPS: directly, or through a proxy that
    ended TLS and said so in ``X-Forwarded-Proto``. The header is believed from anyone: a
    forged "https" only makes this caller's own cookie stricter (``Secure``), which its
    browser then keeps from plain HTTP; it can weaken nobody's."""
    if request.url.scheme == "https":
        return True
    forwarded = request.headers.get("x-forwarded-proto", "")
    return forwarded.split(",")[0].strip().lower() == "https"


def cookie_name(https: bool, *, pre: bool = False) -> str:
    """``__Host-`` over HTTPS: the browser then refuses the cookie unless it is ``Secure``, of
    this host only (no ``Domain``) and for path ``/``, so no sibling subdomain can plant or
    shadow it. Over plain HTTP (a laptop, a test) the prefix is not allowed, and the cookie is
    kept to ``/console``."""
    base = PRE_COOKIE if pre else COOKIE
    return f"__Host-{base}" if https else base


def set_cookie(response: Response, request: Request, value: str, max_age: int, *,
               pre: bool = False) -> None:
    https = is_https(request)
    response.set_cookie(cookie_name(https, pre=pre), value, max_age=max(0, max_age),
                        path="/" if https else "/console", secure=https, httponly=True,
                        samesite="strict")


def clear_cookie(response: Response, request: Request, *, pre: bool = False) -> None:
    https = is_https(request)
    response.delete_cookie(cookie_name(https, pre=pre), path="/" if https else "/console",
                           secure=https, httponly=True, samesite="strict")


def cookie_value(request: Request, *, pre: bool = False) -> str | None:
    value = request.cookies.get(cookie_name(is_https(request), pre=pre))
    # Ids are token_urlsafe(32): anything else is no id of ours, and is not looked up.
    if value is None or not (20 <= len(value) <= 64) or not value.isascii():
        return None
    return value


# --- what a sign-in proved ------------------------------------------------------------------


@dataclass(frozen=True)
class Proof:
    """Who signed in and how: by client secret, or with a pasted token (its jti and expiry)."""

    actor: Actor
    method: str  # "secret" | "token"
    proven_at: int  # on the database's clock: a token's iat, or the sign-in's second
    token_jti: str | None = None
    token_exp: int | None = None


@dataclass(frozen=True)
class Session:
    id: str
    actor: Actor
    method: str
    expires_at: int
    csrf: str


def id_hash(pepper: bytes, session_id: str) -> str:
    return derive(pepper, "console-session", session_id)


def _roles_text(roles: frozenset[str]) -> str:
    return " ".join(sorted(roles & ADMIN_ROLES))


async def create(svc: Services, proof: Proof, now: int) -> tuple[str, int]:
    """A new session for ``proof``; (its id, for the cookie only, and its lifetime in seconds).
    Sessions already over are deleted on the way, so the table holds only live ones."""
    console = svc.settings.console
    session_id = secrets.token_urlsafe(32)
    expires = now + console.session_ttl_s
    if proof.token_exp is not None:
        expires = min(expires, proof.token_exp)
    actor = proof.actor

    def txn(conn: Connection) -> None:
        prune_sessions(conn, now, console.idle_timeout_s)
        conn.execute(insert(_session).values(
            id_hash=id_hash(svc.pepper, session_id), workload_id=actor.id,
            tenant_id=actor.tenant_id, roles=_roles_text(actor.roles), method=proof.method,
            token_jti=proof.token_jti, token_exp=proof.token_exp, proven_at=proof.proven_at,
            created_at=now, expires_at=expires, last_seen=now))
        # A console session is an admin's credential: who opened one, and how, is on record
        # (a failed sign-in is not: anyone could fill the chain with those).
        record(conn, actor.id, "console.sign_in", actor.id,
               {"method": proof.method, "roles": sorted(actor.roles)}, now,
               tenant_id=actor.tenant_id)

    await svc.db.run(txn)
    return session_id, expires - now


async def end(svc: Services, session_id: str) -> None:
    digest = id_hash(svc.pepper, session_id)
    await svc.db.run(lambda conn: conn.execute(
        delete(_session).where(_session.c.id_hash == digest)))


@dataclass(frozen=True)
class _Stored:
    """A session's row, with what its liveness depends on read in the same transaction."""

    id_hash: str
    workload_id: str
    tenant_id: str
    roles: frozenset[str]
    method: str
    token_jti: str | None
    token_exp: int | None
    proven_at: int
    expires_at: int
    last_seen: int
    client: Client | None
    token_revoked: bool


def _read(conn: Connection, digest: str) -> _Stored | None:
    s = _session.c
    row = conn.execute(select(_session).where(s.id_hash == digest)).first()
    if row is None:
        return None
    revoked = False
    if row.token_jti is not None:
        found = conn.execute(select(_slice.c.revoked_at).where(
            _slice.c.jti == row.token_jti)).first()
        revoked = found is not None and found[0] is not None
    return _Stored(
        id_hash=str(row.id_hash), workload_id=str(row.workload_id), tenant_id=str(row.tenant_id),
        roles=frozenset(str(row.roles).split()), method=str(row.method),
        token_jti=row.token_jti, token_exp=None if row.token_exp is None else int(row.token_exp),
        proven_at=int(row.proven_at), expires_at=int(row.expires_at),
        last_seen=int(row.last_seen), client=find_by_workload_id(conn, row.workload_id),
        token_revoked=revoked)


async def load(svc: Services, session_id: str) -> Session | None:
    """The live session of this id, or None (a session found dead is deleted)."""
    digest = id_hash(svc.pepper, session_id)
    stored = await svc.db.read(lambda conn: _read(conn, digest))
    if stored is None:
        return None
    now = int(time.time())
    # The lookup went by the digest; compared once more in constant time all the same.
    if not hmac.compare_digest(stored.id_hash, digest) or not _alive(svc, stored, now):
        await end(svc, session_id)
        return None
    if now - stored.last_seen >= TOUCH_EVERY_S:
        await svc.db.run(lambda conn: conn.execute(
            update(_session).where(_session.c.id_hash == digest).values(last_seen=now)))
    actor = Actor(id=stored.workload_id, tenant_id=stored.tenant_id, roles=stored.roles)
    return Session(id=session_id, actor=actor, method=stored.method,
                   expires_at=stored.expires_at, csrf=session_token(svc.pepper, session_id))


def _alive(svc: Services, stored: _Stored, now: int) -> bool:
    if now >= stored.expires_at or now - stored.last_seen >= svc.settings.console.idle_timeout_s:
        return False
    if stored.token_revoked or (stored.token_exp is not None and now >= stored.token_exp):
        return False
    # The identity as it is now: gone, suspended (itself or its tenant), moved or given other
    # roles, and the session is over; a new sign-in proves the new state.
    client = stored.client
    if client is None or client.suspended_at is not None or \
            client.tenant_suspended_at is not None or client.kind != "admin" or \
            client.tenant_id != stored.tenant_id or \
            frozenset(client.roles) & ADMIN_ROLES != stored.roles:
        return False
    # The revocation gate, asked as the API asks it of a bearer token: with the pasted token's
    # own jti, or for a session opened by secret a jti no token has, so that only the
    # identity's cut-offs (suspensions, role changes) apply, against the second it was proven.
    probe = VerifiedToken(
        sub=stored.workload_id, tenant=stored.tenant_id, kind="admin",
        jti=stored.token_jti or f"console-{stored.id_hash[:16]}", iat=stored.proven_at,
        exp=stored.expires_at, models=(), budget_micros=0, roles=tuple(sorted(stored.roles)),
        act=None, claims={})
    return delegation.is_live(svc, probe)
