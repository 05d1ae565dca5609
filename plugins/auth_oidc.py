"""Generic OIDC ID tokens (``auth.issuers.<name>.type = "oidc"``).

Nothing is known of such an issuer beyond the standard claims, so only ``sub`` pins a
workload: a binding must name it.
"""

from __future__ import annotations

from broker.plugin import ExternalIdentity, ExternalIssuerSettings, SubjectVerifier
from plugins._external import configured, jwt_identity


class OidcIssuer:
    issuer_type = "oidc"
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA", "RS384", "RS512", "ES384", "ES512",
                  "PS256", "PS384", "PS512")
    pinning: tuple[tuple[str, ...], ...] = ()

    async def verify(self, token: str, issuer: ExternalIssuerSettings | None,
                     ctx: SubjectVerifier) -> ExternalIdentity:
        claims = await ctx.verify_jwt(token, configured(issuer), self.algorithms)
        return jwt_identity(claims)


plugin = OidcIssuer()
