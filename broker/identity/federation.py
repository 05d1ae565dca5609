"""Federation: which external subject token proves which outside identity (RFC 8693 exchange).

The broker, not the plugins, owns every check that all issuers share: the size and shape of a
token, the choice of the configured issuer (by the exact ``iss``, before any key is fetched),
the key (from that issuer's configured JWKS only), the algorithm, the time claims, the audience.
A plugin (:class:`broker.plugin.IssuerType`) adds what its kind of issuer means (Kubernetes
service accounts, GitHub repositories, SPIFFE IDs), and its answer is held to what was verified:
it names the issuer the token was routed to and the subject that was checked, or it is refused.

Refusals are :class:`InvalidSubjectToken`, whose ``reason`` is for the log and never holds a
token or a claim value; the caller sees the same 401 as for a wrong secret.
"""

from __future__ import annotations

import asyncio
import binascii
import contextvars
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from broker.errors import ConfigError, InvalidSubjectToken, Unavailable
from broker.identity.jwks import (
    ALGORITHM_FAMILY,
    MAX_KID_CHARS,
    POST_MAX_BYTES,
    Http,
    IssuerKeys,
    decode,
)
from broker.identity.vault_tokens import lookup_self
from broker.plugin import ExternalIdentity, IssuerType
from broker.settings import ExternalIssuerSettings, Settings
from broker.tokens.tokens import FORBIDDEN_HEADERS, MAX_TOKEN_BYTES, json_segment

VAULT = "vault"

log = logging.getLogger("broker.identity.federation")


class IssuerUnavailable(Unavailable):
    """An issuer's API (a Kubernetes TokenReview) does not answer: 503, never a refusal."""

    title = "The identity issuer is unavailable"


@dataclasses.dataclass
class _Proofs:
    """What the broker itself verified during one plugin call: (issuer, token, sub) per JWT,
    and the Vault tokens it looked up. A plugin's answer must rest on one of them."""

    jwts: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    vault: list[str] = dataclasses.field(default_factory=list)


_proofs: contextvars.ContextVar[_Proofs | None] = contextvars.ContextVar("proofs", default=None)


def unverified_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and payload of a compact JWS, UNVERIFIED: for routing, never for trust.
    Duplicate names are refused here, before PyJWT would keep the last one."""
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidSubjectToken("token too long")
    if not token.isascii():
        raise InvalidSubjectToken("not a JWT (non-ASCII)")
    if token.count(".") != 2:
        raise InvalidSubjectToken("not a JWT (three segments)")
    head, body, _signature = token.split(".")
    try:
        return json_segment(head), json_segment(body)
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise InvalidSubjectToken("malformed JWT (base64, JSON or a duplicate name)") from None


class Federation:
    """Implements :class:`broker.plugin.SubjectVerifier`; one per broker, used from its event
    loop. ``clock`` (monotonic seconds) times the key caches only; token times are wall time."""

    def __init__(self, settings: Settings, issuer_types: Mapping[str, IssuerType], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.issuer_types = dict(issuer_types)
        self._http = Http()
        self._by_iss: dict[str, tuple[str, ExternalIssuerSettings]] = {}
        self._keys: dict[str, IssuerKeys] = {}
        for name, issuer in settings.auth.issuers.items():
            key = f"invalid configuration: auth.issuers.{name}"
            plugin = self.issuer_types.get(issuer.type)
            if plugin is None:
                raise ConfigError(f"{key}.type: no auth method plugin {issuer.type!r} is installed")
            if not self._algorithms(issuer, plugin.algorithms):
                raise ConfigError(f"{key}.algorithms: none of them is allowed for type {issuer.type!r}")
            if issuer.issuer in self._by_iss:
                raise ConfigError(f"{key}.issuer: the same issuer as auth.issuers."
                                  f"{self._by_iss[issuer.issuer][0]}")
            self._by_iss[issuer.issuer] = (name, issuer)
            self._keys[name] = IssuerKeys(name, issuer, self._http, clock)
        if settings.auth.vault_tokens.enabled and VAULT not in self.issuer_types:
            raise ConfigError("invalid configuration: auth.vault_tokens.enabled: no auth method "
                              f"plugin {VAULT!r} is installed")

    @staticmethod
    def _algorithms(issuer: ExternalIssuerSettings, allowed: tuple[str, ...]) -> tuple[str, ...]:
        """The plugin's list, narrowed by the configuration's; never none, HS* or unknown."""
        return tuple(alg for alg in allowed if alg in ALGORITHM_FAMILY
                     and (issuer.algorithms is None or alg in issuer.algorithms))

    def fetch_count(self, issuer_name: str) -> int:
        """How many times the issuer's JWKS was fetched (or its file read)."""
        return self._keys[issuer_name].fetches

    async def aclose(self) -> None:
        for keys in self._keys.values():
            keys.cancel()
        await self._http.aclose()

    # --- what the token-exchange grant calls ------------------------------------------------

    async def identify_jwt(self, token: str) -> ExternalIdentity:
        """The identity a JWT of a configured issuer proves, by that issuer's type."""
        _header, payload = unverified_parts(token)
        iss = payload.get("iss")
        found = self._by_iss.get(iss) if isinstance(iss, str) else None
        if found is None:
            raise InvalidSubjectToken("no configured issuer has this iss")
        name, issuer = found
        proofs = _Proofs()
        reset = _proofs.set(proofs)
        try:
            identity = await self.issuer_types[issuer.type].verify(token, issuer, self)
        finally:
            _proofs.reset(reset)
        if not isinstance(identity, ExternalIdentity):
            raise InvalidSubjectToken("the issuer plugin returned no identity")
        if (issuer.issuer, token, identity.sub) not in proofs.jwts:
            raise InvalidSubjectToken("the issuer plugin's answer rests on no verified token")
        return dataclasses.replace(identity, issuer=name, iss=issuer.issuer)

    async def identify_vault(self, token: str) -> ExternalIdentity:
        """The identity a Vault token proves, as the broker's own Vault describes it."""
        if not self.settings.auth.vault_tokens.enabled:
            raise InvalidSubjectToken("vault tokens are not accepted (auth.vault_tokens)")
        if not token or len(token) > MAX_TOKEN_BYTES or not (token.isascii() and token.isprintable()):
            raise InvalidSubjectToken("not a vault token (empty, too long or unprintable)")
        proofs = _Proofs()
        reset = _proofs.set(proofs)
        try:
            identity = await self.issuer_types[VAULT].verify(token, None, self)
        finally:
            _proofs.reset(reset)
        if not isinstance(identity, ExternalIdentity):
            raise InvalidSubjectToken("the vault plugin returned no identity")
        if token not in proofs.vault:
            raise InvalidSubjectToken("the vault plugin's answer rests on no lookup")
        return dataclasses.replace(identity, issuer=VAULT)

    # --- SubjectVerifier: what plugins call -------------------------------------------------

    async def verify_jwt(self, token: str, issuer: ExternalIssuerSettings,
                         algorithms: tuple[str, ...]) -> dict[str, object]:
        found = self._by_iss.get(issuer.issuer)
        if found is None or found[1] != issuer:
            raise InvalidSubjectToken("not a configured issuer")
        name = found[0]
        header, _payload = unverified_parts(token)
        if FORBIDDEN_HEADERS & header.keys():
            raise InvalidSubjectToken("forbidden header (jku, x5u, jwk, x5c or crit)")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms(issuer, algorithms):
            raise InvalidSubjectToken("algorithm not allowed for this issuer")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_CHARS):
            raise InvalidSubjectToken("malformed kid")
        key = await self._keys[name].key_for(kid, alg)
        claims = decode(token, key, alg, issuer, time.time())
        proofs = _proofs.get()
        if proofs is not None:
            proofs.jwts.append((issuer.issuer, token, claims["sub"]))
        return claims

    async def vault_lookup_self(self, token: str) -> dict[str, object]:
        data = await asyncio.to_thread(lookup_self, self.settings.vault, token)
        proofs = _proofs.get()
        if proofs is not None:
            proofs.vault.append(token)
        return data

    async def post_json(self, url: str, body: object, *, bearer: str, ca_file: str | None,
                        timeout_s: float) -> dict[str, object]:
        if not url.startswith(("https://", "http://")):
            raise InvalidSubjectToken("the issuer API URL is not http(s)")
        answer = await self._http.send("POST", url, ca_file=ca_file, timeout_s=timeout_s,
                                       max_bytes=POST_MAX_BYTES, body=body, bearer=bearer)
        if isinstance(answer, str):
            log.warning("issuer API call failed: %s", answer)
            raise IssuerUnavailable()
        status, data = answer
        if status >= 500:
            # The API server failing is an outage, never a verdict on the token (nor the reverse).
            log.warning("issuer API answered %d", status)
            raise IssuerUnavailable()
        if not 200 <= status < 300:
            raise InvalidSubjectToken(f"the issuer API answered {status}")
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            raise InvalidSubjectToken("the issuer API answered no JSON") from None
        if not isinstance(value, dict):
            raise InvalidSubjectToken("the issuer API answered no JSON object")
        return value
