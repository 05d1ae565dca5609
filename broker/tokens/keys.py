"""Signing keys and the secret-hashing pepper, both held in Vault (KV v2).

Key material is read into memory at start and never written to disk or to the database. The
keyring document in Vault is changed only with check-and-set writes, so two replicas that start
(or rotate) at once cannot overwrite each other's keys: the loser re-reads.

A key moves through the states ``next`` (published in the JWKS, not yet signing), ``current``
(signs) and ``previous`` (published until every token it signed has expired, then dropped).
"""

from __future__ import annotations

import base64
import functools
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.errors import SlowDown
from broker.storage.vault import CasConflict, Vault
from broker.tokens.key_states import promoted, publish_order, retire_expired

ALG = "EdDSA"
# How many ``previous`` keys may verify live tokens at once. Each stays for a token lifetime
# after its rotation, so more means rotating faster than about once a minute; and the keyring is
# one Vault document, which OpenBao refuses past a few hundred strings (about 97 keys): without
# a bound, a burst of rotations made every later one fail until the oldest keys retired.
MAX_PREVIOUS_KEYS = 16


class RotationTooSoon(SlowDown):
    title = "Too many signing-key rotations; slow down"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    state: str  # next | current | previous
    created_at: int
    private_key: Ed25519PrivateKey = field(repr=False)
    retire_at: int | None = None  # for previous keys: when the last token it signed expires
    alg: str = ALG

    @functools.cached_property
    def public_key(self) -> Ed25519PublicKey:
        # Derived once: every verification asks for it.
        return self.private_key.public_key()

    def public_jwk(self) -> dict[str, str]:
        raw = self.public_key.public_bytes(
            encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
        )
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
            "kid": self.kid,
            "alg": self.alg,
            "use": "sig",
        }

    def to_doc(self) -> dict[str, Any]:
        pem = self.private_key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        ).decode()
        return {
            "kid": self.kid,
            "state": self.state,
            "created_at": self.created_at,
            "retire_at": self.retire_at,
            "alg": self.alg,
            "private_pem": pem,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> SigningKey:
        key = serialization.load_pem_private_key(doc["private_pem"].encode(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("signing key in Vault is not Ed25519")
        return cls(
            kid=doc["kid"],
            state=doc["state"],
            created_at=int(doc["created_at"]),
            retire_at=doc.get("retire_at"),
            private_key=key,
            alg=doc.get("alg", ALG),
        )


def new_key(state: str, now: int) -> SigningKey:
    return SigningKey(
        kid=f"k_{uuid.uuid4().hex[:16]}",
        state=state,
        created_at=now,
        private_key=Ed25519PrivateKey.generate(),
    )


class Keyring:
    """The in-memory view of the signing keys; refreshed from Vault on rotation."""

    def __init__(self, vault: Vault, max_token_lifetime_s: int):
        self._vault = vault
        self._path = vault.path("signing-keys")
        self._max_lifetime = max_token_lifetime_s
        self._keys: dict[str, SigningKey] = {}
        self._version = 0

    @property
    def keys(self) -> dict[str, SigningKey]:
        return self._keys

    @property
    def current(self) -> SigningKey:
        for key in self._keys.values():
            if key.state == "current":
                return key
        raise RuntimeError("keyring has no current key")  # load() guarantees one

    def get(self, kid: str) -> SigningKey | None:
        return self._keys.get(kid)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        keys = sorted(self._keys.values(), key=publish_order)
        return {"keys": [k.public_jwk() for k in keys]}

    def _apply(self, doc: dict[str, Any] | None, version: int) -> None:
        keys = [SigningKey.from_doc(d) for d in (doc or {}).get("keys", [])]
        self._keys = {k.kid: k for k in keys}
        self._version = version

    def load(self, now: int | None = None) -> None:
        """Read the keyring from Vault, creating the first current and next keys if none exist."""
        now = int(time.time()) if now is None else now
        while True:
            found = self._vault.read(self._path)
            if found is not None:
                self._apply(*found)
                if any(k.state == "current" for k in self._keys.values()):
                    return
            doc = {"keys": [new_key("current", now).to_doc(), new_key("next", now).to_doc()]}
            try:
                version = self._vault.write(self._path, doc, cas=found[1] if found else 0)
            except CasConflict:
                continue  # another replica created it first: use theirs
            self._apply(doc, version)
            return

    def rotate(self, now: int | None = None) -> SigningKey:
        """Promote next to current, demote current to previous, create a new next; drop previous
        keys whose tokens have all expired. Returns the new current key.

        :class:`RotationTooSoon` (with the seconds until the oldest previous key retires) when
        :data:`MAX_PREVIOUS_KEYS` previous keys still verify live tokens."""
        now = int(time.time()) if now is None else now
        while True:
            found = self._vault.read(self._path)
            if found is None:
                self.load(now)
                continue
            self._apply(*found)
            docs = promoted(self._keys.values(), now, now + self._max_lifetime + 30,
                            lambda state: new_key(state, now).to_doc())
            _refuse_past_bound(docs, now)
            try:
                version = self._vault.write(self._path, {"keys": docs}, cas=found[1])
            except CasConflict:
                continue
            self._apply({"keys": docs}, version)
            return self.current

    def retire_expired(self, now: int | None = None) -> list[str]:
        """Drop ``previous`` keys whose tokens have all expired; returns their kids."""
        now = int(time.time()) if now is None else now
        return retire_expired(self._vault, self._path, now, self._apply)

    def refresh(self) -> None:
        """Pick up a rotation made by another replica."""
        found = self._vault.read(self._path)
        if found is not None and found[1] != self._version:
            self._apply(*found)


def load_pepper(vault: Vault) -> bytes:
    """The HMAC pepper for client secrets, created once (check-and-set) and then only read."""
    path = vault.path("pepper")
    while True:
        found = vault.read(path)
        if found is not None:
            return base64.b64decode(found[0]["value"])
        value = secrets.token_bytes(32)
        try:
            vault.write(path, {"value": base64.b64encode(value).decode()}, cas=0)
        except CasConflict:
            continue
        return value


def _refuse_past_bound(docs: list[dict[str, Any]], now: int) -> None:
    """Refuse a rotation that would keep more than :data:`MAX_PREVIOUS_KEYS` previous keys
    (``docs``: the keys after it; only previous keys count)."""
    retiring = sorted(int(d.get("retire_at") or now) for d in docs if d["state"] == "previous")
    if len(retiring) > MAX_PREVIOUS_KEYS:
        wait = max(1, retiring[len(retiring) - MAX_PREVIOUS_KEYS - 1] - now)
        raise RotationTooSoon(
            f"{len(retiring) - 1} previous signing keys still verify live tokens; the next "
            f"rotation is possible in {wait} s", headers={"retry-after": str(wait)})
