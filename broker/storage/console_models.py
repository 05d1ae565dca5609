"""Tables of the admin console (:mod:`broker.console`)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Connection, delete, or_
from sqlmodel import Field, SQLModel


class ConsoleSession(SQLModel, table=True):
    """A signed-in console user. The cookie carries a random session id; only its HMAC (keyed
    with the pepper from Vault) is stored, so a copy of the database signs nobody in."""

    __tablename__ = "console_session"

    id_hash: str = Field(primary_key=True, max_length=64)
    # Who signed in: the admin identity, its tenant and roles (space-separated) as proven then.
    workload_id: str = Field(max_length=40)
    tenant_id: str = Field(max_length=40)
    roles: str = Field(max_length=64)
    # "secret" (client credentials) or "token" (a pasted admin token).
    method: str = Field(max_length=8)
    # The pasted token's jti and expiry: its revocation ends the session, and the session never
    # outlives it.
    token_jti: str | None = Field(default=None, max_length=64)
    token_exp: int | None = Field(default=None, sa_type=BigInteger)
    # When the identity was proven, on the database's clock (a token's iat): a suspension's
    # cut-off at or after it ends the session, as it ends a token.
    proven_at: int = Field(sa_type=BigInteger)
    created_at: int = Field(sa_type=BigInteger)
    expires_at: int = Field(sa_type=BigInteger, index=True)
    last_seen: int = Field(sa_type=BigInteger)


def prune_sessions(conn: Connection, now: int, idle_timeout_s: int) -> int:
    """Delete the sessions that are over (expired, or idle too long); how many."""
    table = ConsoleSession.__table__  # type: ignore[attr-defined]
    result = conn.execute(delete(table).where(
        or_(table.c.expires_at <= now, table.c.last_seen <= now - idle_timeout_s)))
    return int(result.rowcount)
