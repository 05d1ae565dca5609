"""What the JWT issuer-type plugins share: the identity a verified claim set makes.

Imports only :mod:`broker.plugin`, like every plugin.
"""

from __future__ import annotations

from broker.plugin import ExternalIdentity, ExternalIssuerSettings, InvalidSubjectToken

MAX_JTI_CHARS = 256


def configured(issuer: ExternalIssuerSettings | None) -> ExternalIssuerSettings:
    """A JWT is always checked against the configured issuer it was routed to; None is only
    ever passed for Vault tokens, so it is refused here rather than verified against nothing."""
    if issuer is None:
        raise InvalidSubjectToken("no configured issuer")
    return issuer


def jwt_identity(claims: dict[str, object]) -> ExternalIdentity:
    """The identity of verified claims. ``issuer`` is left for the broker to name: it alone
    knows which configured issuer the token was routed to."""
    iss, sub, jti = claims.get("iss"), claims.get("sub"), claims.get("jti")
    if not isinstance(iss, str) or not isinstance(sub, str) or not sub:
        raise InvalidSubjectToken("iss or sub is not a string")
    short_jti = jti if isinstance(jti, str) and 0 < len(jti) <= MAX_JTI_CHARS else None
    return ExternalIdentity(issuer="", iss=iss, sub=sub, jti=short_jti, claims=claims)


def text(value: object, max_chars: int = 1024) -> str | None:
    """``value`` when it is a non-empty string of at most ``max_chars``, else None."""
    return value if isinstance(value, str) and 0 < len(value) <= max_chars else None
