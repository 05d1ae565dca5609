"""SPIFFE JWT-SVIDs (``type = "spiffe"``), as the SPIFFE JWT-SVID specification defines them.

The SPIFFE ID in ``sub`` is the whole identity, so ``sub`` alone pins a workload. The
specification allows only RSA and EC signatures (never EdDSA), and an SVID meant for this broker
must name it as its one audience: an SVID sent to several audiences can be replayed by any of
them.
"""

from __future__ import annotations

import re

from broker.plugin import (
    ExternalIdentity,
    ExternalIssuerSettings,
    InvalidSubjectToken,
    SubjectVerifier,
)
from plugins._external import configured, jwt_identity

MAX_SPIFFE_ID = 2048
MAX_TRUST_DOMAIN = 255
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def is_spiffe_id(value: object) -> bool:
    """A workload's SPIFFE ID: ``spiffe://<trust domain>/<path>``, with a lowercase trust domain
    and no port, userinfo, query, fragment, percent-encoding, or empty, ``.`` or ``..``
    segment."""
    if not isinstance(value, str) or len(value) > MAX_SPIFFE_ID or not value.startswith("spiffe://"):
        return False
    domain, slash, path = value[len("spiffe://"):].partition("/")
    if not slash or not 0 < len(domain) <= MAX_TRUST_DOMAIN or not _TRUST_DOMAIN.fullmatch(domain):
        return False
    segments = path.split("/")
    return all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments)


class SpiffeIssuer:
    issuer_type = "spiffe"
    algorithms: tuple[str, ...] = (
        "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")
    pinning: tuple[tuple[str, ...], ...] = ()

    async def verify(self, token: str, issuer: ExternalIssuerSettings | None,
                     ctx: SubjectVerifier) -> ExternalIdentity:
        claims = await ctx.verify_jwt(token, configured(issuer), self.algorithms)
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) == 1:
            aud = aud[0]
        if not isinstance(aud, str):
            raise InvalidSubjectToken("a JWT-SVID for the broker must have exactly one audience")
        if not is_spiffe_id(claims.get("sub")):
            raise InvalidSubjectToken("sub is not a SPIFFE ID")
        return jwt_identity(claims)


plugin = SpiffeIssuer()
