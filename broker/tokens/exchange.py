"""The token-exchange grant (RFC 8693): a workload proves itself with a credential it already
has, instead of a client secret.

* ``urn:ietf:params:oauth:token-type:jwt``: a JWT from a configured issuer (Kubernetes, GitHub
  Actions, SPIFFE, any OIDC issuer), verified by its issuer type's plugin
  (:mod:`broker.identity.federation`);
* ``urn:broker:token-type:vault``: a Vault/OpenBao token, looked up at the broker's Vault;
* ``urn:ietf:params:oauth:token-type:access_token``: a broker token, for a sub-agent
  (:mod:`broker.tokens.delegation`).

The verified identity is mapped to exactly one workload by its bindings
(:mod:`broker.identity.bindings`). Every failure answers ``invalid_client``, as a wrong secret.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from broker.errors import InvalidClient, InvalidRequest, InvalidSubjectToken
from broker.identity import bindings
from broker.identity.identities import Client, find_by_workload_id
from broker.plugin import ClientCredentials, ExternalIdentity
from broker.services import Services
from broker.storage.audit import record

log = logging.getLogger("broker.exchange")

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
VAULT_TOKEN_TYPE = "urn:broker:token-type:vault"
SUBJECT_TOKEN_TYPES = (JWT_TOKEN_TYPE, ACCESS_TOKEN_TYPE, VAULT_TOKEN_TYPE)
MAX_SUBJECT_TOKEN = 8192


@dataclass(frozen=True)
class SubjectCredentials(ClientCredentials):
    """A subject token (and, for delegation, an optional actor token). ``client_id`` keys the
    failure throttle: a digest of the token, so that a client retrying one bad token slows
    down while others behind the same address do not."""

    subject_token: str = field(default="", repr=False)
    subject_token_type: str = ""
    actor_token: str | None = field(default=None, repr=False)


def _token_param(params: Mapping[str, Any], name: str) -> str | None:
    raw = params.get(name)
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw or len(raw) > MAX_SUBJECT_TOKEN or not raw.isprintable():
        # An oversized token is refused before any parsing, like a wrong one.
        raise InvalidClient()
    return raw


class TokenExchange:
    """The grant's :class:`broker.plugin.AuthMethod`: it reads the parameters; issuance
    verifies the subject token before its transaction (a JWKS fetch or a Vault lookup must not
    hold a database connection)."""

    grant_type = TOKEN_EXCHANGE

    def credentials(self, params: Mapping[str, object], basic: tuple[str, str] | None
                    ) -> SubjectCredentials:
        if basic is not None or params.get("client_secret") is not None:
            raise InvalidRequest("token exchange authenticates with the subject token alone")
        kind = params.get("subject_token_type")
        if kind is None:
            raise InvalidRequest("subject_token_type is required")
        if kind not in SUBJECT_TOKEN_TYPES:
            raise InvalidRequest(
                "subject_token_type must be one of " + ", ".join(SUBJECT_TOKEN_TYPES))
        token = _token_param(params, "subject_token")
        if token is None:
            raise InvalidRequest("subject_token is required")
        actor = _token_param(params, "actor_token")
        actor_type = params.get("actor_token_type")
        if actor is not None:
            if kind != ACCESS_TOKEN_TYPE:
                raise InvalidRequest("actor_token is only for delegation (an access_token subject)")
            if actor_type != ACCESS_TOKEN_TYPE:
                raise InvalidRequest(f"actor_token_type must be {ACCESS_TOKEN_TYPE}")
        elif actor_type is not None:
            raise InvalidRequest("actor_token_type without actor_token")
        requested = params.get("requested_token_type")
        if requested is not None and requested not in (JWT_TOKEN_TYPE, ACCESS_TOKEN_TYPE):
            raise InvalidRequest("the broker issues JWT access tokens only")
        digest = hashlib.sha256(token.encode()).hexdigest()[:24]
        return SubjectCredentials(client_id=f"exchange:{digest}", secret="",
                                  subject_token=token, subject_token_type=str(kind),
                                  actor_token=actor)

    def authenticate(self, ctx: object, creds: ClientCredentials) -> None:
        # Never reached: issuance takes subject credentials down their own path.
        return None


async def identify(services: Services, creds: SubjectCredentials) -> ExternalIdentity:
    """The external identity a JWT or Vault subject token proves; ``invalid_client`` (and a
    counted failure) otherwise. The reason goes to the log, never to the caller."""
    federation = services.federation
    try:
        if federation is None:
            raise InvalidSubjectToken("no external issuer is configured")
        if creds.subject_token_type == VAULT_TOKEN_TYPE:
            return await federation.identify_vault(creds.subject_token)
        return await federation.identify_jwt(creds.subject_token)
    except InvalidSubjectToken as exc:
        log.info("token exchange refused: %s", exc.reason)
        raise InvalidClient() from None


def bound_client(services: Services, conn: Connection, identity: ExternalIdentity, jti: str,
                 now: int) -> Client | None:
    """The live workload the identity's bindings name, with the exchange audited; None when
    none or several match (a clash is logged and audited for the admins) or it is suspended."""
    matched = bindings.matching_workloads(conn, identity)
    detail: dict[str, Any] = {"issuer": identity.issuer, "iss": identity.iss, "sub": identity.sub,
                              "external_jti": identity.jti}
    if len(matched) > 1:
        workloads = sorted(w for w, _ in matched)
        log.warning("token exchange refused: %s/%r matches the bindings of %d workloads (%s)",
                    identity.issuer, identity.sub[:256], len(matched), ", ".join(workloads))
        record(conn, "broker:exchange", "token.exchange_clash", identity.issuer,
               {**detail, "workloads": workloads, "bindings": sorted(b for _, b in matched)}, now)
        return None
    if not matched:
        # %r: a claim is the issuer's text, and must not forge lines of this log.
        log.info("token exchange refused: %s/%r matches no binding", identity.issuer,
                 identity.sub[:256])
        return None
    workload_id, binding_id = matched[0]
    client = find_by_workload_id(conn, workload_id)
    if client is None or client.suspended_at is not None or client.tenant_suspended_at is not None:
        return None
    record(conn, client.id, "token.exchange", jti,
           {**detail, "binding": binding_id, "workload_id": client.id,
            "tenant_id": client.tenant_id}, now)
    return client
