"""What a continued conversation costs: the tokens a metered response left stored at its
provider, which a later request continuing it (OpenAI ``previous_response_id``) is billed again.

The broker keeps the count, never the conversation: the conversation stays at the provider. A
request may continue only a response of its own tenant that this broker metered; any other id
names input the broker cannot see, so its cost has no bound and it is refused.
"""

from __future__ import annotations

import dataclasses

from sqlalchemy import Connection

from broker.errors import Unbounded
from broker.money.bounds import BoundContext
from broker.storage.db import Database, Sql

_REMEMBER = Sql("""
    INSERT INTO response_context (id, tenant_id, provider, context_tokens, created_at)
    VALUES (:id, :tenant_id, :provider, :tokens, :now)
    ON CONFLICT (id) DO NOTHING""")
_READ = Sql("""
    SELECT context_tokens FROM response_context
    WHERE id = :id AND tenant_id = :tenant_id AND provider = :provider""")
_PRUNE = Sql("""
    DELETE FROM response_context WHERE id IN (
        SELECT id FROM response_context WHERE created_at < :before LIMIT :batch)""")


def remember(conn: Connection, context_id: str, *, tenant_id: str, provider: str, tokens: int,
             now: int) -> None:
    """Record a response's stored context: everything it read and wrote, which is all a
    continuation can be billed for again (the first id recorded wins: a provider never reuses
    one)."""
    _REMEMBER.run(conn, id=context_id, tenant_id=tenant_id, provider=provider, tokens=tokens,
                  now=now)


def context_tokens(conn: Connection, context_id: str, *, tenant_id: str,
                   provider: str) -> int | None:
    row = _READ.run(conn, id=context_id, tenant_id=tenant_id, provider=provider).first()
    return None if row is None else int(row[0])


def prune(conn: Connection, before: int, batch: int = 1000) -> int:
    """Forget contexts recorded before ``before`` (the provider keeps a stored response for
    30 days; a continuation of an older one is refused as unbounded)."""
    return int(_PRUNE.run(conn, before=before, batch=batch).rowcount or 0)


async def continuing(db: Database, ctx: BoundContext, context_id: str, *, tenant_id: str,
                     provider: str) -> BoundContext:
    """The bound context of a request that continues a stored conversation: it knows the
    conversation's tokens, or the request is refused (input the broker cannot see)."""
    tokens = await db.read(lambda conn: context_tokens(conn, context_id, tenant_id=tenant_id,
                                                       provider=provider))
    if tokens is None:
        raise Unbounded("previous_response_id: not a response this broker metered for this "
                        "tenant, so the input it adds cannot be bounded",
                        param="previous_response_id")
    return dataclasses.replace(ctx, prior_context_tokens=tokens)
