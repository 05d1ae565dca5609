"""Delegation to sub-agents (RFC 8693 with a broker token as the subject token).

A child token is an attenuation of its parent, never more:

* its models are a subset of the parent's (a wider scope is ``invalid_scope``);
* its slice is carved out of what remains of the parent's, in one conditional update
  (:func:`broker.money.ledger.reserve_child_slice`): the parent's remaining drops at once, and
  what the child leaves unspent goes back into the parent's slice while the parent lives;
* its expiry is clamped to the parent's;
* its ``act`` claim names the parent (and the parent's own ``act``), so that every replica's
  revocation state kills it with any token above it (:mod:`broker.revocation.denylist`), and
  the ledger revokes its slice with its parent's (:func:`broker.money.ledger.revoke_descendants`);
* its depth is bounded by ``tokens.max_delegation_depth``.

Every spend of a child climbs the chain to the root slice, so no tree of delegations can spend
more than the root's slice.
"""

from __future__ import annotations

import math
import time
from typing import Any

from sqlalchemy import Connection

from broker.errors import BudgetExhausted, InvalidClient, InvalidRequest, InvalidScope, InvalidToken, SlowDown
from broker.identity.identities import find_by_workload_id
from broker.identity.policy import model_allowed, scope_within
from broker.money import ledger
from broker.services import Services
from broker.storage.audit import record
from broker.storage.db import db_now
from broker.tokens import tokens
from broker.tokens.exchange import SubjectCredentials
from broker.tokens.issuance import Issued, TokenRequest, effective_policy
from broker.tokens.tokens import VerifiedToken


def live_token(services: Services, token: str | None) -> VerifiedToken:
    """A verified broker token that no revocation has ended, or :class:`InvalidToken`."""
    if not token:
        raise InvalidToken()
    verified = services.verified.verify(
        token, services.keyring, issuer=services.settings.issuer.url,
        audience=services.settings.issuer.audience, now=time.time())
    if not is_live(services, verified):
        raise InvalidToken()
    return verified


def is_live(services: Services, token: VerifiedToken) -> bool:
    """Whether no revocation known here has ended the token (or a token above it)."""
    gate = services.token_gate
    return gate is None or gate.is_live(token)


async def delegate(services: Services, req: TokenRequest) -> Issued:
    creds = req.creds
    assert isinstance(creds, SubjectCredentials)
    await services.failures.ensure_allowed(req.client_id, req.source)
    try:
        parent = live_token(services, creds.subject_token)
        actor = live_token(services, creds.actor_token) if creds.actor_token else None
    except InvalidToken:
        await services.failures.record_failure(req.client_id, req.source)
        raise InvalidClient() from None
    if parent.kind == "admin" or parent.roles:
        raise InvalidRequest("an admin token cannot be delegated")
    if actor is not None and (actor.tenant != parent.tenant or actor.kind == "admin"
                              or actor.ancestors):
        # The actor names who acts: a root token of a workload of the same tenant.
        raise InvalidRequest("actor_token must be a token of another workload of this tenant")
    depth = len(parent.ancestors) + 1
    limit = services.settings.tokens.max_delegation_depth
    if depth > limit:
        raise InvalidRequest(f"delegation is limited to {limit} levels")
    jti = tokens.new_jti()

    def txn(conn: Connection) -> dict[str, Any] | None:
        # The child's iat on the clock revocation cut-offs are read from (as in issuance).
        now = db_now(conn)
        if parent.exp <= now:
            raise InvalidClient()  # within the clock leeway, but nothing is left of its life
        return _carve(services, conn, req, parent, actor, depth, jti, now)

    claims = await services.db.run(txn)
    if claims is None:
        await services.failures.record_failure(req.client_id, req.source)
        raise InvalidClient()
    token = tokens.sign(services.keyring, claims)
    services.metrics.tokens_issued.labels(claims["kind"]).inc()
    return Issued(access_token=token, expires_in=claims["exp"] - claims["iat"],
                  scope=claims["scope"], budget_micros=claims["budget_micros"])


def _carve(services: Services, conn: Connection, req: TokenRequest, parent: VerifiedToken,
           actor: VerifiedToken | None, depth: int, jti: str, now: int) -> dict[str, Any] | None:
    settings = services.settings
    client = find_by_workload_id(conn, actor.sub if actor is not None else parent.sub)
    if client is None or client.suspended_at is not None or client.tenant_suspended_at is not None:
        return None
    policy = effective_policy(client.kind, client.policy_key)
    models = _models(req.scope, parent, policy.models if actor is not None else None)
    remaining = ledger.slice_remaining(conn, parent.jti)
    if remaining is None:
        return None  # the ledger knows of a revocation this replica has not heard of yet
    # Without an amount the child gets half of what remains: the parent is never stranded.
    amount = req.budget_micros if req.budget_micros is not None else remaining // 2
    if not models:
        amount = 0
    if amount > remaining:
        raise BudgetExhausted(f"the parent token has {remaining} micro-dollars left")
    longest = min(policy.token_ttl_s or settings.tokens.default_ttl_s, settings.tokens.max_ttl_s)
    expires_at = min(now + min(req.ttl_s or longest, longest), parent.exp)
    wait = services.issuance.take_within(conn, (client.client_id, ""))
    if wait:
        raise SlowDown(f"this client may obtain {settings.auth.issuance_rpm} tokens per minute",
                       headers={"retry-after": str(wait)})
    if not ledger.reserve_child_slice(
            conn, jti=jti, parent=parent.jti, workload_id=client.id, tenant_id=client.tenant_id,
            amount=amount, issued_at=now, expires_at=expires_at, max_live=policy.max_live_tokens,
            retry_after_s=max(1, math.ceil(settings.sweeper.interval_s))):
        raise BudgetExhausted("the parent token's slice cannot hold this budget")
    act: dict[str, Any] = {"sub": parent.sub, "jti": parent.jti}
    if parent.act is not None:
        act["act"] = parent.act
    claims: dict[str, Any] = {
        "iss": settings.issuer.url, "aud": settings.issuer.audience, "sub": client.id,
        "client_id": client.client_id, "tenant": client.tenant_id, "kind": client.kind,
        "jti": jti, "iat": now, "nbf": now, "exp": expires_at, "models": models,
        "budget_micros": amount, "scope": " ".join(models), "act": act,
        "delegation_depth": depth,
    }
    if parent.grants:
        # The child dies with the grants its parent was issued under.
        claims["grants"] = list(parent.grants)
        claims["grant_models"] = [m for m in parent.grant_models if model_allowed(m, models)]
        if parent.grant_tools:
            claims["grant_tools"] = list(parent.grant_tools)
        if parent.grant_exp is not None:
            claims["grant_exp"] = parent.grant_exp
    record(conn, parent.sub, "token.delegate", jti,
           {"parent_jti": parent.jti, "workload_id": client.id, "tenant_id": client.tenant_id,
            "budget_micros": amount, "depth": depth, "models": models}, now)
    return claims


def _models(scope: tuple[str, ...] | None, parent: VerifiedToken,
            actor_models: list[str] | None) -> list[str]:
    """The child's models: the requested scope, each within the parent's models (and, for
    another workload acting, its own policy's); by default the parent's."""
    wanted = list(dict.fromkeys(scope)) if scope is not None else list(parent.models)
    for entry in wanted:
        if not scope_within(entry, list(parent.models)):
            raise InvalidScope(f"scope {entry!r} is wider than the parent token's models"[:200])
        if actor_models is not None and not scope_within(entry, actor_models):
            raise InvalidScope(f"scope {entry!r} is not allowed by the actor's policy"[:200])
    return wanted
