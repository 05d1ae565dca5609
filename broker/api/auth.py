"""Bearer authentication shared by the admin API, introspection and the gateway."""

from __future__ import annotations

import time

from broker.errors import Forbidden, InvalidToken
from broker.identity.identities import Actor
from broker.services import Services
from broker.tokens import delegation
from broker.tokens.tokens import VerifiedToken


def verify_bearer(svc: Services, bearer: str | None) -> VerifiedToken:
    """A verified, unrevoked broker token, or :class:`InvalidToken` (one answer for all causes)."""
    if not bearer:
        raise InvalidToken()
    verified = svc.verified.verify(
        bearer, svc.keyring, issuer=svc.settings.issuer.url,
        audience=svc.settings.issuer.audience, now=time.time(),
    )
    if not delegation.is_live(svc, verified):
        if svc.monitor is not None:
            # Signed by us, so it is this workload's own token; but it died of an admin's (or
            # the monitor's) decision, and a client still retrying it must not turn a tenant's
            # kill switch into suspensions of its own: it can only alert.
            svc.monitor.refusal(verified.sub, "refused_token", authenticated=False)
        raise InvalidToken()
    return verified


def authenticate_admin(svc: Services, bearer: str | None) -> Actor:
    verified = verify_bearer(svc, bearer)
    roles = frozenset(verified.roles) & {"org-admin", "tenant-admin", "auditor"}
    if verified.kind != "admin" or not roles:
        raise Forbidden("this token does not carry an admin role")
    return Actor(id=verified.sub, tenant_id=verified.tenant, roles=roles)
