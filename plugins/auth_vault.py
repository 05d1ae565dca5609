"""Vault/OpenBao tokens as subject tokens (``urn:broker:token-type:vault``).

A workload logs in to the broker's Vault by itself (AppRole, Kubernetes auth, ...) and presents
the token it got. The broker looks it up at its own Vault with that token (``lookup-self``,
through :meth:`SubjectVerifier.vault_lookup_self`); bindings name ``"issuer": "vault"`` and match
fields of the lookup's ``data`` by dotted path (``meta.role_name``, ``entity_id``, ``path``).
"""

from __future__ import annotations

from broker.plugin import (
    ExternalIdentity,
    ExternalIssuerSettings,
    InvalidSubjectToken,
    SubjectVerifier,
)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


class VaultIssuer:
    issuer_type = "vault"
    # Nothing is signed: Vault itself says who the token is.
    algorithms: tuple[str, ...] = ()
    # A binding pins one workload by the AppRole (or other auth role) it logged in with, or by
    # its Vault entity.
    pinning: tuple[tuple[str, ...], ...] = (("meta.role_name",), ("entity_id",))

    async def verify(
        self, token: str, issuer: ExternalIssuerSettings | None, ctx: SubjectVerifier
    ) -> ExternalIdentity:
        data = await ctx.vault_lookup_self(token)
        entity_id = _text(data.get("entity_id"))
        accessor = _text(data.get("accessor"))
        if entity_id:
            sub = entity_id
        elif accessor:
            sub = "accessor:" + accessor
        else:
            # A batch token with no entity: nothing names who holds it.
            raise InvalidSubjectToken("vault token has neither an entity nor an accessor")
        return ExternalIdentity(
            issuer="vault", iss="vault", sub=sub, jti=accessor or None, claims=data
        )


plugin = VaultIssuer()
