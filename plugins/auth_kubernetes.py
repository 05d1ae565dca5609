"""Kubernetes projected service-account tokens (``type = "kubernetes"``).

Only projected (bound) tokens are accepted: they expire, name an audience, and name the pod
they are bound to. Legacy secret-based tokens never expire and were widely leaked in
Secrets; they are refused by their shape, whatever the issuer configuration says.

With ``tokenreview = true`` the API server is also asked (TokenReview) whether the token is
still valid: a token whose pod was deleted dies at once instead of living to its ``exp``.
"""

from __future__ import annotations

import re

from broker.plugin import (
    ExternalIdentity,
    ExternalIssuerSettings,
    InvalidSubjectToken,
    SubjectVerifier,
)
from plugins._external import configured, jwt_identity, text

LEGACY_ISS = "kubernetes/serviceaccount"
LEGACY_CLAIM_PREFIX = "kubernetes.io/serviceaccount/"
TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
MAX_CREDENTIAL_BYTES = 16_384
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SERVICE_ACCOUNT = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


class KubernetesIssuer:
    issuer_type = "kubernetes"
    algorithms: tuple[str, ...] = (
        "RS256", "ES256", "RS384", "RS512", "ES384", "ES512", "PS256", "PS384", "PS512")
    pinning: tuple[tuple[str, ...], ...] = (
        ("kubernetes.io.namespace", "kubernetes.io.serviceaccount.name"),
        ("kubernetes.io.namespace", "kubernetes.io.serviceaccount.uid"),
    )

    async def verify(self, token: str, issuer: ExternalIssuerSettings | None,
                     ctx: SubjectVerifier) -> ExternalIdentity:
        issuer = configured(issuer)
        claims = await ctx.verify_jwt(token, issuer, self.algorithms)
        if claims.get("iss") == LEGACY_ISS or any(k.startswith(LEGACY_CLAIM_PREFIX) for k in claims):
            raise InvalidSubjectToken("legacy secret-based service-account token")
        k8s = claims.get("kubernetes.io")
        if not isinstance(k8s, dict):
            raise InvalidSubjectToken("no kubernetes.io claim: not a projected service-account token")
        namespace, account = k8s.get("namespace"), k8s.get("serviceaccount")
        name = account.get("name") if isinstance(account, dict) else None
        uid = account.get("uid") if isinstance(account, dict) else None
        if not (isinstance(namespace, str) and _NAMESPACE.fullmatch(namespace)
                and isinstance(name, str) and _SERVICE_ACCOUNT.fullmatch(name)
                and text(uid, 128) is not None):
            raise InvalidSubjectToken("kubernetes.io lacks a valid namespace or service account")
        sub = f"system:serviceaccount:{namespace}:{name}"
        if claims.get("sub") != sub:
            raise InvalidSubjectToken("sub does not match kubernetes.io")
        if issuer.tokenreview:
            await self._review(token, issuer, ctx, sub)
        return jwt_identity(claims)

    async def _review(self, token: str, issuer: ExternalIssuerSettings, ctx: SubjectVerifier,
                      sub: str) -> None:
        """Ask the API server whether the token is alive, with the broker's own (rotated)
        service-account token, read again for every review."""
        assert issuer.tokenreview_url is not None  # the settings require it with tokenreview
        try:
            with open(issuer.tokenreview_token_file, "rb") as handle:
                bearer = handle.read(MAX_CREDENTIAL_BYTES).decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            raise InvalidSubjectToken("tokenreview_token_file cannot be read") from None
        if not bearer:
            raise InvalidSubjectToken("tokenreview_token_file is empty")
        review = await ctx.post_json(
            issuer.tokenreview_url.rstrip("/") + TOKENREVIEW_PATH,
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
             "spec": {"token": token, "audiences": [issuer.audience]}},
            bearer=bearer, ca_file=issuer.ca_file, timeout_s=issuer.fetch_timeout_s)
        status = review.get("status")
        if not isinstance(status, dict) or status.get("authenticated") is not True:
            raise InvalidSubjectToken("TokenReview: not authenticated")
        audiences = status.get("audiences")
        if audiences is not None and (not isinstance(audiences, list)
                                      or issuer.audience not in audiences):
            raise InvalidSubjectToken("TokenReview: not authenticated for the broker's audience")
        user = status.get("user")
        if isinstance(user, dict) and "username" in user and user["username"] != sub:
            raise InvalidSubjectToken("TokenReview: another user")


plugin = KubernetesIssuer()
