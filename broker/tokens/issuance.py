"""``POST /v1/token``: authenticate a client, reserve its slice, sign its token.

The lookup, the secret check and the reservation run in one database transaction, so a token
exists only if its slice was reserved from every budget above it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from broker.approvals import grants as grants_store
from broker.approvals.grants import GrantRecord
from broker.errors import (
    BudgetExhausted,
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    SlowDown,
)
from broker.identity.credentials import secret_matches
from broker.identity.identities import Client, find_by_client_id
from broker.identity.policy import Policy, effective, model_allowed, scope_within
from broker.money import ledger
from broker.money.ledger import BudgetRef
from broker.plugin import AuthMethod, ClientCredentials, ExternalIdentity, Identity
from broker.services import Services
from broker.storage.db import db_now
from broker.tokens import exchange, tokens
from broker.tokens.exchange import SubjectCredentials

CLIENT_CREDENTIALS = "client_credentials"


@dataclass(frozen=True)
class TokenRequest:
    grant_type: str
    method: AuthMethod
    creds: ClientCredentials
    scope: tuple[str, ...] | None
    budget_micros: int | None
    ttl_s: int | None
    source: str

    @property
    def client_id(self) -> str:
        return self.creds.client_id


class _Context:
    """The :class:`broker.plugin.AuthContext` lent to auth methods, bound to one transaction."""

    def __init__(self, services: Services, conn: Connection, now: int):
        self._services = services
        self._conn = conn
        self._now = now

        self._vouched: list[Client] = []
        # The workload a failed check was for, when the client id named one.
        self.failed_workload: str | None = None

    def check_client_secret(self, client_id: str, secret: str) -> Client | None:
        client, known = check_client(self._services, self._conn, client_id, secret, self._now)
        if client is not None:
            self._vouched.append(client)
        elif known is not None:
            self.failed_workload = known
        return client

    def vouched_for(self, identity: Identity | None) -> Client | None:
        """The identity an auth method returned, if this context handed it out; a plugin's
        answer is never taken for an identity the broker did not check."""
        return next((c for c in self._vouched if c is identity), None)


def _budget_refs(services: Services, client: Client, policy: Policy) -> list[BudgetRef]:
    refs = [BudgetRef("workload", client.id, b.period, b.limit_micros) for b in policy.budgets]
    return refs + ledger.tenant_and_org(client.tenant_id, client.tenant_budgets,
                                        services.settings.org.budgets)


@dataclass(frozen=True)
class Issued:
    """A signed token and what the caller is told about it."""

    access_token: str = field(repr=False)
    expires_in: int
    scope: str
    budget_micros: int


async def issue(services: Services, req: TokenRequest) -> Issued:
    await services.failures.ensure_allowed(req.client_id, req.source)
    settings = services.settings
    external: ExternalIdentity | None = None
    if isinstance(req.creds, SubjectCredentials):
        try:
            external = await exchange.identify(services, req.creds)
        except InvalidClient:
            await services.failures.record_failure(req.client_id, req.source)
            raise
    jti = tokens.new_jti()

    # For the monitor: the workload the request named, and whether it proved to be it.
    seen: list[tuple[str, bool]] = []

    def txn(conn: Connection) -> dict[str, Any] | None:
        # The iat, and every time derived from it, on the clock revocation cut-offs are read
        # from (the database's): one replica's clock may be seconds off another's.
        now = db_now(conn)
        if external is not None:
            row = exchange.bound_client(services, conn, external, jti, now)
        else:
            ctx = _Context(services, conn, now)
            row = ctx.vouched_for(req.method.authenticate(ctx, req.creds))
            if row is None:
                seen[:] = [(ctx.failed_workload, False)] if ctx.failed_workload else []
        if row is None:
            return None
        seen[:] = [(row.id, True)]
        policy = effective_policy(row.kind, row.policy_key)
        live = grants_store.live_for(conn, row.id, now)
        # Tokens carry (and die with) the grants that give them something: a model, a tool or
        # money. A grant of rates alone acts on the workload's limits, not on its tokens.
        grants = [g for g in live
                  if g.model is not None or g.tool is not None or g.budget_micros > 0]
        granted = [g.model for g in grants if g.model is not None]
        allowed = [*policy.models, *granted]
        if req.scope is not None:
            for entry in req.scope:
                if not scope_within(entry, allowed):
                    raise InvalidScope(f"scope {entry!r} is not allowed by policy"[:200])
            models = list(dict.fromkeys(req.scope))
        else:
            models = list(dict.fromkeys(allowed))
        # ``ttl_s`` only narrows: never past the policy's lifetime (RFC 8693 lets the server
        # issue a shorter one than asked; ``expires_in`` says which), nor past a grant's.
        longest = min(policy.token_ttl_s or settings.tokens.default_ttl_s, settings.tokens.max_ttl_s)
        if grants:
            longest = min(longest, min(g.expires_at for g in grants) - now)
        ttl = min(req.ttl_s or longest, longest)
        wait = services.issuance.take_within(conn, (row.client_id, ""))
        if wait:
            raise SlowDown(
                f"this client may obtain {settings.auth.issuance_rpm} tokens per minute",
                headers={"retry-after": str(wait)})
        per_token = policy.token_budget_micros or 0
        funding = [g for g in grants if g.budget_micros > 0]
        if req.budget_micros is not None and req.budget_micros > per_token and not funding:
            raise InvalidRequest(f"budget_micros exceeds the policy's per-token slice of {per_token}")
        amount = per_token if req.budget_micros is None else req.budget_micros
        if not models:
            amount = 0  # a token that can call no model needs no money
        _reserve(conn, services, row, policy, jti=jti, amount=amount, per_token=per_token,
                 funding=funding, now=now, ttl=ttl)
        claims: dict[str, Any] = {
            "iss": settings.issuer.url,
            "aud": settings.issuer.audience,
            "sub": row.id,
            "client_id": row.client_id,
            "tenant": row.tenant_id,
            "kind": row.kind,
            "jti": jti,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "models": models,
            "budget_micros": amount,
            "scope": " ".join(models),
        }
        if row.roles:
            claims["roles"] = list(row.roles)
        if grants:
            claims["grants"] = [g.id for g in grants]
            # A scope that left a granted model out narrows the grant too.
            claims["grant_models"] = [m for m in granted if model_allowed(m, models)]
            tools = sorted({g.tool for g in grants if g.tool})
            if tools:
                claims["grant_tools"] = tools
            claims["grant_exp"] = min(g.expires_at for g in grants)
        return claims

    try:
        claims = await services.db.run(txn)
    except (SlowDown, BudgetExhausted) as exc:
        if services.monitor is not None and seen:
            # A limit hit by a client that proved who it is: a workload minting tokens in a
            # loop meets policy.max_live_tokens or auth.issuance_rpm again and again.
            services.monitor.refusal(seen[0][0], exc.code, authenticated=True,
                                     client_ip=req.source)
        raise
    if claims is None:
        await services.failures.record_failure(req.client_id, req.source)
        if services.monitor is not None and seen:
            # Anyone who knows a client id can cause this: it never suspends by itself. An
            # unknown client id names nobody to watch, and is not queued at all.
            services.monitor.refusal(seen[0][0], "bad_secret", authenticated=False,
                                     client_ip=req.source)
        raise InvalidClient()
    token = tokens.sign(services.keyring, claims)
    services.metrics.tokens_issued.labels(claims["kind"]).inc()
    services.metrics.reserved.inc(claims["budget_micros"])
    return Issued(access_token=token, expires_in=claims["exp"] - claims["iat"],
                  scope=claims["scope"], budget_micros=claims["budget_micros"])


def _reserve(conn: Connection, services: Services, client: Client, policy: Policy, *, jti: str,
             amount: int, per_token: int, funding: list[GrantRecord], now: int,
             ttl: int) -> None:
    """Reserve the token's slice from the budgets above the workload; or, when they cannot
    hold it (or it is larger than the policy's per-token slice), carve it out of a live grant's
    extra budget, the soonest to expire first."""
    settings = services.settings
    retry_after = max(1, math.ceil(settings.sweeper.interval_s))

    def regular() -> None:
        ledger.reserve_slice(
            conn, jti=jti, workload_id=client.id, tenant_id=client.tenant_id, amount=amount,
            budgets=_budget_refs(services, client, policy), issued_at=now, expires_at=now + ttl,
            max_live=policy.max_live_tokens, retry_after_s=retry_after)

    if not funding:
        regular()
        return
    if amount <= per_token:
        try:
            with conn.begin_nested():
                regular()
            return
        except BudgetExhausted:
            pass
    for grant in funding:
        if ledger.reserve_child_slice(
                conn, jti=jti, parent=grant.id, workload_id=client.id,
                tenant_id=client.tenant_id, amount=amount, issued_at=now, expires_at=now + ttl,
                max_live=policy.max_live_tokens, retry_after_s=retry_after):
            return
    raise BudgetExhausted("neither the budgets nor a live grant can hold this slice")


def authenticate_client(
    services: Services, conn: Connection, client_id: str, secret: str, now: int
) -> Client | None:
    """The workload (with its tenant) when the credentials match a live identity, else None.

    Unknown client, wrong secret and suspended identity all return None, after the same work.
    The previous secret still counts during its rotation grace.
    """
    return check_client(services, conn, client_id, secret, now)[0]


def check_client(
    services: Services, conn: Connection, client_id: str, secret: str, now: int
) -> tuple[Client | None, str | None]:
    """:func:`authenticate_client`, and the id of the workload the client id names (None
    when it names none), for the monitor's count of wrong secrets."""
    client = find_by_client_id(conn, client_id)
    known = client.id if client is not None else None
    hashes: list[str | None] = []
    if client is not None:
        hashes.append(client.secret_hash)
        if client.prev_secret_hash and (client.prev_secret_expires_at or 0) > now:
            hashes.append(client.prev_secret_hash)
    if not secret_matches(services.pepper, secret, hashes):
        return None, known
    if client is None or client.suspended_at is not None or client.tenant_suspended_at is not None:
        return None, None  # a suspended identity is not guessing: its secret was right
    return client, known


@functools.lru_cache(maxsize=4096)
def effective_policy(kind: str, policy_text: str) -> Policy:
    """Parsing and validating a stored policy costs more than the rest of an issuance's Python
    work; the stored text is the key, so an edited policy is a new entry, never a stale one."""
    return effective(Policy.model_validate_json(policy_text), kind)
