"""GitHub Actions OIDC tokens (``type = "github-actions"``).

A repository is pinned by its numeric ``repository_id``: a name can be freed and taken by
someone else (a renamed or deleted repository), an id never is. ``repository`` with
``job_workflow_ref`` pins one workflow of a repository by name, for those who accept that.
"""

from __future__ import annotations

from broker.plugin import (
    ExternalIdentity,
    ExternalIssuerSettings,
    InvalidSubjectToken,
    SubjectVerifier,
)
from plugins._external import configured, jwt_identity, text


class GitHubActionsIssuer:
    issuer_type = "github-actions"
    algorithms: tuple[str, ...] = ("RS256",)
    pinning: tuple[tuple[str, ...], ...] = (("repository_id",), ("repository", "job_workflow_ref"))

    async def verify(self, token: str, issuer: ExternalIssuerSettings | None,
                     ctx: SubjectVerifier) -> ExternalIdentity:
        claims = await ctx.verify_jwt(token, configured(issuer), self.algorithms)
        for name in ("repository_id", "repository_owner_id", "repository"):
            if text(claims.get(name)) is None:
                raise InvalidSubjectToken(f"{name} is missing or not a string")
        if "job_workflow_ref" in claims and text(claims["job_workflow_ref"]) is None:
            raise InvalidSubjectToken("job_workflow_ref is not a string")
        return jwt_identity(claims)


plugin = GitHubActionsIssuer()
