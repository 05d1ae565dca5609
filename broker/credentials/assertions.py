"""The keys that sign the broker's assertions toward providers (``credential = "federated"``).

Toward a federated provider the broker is an OIDC issuer: it signs a short JWT (the assertion)
that the provider verifies against the keys published at ``/.well-known/assertion-jwks.json``
(``jwks_uri`` of ``/.well-known/openid-configuration``), and exchanges it for a provider token
(:mod:`broker.credentials.federated`).

These keys are apart from the access-token keyring (:mod:`broker.tokens.keys`): another Vault
document, other kids (``fed-…``), another JWKS. A provider that trusts the broker's assertions
must never accept one of its access tokens as an assertion, and a gateway client must never
pass an assertion off as an access token.

A key moves through the keyring's states: ``next`` (published, not signing), ``current``
(signs), ``previous`` (published until its last assertion has expired, plus a margin, then
dropped). A JWKS copy uploaded to a provider (some take an upload instead of fetching the URL)
holds ``next``, so it keeps verifying through the following rotation. The document is changed
with check-and-set writes only, so replicas that start or rotate at once agree on one set of
keys. Private keys never leave Vault and this process's memory.
"""

from __future__ import annotations

import base64
import functools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# The broker's outbound assertions are signed here, and only here.
import jwt  # noqa: TID251
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import Connection

from broker.errors import SlowDown, VaultUnavailable
from broker.settings import Settings
from broker.settings.credentials import MAX_ASSERTION_TTL_S
from broker.storage.audit import record
from broker.storage.bus import publish
from broker.storage.vault import CasConflict, Vault
from broker.tokens.key_states import promoted, publish_order, retire_expired

if TYPE_CHECKING:
    from broker.services import Services

log = logging.getLogger("broker.assertion_keys")

# ``vault.path(VAULT_NAME)``: the document that holds every assertion key.
VAULT_NAME = "assertion-keys"
KID_PREFIX = "fed-"
# How long a replaced key stays published after its last assertion expired: a provider that
# cached the JWKS, or a replica that missed the rotation and still signs with it, keeps
# verifying meanwhile.
RETIRE_MARGIN_S = 3600
# A rotation is refused while this many previous keys are still published: rotations are
# months apart, so more means a loop rotating, and the document must stay small for Vault.
MAX_PREVIOUS_KEYS = 8
# A replica re-reads the document before signing when its copy is older than this, in case it
# missed a rotation's announcement (the key it signs with would otherwise retire under it).
REREAD_S = 300.0
RSA_BITS = 2048
# Announced after every change of the document, so that every replica re-reads it.
ASSERTION_KEYS_MESSAGE_TYPE = "assertion_keys"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class AssertionRotationTooSoon(SlowDown):
    title = "Too many assertion-key rotations; slow down"


def _b64url_uint(value: int, length: int | None = None) -> str:
    raw = value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _generate(alg: str) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


@dataclass(frozen=True)
class AssertionKey:
    kid: str
    state: str  # next | current | previous
    created_at: int
    alg: str  # RS256 | ES256
    private_key: PrivateKey = field(repr=False)
    retire_at: int | None = None  # previous keys: when it leaves the JWKS

    @functools.cached_property
    def public_jwk(self) -> dict[str, str]:
        """Built from the public key alone, so no private member can slip into the JWKS."""
        public = self.private_key.public_key()
        common = {"kid": self.kid, "alg": self.alg, "use": "sig"}
        if isinstance(public, rsa.RSAPublicKey):
            numbers = public.public_numbers()
            return {"kty": "RSA", "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e),
                    **common}
        assert isinstance(public, ec.EllipticCurvePublicKey)
        point = public.public_numbers()
        # RFC 7518 §6.2.1.2: the coordinates are the full 32 bytes of P-256, leading zeros kept.
        return {"kty": "EC", "crv": "P-256", "x": _b64url_uint(point.x, 32),
                "y": _b64url_uint(point.y, 32), **common}

    def to_doc(self) -> dict[str, Any]:
        pem = self.private_key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        ).decode()
        return {"kid": self.kid, "state": self.state, "created_at": self.created_at,
                "retire_at": self.retire_at, "alg": self.alg, "private_pem": pem}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> AssertionKey:
        key = serialization.load_pem_private_key(doc["private_pem"].encode(), password=None)
        alg = str(doc.get("alg"))
        return cls(kid=str(doc["kid"]), state=str(doc["state"]), created_at=int(doc["created_at"]),
                   alg=alg, private_key=_pinned(key, alg, str(doc.get("kid"))),
                   retire_at=None if doc.get("retire_at") is None else int(doc["retire_at"]))


def _pinned(key: object, alg: str, kid: str) -> PrivateKey:
    """The key, when it is of its ``alg``: a document edited to claim RS256 for an EC key (or
    holding a weak RSA key) is refused rather than published."""
    if isinstance(key, rsa.RSAPrivateKey) and alg == "RS256" and key.key_size >= RSA_BITS:
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and alg == "ES256" \
            and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ValueError(f"assertion key {kid!r} in Vault does not match its alg")


def new_key(state: str, now: int, alg: str) -> AssertionKey:
    return AssertionKey(kid=KID_PREFIX + secrets.token_hex(8), state=state, created_at=now,
                        alg=alg, private_key=_generate(alg))


class AssertionKeys:
    """The in-memory view of the assertion keys, read from Vault on first use (and created
    there, on a fresh Vault) and re-read after a rotation.

    ``federation.assertion_alg`` is the algorithm of the keys created from then on: a change
    reaches signing through rotations, and each published key names its own ``alg``."""

    def __init__(self, vault: Vault, settings: Settings) -> None:
        self._vault = vault
        self._path = vault.path(VAULT_NAME)
        self._alg = settings.federation.assertion_alg
        self._ttl = min(settings.federation.assertion_ttl_s, MAX_ASSERTION_TTL_S)
        self._keys: dict[str, AssertionKey] = {}
        self._version = 0
        self._read_at = float("-inf")  # time.monotonic() of the last read of the document
        # Request threads may all find the keys unread at once: one of them reads.
        self._first_use = threading.Lock()

    @property
    def path(self) -> str:
        """The KV v2 path of the document (under the broker's Vault prefix)."""
        return self._path

    @property
    def loaded(self) -> bool:
        return bool(self._keys)

    @property
    def ttl_s(self) -> int:
        return self._ttl

    @property
    def current(self) -> AssertionKey:
        self._ensure()
        for key in self._keys.values():
            if key.state == "current":
                return key
        raise RuntimeError("the assertion keys have no current key")  # load() guarantees one

    @property
    def current_kid(self) -> str:
        return self.current.kid

    def states(self) -> dict[str, str]:
        """Each kid's state (what an audit entry records: never key material)."""
        return {k.kid: k.state for k in self._keys.values()}

    def algorithms(self) -> list[str]:
        """The algorithms of the published keys."""
        self._ensure()
        return sorted({k.alg for k in self._keys.values()})

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public keys: current, next, then previous ones."""
        self._ensure()
        keys = sorted(self._keys.values(), key=publish_order)
        return {"keys": [k.public_jwk for k in keys]}

    def sign(self, *, issuer: str, subject: str, audience: str, now: float | None = None) -> str:
        """An assertion for ``audience``, valid for ``federation.assertion_ttl_s`` (300 s at
        most). May read Vault: call it off the event loop."""
        self._ensure()
        if time.monotonic() - self._read_at > REREAD_S:
            try:
                self.refresh()
            except VaultUnavailable:
                # The keys in memory are still published for at least RETIRE_MARGIN_S.
                log.warning("Vault unavailable: assertions keep the assertion keys read before")
        key = self.current
        iat = int(time.time() if now is None else now)
        claims = {"iss": issuer, "sub": subject, "aud": audience, "iat": iat, "nbf": iat,
                  "exp": iat + self._ttl, "jti": secrets.token_urlsafe(18)}
        return jwt.encode(claims, key.private_key, algorithm=key.alg,
                          headers={"kid": key.kid, "typ": "JWT"})

    # --- the document in Vault ---------------------------------------------------------------

    def _ensure(self) -> None:
        if not self._keys:
            with self._first_use:
                if not self._keys:
                    self.load()

    def _apply(self, doc: dict[str, Any] | None, version: int) -> None:
        keys = [AssertionKey.from_doc(d) for d in (doc or {}).get("keys", [])]
        self._keys = {k.kid: k for k in keys}
        self._version = version
        self._read_at = time.monotonic()

    def load(self, now: int | None = None) -> None:
        """Read the keys from Vault, creating a current and a next key when there are none."""
        now = int(time.time()) if now is None else now
        while True:
            found = self._vault.read(self._path)
            if found is not None:
                self._apply(*found)
                if any(k.state == "current" for k in self._keys.values()):
                    return
            keys = [new_key("current", now, self._alg), new_key("next", now, self._alg)]
            doc = {"keys": [k.to_doc() for k in keys]}
            try:
                version = self._vault.write(self._path, doc, cas=found[1] if found else 0)
            except CasConflict:
                continue  # another replica created them first: use theirs
            self._apply(doc, version)
            log.info("assertion keys created: current kid %s", keys[0].kid)
            return

    def refresh(self) -> None:
        """Pick up a change made by another replica."""
        found = self._vault.read(self._path)
        if found is None:
            return  # nothing to pick up; load() creates the keys on first use
        if found[1] != self._version:
            self._apply(*found)
        self._read_at = time.monotonic()

    def rotate(self, now: int | None = None) -> AssertionKey:
        """Promote next to current, demote current to previous, create a new next, drop
        previous keys past their ``retire_at``; returns the new current key.

        :class:`AssertionRotationTooSoon` while :data:`MAX_PREVIOUS_KEYS` previous keys are
        still published."""
        now = int(time.time()) if now is None else now
        while True:
            found = self._vault.read(self._path)
            if found is None:
                self.load(now)
                continue
            self._apply(*found)
            docs = promoted(self._keys.values(), now, now + self._ttl + RETIRE_MARGIN_S,
                            lambda state: new_key(state, now, self._alg).to_doc())
            previous = sorted(int(d["retire_at"] or now) for d in docs if d["state"] == "previous")
            if len(previous) > MAX_PREVIOUS_KEYS:
                wait = max(1, previous[len(previous) - MAX_PREVIOUS_KEYS - 1] - now)
                raise AssertionRotationTooSoon(
                    f"{len(previous) - 1} previous assertion keys are still published; the next "
                    f"rotation is possible in {wait} s", headers={"retry-after": str(wait)})
            try:
                version = self._vault.write(self._path, {"keys": docs}, cas=found[1])
            except CasConflict:
                continue
            self._apply({"keys": docs}, version)
            return self.current

    def retire_expired(self, now: int | None = None) -> list[str]:
        """Drop previous keys past their ``retire_at``; returns their kids."""
        now = int(time.time()) if now is None else now
        return retire_expired(self._vault, self._path, now, self._apply)


# --- for the scheduler (and an operator) ----------------------------------------------------


def rotate_assertion_key(svc: Services, actor: str = "scheduler", reason: str | None = "scheduled",
                         now: int | None = None) -> AssertionKey:
    """Rotate the assertion keys, audit it and tell every replica to re-read them; returns
    the new current key. Providers that fetch ``jwks_uri`` follow on their own; a JWKS copy
    uploaded to a provider must be uploaded again before the rotation after this one."""
    now = int(time.time()) if now is None else now
    key = svc.assertion_keys.rotate(now)
    states = svc.assertion_keys.states()

    def txn(conn: Connection) -> None:
        record(conn, actor, "assertion_key.rotate", key.kid, {"reason": reason, "keys": states},
               now)
        publish(conn, ASSERTION_KEYS_MESSAGE_TYPE)

    svc.db.transaction(txn)
    log.info("assertion key rotated: current kid %s", key.kid)
    return key


def retire_assertion_keys(svc: Services, actor: str = "scheduler",
                          now: int | None = None) -> list[str]:
    """Drop previous assertion keys past their ``retire_at``, audit it and tell every replica;
    returns their kids."""
    now = int(time.time()) if now is None else now
    gone = svc.assertion_keys.retire_expired(now)
    if not gone:
        return []

    def txn(conn: Connection) -> None:
        for kid in gone:
            record(conn, actor, "assertion_key.retire", kid,
                   {"reason": "its assertions have expired"}, now)
        publish(conn, ASSERTION_KEYS_MESSAGE_TYPE)

    svc.db.transaction(txn)
    log.info("retired assertion keys %s", ", ".join(gone))
    return gone
