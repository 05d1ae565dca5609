"""Access tokens (RFC 9068 JWTs): signing, and the one function that verifies them.

Verification fails closed and returns :class:`VerifiedToken`, a type distinct from any raw
payload, so code that needs a verified identity cannot be handed an unchecked one.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt

from broker.errors import InvalidToken
from broker.tokens.keys import Keyring

TOKEN_TYPE = "at+jwt"
LEEWAY_S = 30
MAX_TOKEN_BYTES = 8192
REQUIRED_CLAIMS = ("iss", "aud", "sub", "tenant", "kind", "jti", "iat", "exp")
# Headers that would let a token name its own verification key, or demand unknown processing.
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})


def new_jti() -> str:
    return secrets.token_urlsafe(18)


@dataclass(frozen=True)
class VerifiedToken:
    sub: str
    tenant: str
    kind: str
    jti: str
    iat: int
    exp: int
    models: tuple[str, ...]
    budget_micros: int
    roles: tuple[str, ...]
    act: dict[str, Any] | None
    claims: dict[str, Any] = field(repr=False)
    # Grants the token was issued under (:mod:`broker.approvals.grants`): it dies with any of
    # them, and at ``grant_exp`` (the soonest to expire) at the latest.
    grants: tuple[str, ...] = ()
    grant_models: tuple[str, ...] = ()
    # Tools (and ``batch``) behind approval that a live grant lets it use.
    grant_tools: tuple[str, ...] = ()
    grant_exp: int | None = None
    # Delegation (RFC 8693 ``act``): the jtis and subs of the tokens this one was delegated
    # from, nearest first. It dies with any of them.
    ancestors: tuple[str, ...] = ()
    ancestor_subs: tuple[str, ...] = ()


MAX_ACT_DEPTH = 16


def act_chain(act: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(jtis, subs) of a delegation chain, nearest first; TypeError when malformed."""
    jtis: list[str] = []
    subs: list[str] = []
    while act is not None:
        if not isinstance(act, dict) or len(jtis) >= MAX_ACT_DEPTH:
            raise TypeError
        jtis.append(_str(act.get("jti")))
        subs.append(_str(act.get("sub")))
        act = act.get("act")
    return tuple(jtis), tuple(subs)


def sign(keyring: Keyring, claims: dict[str, Any]) -> str:
    key = keyring.current
    return jwt.encode(
        claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": TOKEN_TYPE}
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError("duplicate key")
        out[k] = v
    return out


def json_segment(part: str) -> dict[str, Any]:
    """One base64url part of a compact JWS as a JSON object; ``ValueError`` (or a base64 or
    Unicode error) when it is not one, or when it names a key twice: PyJWT would keep the last,
    and two parsers could then disagree about what was signed."""
    raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    value = json.loads(raw, object_pairs_hook=_no_duplicates)
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


def verify(token: str, keyring: Keyring, *, issuer: str, audience: str) -> VerifiedToken:
    """Verify signature, algorithm (pinned per ``kid``), type, time, issuer and audience.

    Every refusal raises the same :class:`InvalidToken`; the reason is never told to the caller.
    """
    if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
        raise InvalidToken()
    head, body, _sig = token.split(".")
    try:
        header = json_segment(head)
        json_segment(body)  # refuse duplicate claim names before PyJWT keeps the last one
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise InvalidToken() from None
    if FORBIDDEN_HEADERS & header.keys() or header.get("typ") != TOKEN_TYPE:
        raise InvalidToken()
    kid = header.get("kid")
    key = keyring.get(kid) if isinstance(kid, str) else None
    if key is None or header.get("alg") != key.alg:
        raise InvalidToken()
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key.public_key,
            algorithms=[key.alg],
            audience=audience,
            issuer=issuer,
            leeway=LEEWAY_S,
            options={
                "require": list(REQUIRED_CLAIMS),
                "verify_signature": True,
                "verify_exp": True,
                "verify_nbf": True,
                "verify_iat": True,
                "verify_aud": True,
                "verify_iss": True,
                "strict_aud": True,
            },
        )
    except jwt.PyJWTError:
        raise InvalidToken() from None
    try:
        ancestors, ancestor_subs = act_chain(claims.get("act"))
        return VerifiedToken(
            sub=_str(claims["sub"]),
            tenant=_str(claims["tenant"]),
            kind=_str(claims["kind"]),
            jti=_str(claims["jti"]),
            iat=_int(claims["iat"]),
            exp=_int(claims["exp"]),
            models=tuple(_str(m) for m in _list(claims.get("models", []))),
            budget_micros=_int(claims.get("budget_micros", 0)),
            roles=tuple(_str(r) for r in _list(claims.get("roles", []))),
            act=claims.get("act") if isinstance(claims.get("act"), dict) else None,
            claims=claims,
            grants=tuple(_str(g) for g in _list(claims.get("grants", []))),
            grant_models=tuple(_str(m) for m in _list(claims.get("grant_models", []))),
            grant_tools=tuple(_str(m) for m in _list(claims.get("grant_tools", []))),
            grant_exp=_int(claims["grant_exp"]) if "grant_exp" in claims else None,
            ancestors=ancestors,
            ancestor_subs=ancestor_subs,
        )
    except (TypeError, ValueError):
        raise InvalidToken() from None


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError
    return v


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise TypeError
    return v


class TokenGate(Protocol):
    """Revocation state: answers from memory whether a verified token is still live."""

    def is_live(self, token: VerifiedToken) -> bool: ...


class VerifiedCache:
    """Remembers tokens whose signature and claims were verified, so a token presented on every
    call of an agent's loop pays for Ed25519 verification once.

    A hit is re-checked for what changes with time: expiry (with the same leeway) and whether
    its signing key is still in the keyring (a retired key ends its tokens here too). This is
    no revocation state: the caller still asks the revocation gate on every call. Bounded: it
    forgets everything when full rather than grow.
    """

    def __init__(self, max_entries: int = 20_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[str, tuple[VerifiedToken, str]] = {}

    def verify(self, token: str, keyring: Keyring, *, issuer: str, audience: str,
               now: float) -> VerifiedToken:
        hit = self._entries.get(token)
        if hit is not None:
            verified, kid = hit
            if now <= verified.exp + LEEWAY_S and keyring.get(kid) is not None:
                return verified
            self._entries.pop(token, None)
        verified = verify(token, keyring, issuer=issuer, audience=audience)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[token] = (verified, _kid_of(token))
        return verified


def _kid_of(token: str) -> str:
    kid = json_segment(token.split(".", 1)[0]).get("kid")
    assert isinstance(kid, str)  # verify() accepted it, so it names a key
    return kid

