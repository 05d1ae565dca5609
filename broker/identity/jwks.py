"""The keys of external issuers, and the one function that checks a subject token against them.

Keys come only from configuration (``jwks_url`` or ``jwks_file``), never from a token. Each key
is typed by what it is (an RSA key, an EC key on one named curve, an Ed25519 key), and a token's
algorithm must fit that type: "HS256 signed with the RSA public key" and other algorithm
confusions fail here, whatever the JWKS or the token claims.

A fetched key set is cached per issuer and refreshed when older than ``jwks_max_age_s``; an
unknown ``kid`` refetches at most once per ``refetch_s``, and every caller waiting meanwhile
shares that one fetch, so a flood of forged kids cannot turn the broker against the issuer.
A failed fetch never drops a cached set: the keys that verified a minute ago still do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt  # noqa: TID251 -- subject tokens of other issuers are verified here, and only here
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.errors import InvalidSubjectToken
from broker.settings import ExternalIssuerSettings
from broker.tokens.tokens import LEEWAY_S

log = logging.getLogger("broker.identity.federation")

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

# Every algorithm the broker can verify, and the one kind of key each needs.
ALGORITHM_FAMILY: Mapping[str, str] = {
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA",
    "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
    "ES256": "P-256", "ES384": "P-384", "ES512": "P-521",
    "EdDSA": "Ed25519",
}
_CURVE_FAMILY: Mapping[str, str] = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
# The algorithm PyJWT builds a key of each kind with; the key's own ``alg`` is checked apart.
_LOADER: Mapping[tuple[str, str | None], str] = {
    ("RSA", None): "RS256",
    ("EC", "P-256"): "ES256", ("EC", "P-384"): "ES384", ("EC", "P-521"): "ES512",
    ("OKP", "Ed25519"): "EdDSA",
}
_PRIVATE_FIELDS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MIN_RSA_BITS = 2048
MAX_KEYS = 64
MAX_KID_CHARS = 256
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat")
POST_MAX_BYTES = 1_048_576
_MISSING = (-1, -1, -1)


class FetchFailed(Exception):
    """A key set could not be had; the message is a reason for the log (no token, no body)."""


@dataclass(frozen=True)
class VerificationKey:
    kid: str | None
    alg: str | None  # the algorithm the JWK itself names, if any: then the only one it serves
    family: str
    key: PublicKey

    def fits(self, alg: str) -> bool:
        return ALGORITHM_FAMILY.get(alg) == self.family and self.alg in (None, alg)


def _family(key: object) -> str | None:
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA" if key.key_size >= MIN_RSA_BITS else None
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _CURVE_FAMILY.get(key.curve.name)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return None


def _key(entry: object) -> VerificationKey | None:
    """One JWK as a verification key, or None when it cannot serve (wrong use, a symmetric or
    private key, an unsupported curve, a short RSA modulus, a malformed field)."""
    if not isinstance(entry, dict) or _PRIVATE_FIELDS & entry.keys():
        return None
    kid, alg, kty = entry.get("kid"), entry.get("alg"), entry.get("kty")
    if entry.get("use", "sig") != "sig":
        return None
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    if (kid is not None and not isinstance(kid, str)) or (alg is not None and not isinstance(alg, str)):
        return None
    loader = _LOADER.get((kty, None if kty == "RSA" else entry.get("crv")))  # type: ignore[arg-type]
    if loader is None:
        return None
    try:
        loaded = jwt.PyJWK(entry, loader).key
    except Exception:  # a malformed JWK is skipped, whatever PyJWT or cryptography raise for it
        return None
    family = _family(loaded)
    if family is None or (alg is not None and ALGORITHM_FAMILY.get(alg) != family):
        return None
    return VerificationKey(kid, alg, family, loaded)


def parse_jwks(document: object) -> tuple[VerificationKey, ...]:
    """The usable keys of a JWKS document; keys PyJWT cannot use are skipped, not fatal."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise FetchFailed("not a JWKS (a JSON object with keys)")
    keys = [key for key in map(_key, document["keys"][:MAX_KEYS]) if key is not None]
    return tuple(keys)


def select_key(keys: tuple[VerificationKey, ...], kid: str | None, alg: str) -> VerificationKey:
    """The one key that may verify a token with ``kid`` and ``alg``. Without a kid, only a key
    set with exactly one key fit for the algorithm answers: guessing among several would let
    a token pick its key."""
    if kid is None:
        fit = [key for key in keys if key.fits(alg)]
        if len(fit) != 1:
            raise InvalidSubjectToken("no kid, and not exactly one key fits the algorithm")
        return fit[0]
    named = [key for key in keys if key.kid == kid]
    if not named:
        raise UnknownKid()
    fit = [key for key in named if key.fits(alg)]
    if len(fit) != 1:
        raise InvalidSubjectToken("the key does not fit the algorithm")
    return fit[0]


class UnknownKid(InvalidSubjectToken):
    def __init__(self) -> None:
        super().__init__("unknown kid")


def decode(token: str, key: VerificationKey, alg: str, issuer: ExternalIssuerSettings,
           now: float) -> dict[str, Any]:
    """Every check of a subject token's signature and claims, each option spelled out."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=[alg],
            audience=issuer.audience,
            issuer=issuer.issuer,
            leeway=LEEWAY_S,
            options={
                "require": list(REQUIRED_CLAIMS),
                "verify_signature": True,
                "verify_exp": True,
                "verify_nbf": True,
                "verify_iat": True,
                "verify_aud": True,
                "verify_iss": True,
                "verify_sub": True,
                "verify_jti": True,
                "strict_aud": False,
                "enforce_minimum_key_length": True,
            },
        )
    except jwt.ExpiredSignatureError:
        raise InvalidSubjectToken("expired") from None
    except jwt.ImmatureSignatureError:
        raise InvalidSubjectToken("not yet valid (nbf or iat ahead)") from None
    except jwt.InvalidAudienceError:
        raise InvalidSubjectToken("wrong audience") from None
    except jwt.InvalidIssuerError:
        raise InvalidSubjectToken("wrong issuer") from None
    except jwt.MissingRequiredClaimError:
        raise InvalidSubjectToken("a required claim is missing") from None
    except jwt.InvalidSignatureError:
        raise InvalidSubjectToken("bad signature") from None
    except jwt.PyJWTError:
        raise InvalidSubjectToken("invalid token") from None
    for name in ("iat", "exp", "nbf"):
        value = claims.get(name, 0)
        # PyJWT reads "1700000000" as a time; a time claim that is not a JSON number is refused.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidSubjectToken(f"{name} is not a number")
    iat = claims["iat"]
    if iat > now + LEEWAY_S:
        raise InvalidSubjectToken("iat is in the future")
    if now - iat > issuer.max_age_s:
        raise InvalidSubjectToken("issued too long ago (max_age_s)")
    return claims


# --- fetching --------------------------------------------------------------------------------


class Http:
    """The outbound HTTP of federation: one shared client per CA bundle, opened lazily in the
    running event loop (a client belongs to the loop that opened it), never following a
    redirect, every answer size-bounded and the whole exchange under one deadline."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: dict[str | None, httpx.AsyncClient] = {}

    def _client(self, ca_file: str | None) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # The clients of a finished loop cannot be closed from this one; they are dropped.
            self._loop, self._clients = loop, {}
        client = self._clients.get(ca_file)
        if client is None:
            verify: ssl.SSLContext | bool = (
                ssl.create_default_context(cafile=ca_file) if ca_file else True)
            client = httpx.AsyncClient(
                follow_redirects=False, verify=verify,
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
                headers={"User-Agent": "ai-secrets-broker"})
            self._clients[ca_file] = client
        return client

    async def send(self, method: str, url: str, *, ca_file: str | None, timeout_s: float,
                   max_bytes: int, body: object = None,
                   bearer: str | None = None) -> tuple[int, bytes] | str:
        """(status, body) — the body only for a 2xx — or a reason for the log.

        Nothing raised here carries the request: its headers may hold a bearer credential and
        its body a subject token, so failures are returned as text, never chained."""
        headers = {"Accept": "application/json"}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        reason: str
        try:
            client = self._client(ca_file)
            async with asyncio.timeout(timeout_s), client.stream(
                    method, url, headers=headers, timeout=timeout_s, json=body) as response:
                if not 200 <= response.status_code < 300:
                    return response.status_code, b""
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    return "answer too large"
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        return "answer too large"
                return response.status_code, bytes(data)
        except (TimeoutError, httpx.TimeoutException):
            reason = "timed out"
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
            reason = f"network error ({type(exc).__name__})"
        return reason

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def _json(data: bytes) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise FetchFailed("not JSON") from None


class IssuerKeys:
    """The cached key set of one issuer."""

    def __init__(self, name: str, settings: ExternalIssuerSettings, http: Http,
                 clock: Callable[[], float]) -> None:
        self.name = name
        self.settings = settings
        self._http = http
        self._clock = clock
        self.fetches = 0
        self._keys: tuple[VerificationKey, ...] | None = None
        self._loaded_at = -math.inf
        self._attempted_at = -math.inf
        self._inflight: asyncio.Future[None] | None = None
        self._file_stamp: tuple[int, int, int] | None = None

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey:
        keys = await self._current()
        try:
            return select_key(keys, kid, alg)
        except UnknownKid:
            if self.settings.jwks_file is not None or not (self._pending() or self._may_fetch()):
                raise
        await self._refresh()
        return select_key(self._keys or (), kid, alg)

    def _may_fetch(self) -> bool:
        return self._clock() - self._attempted_at >= self.settings.refetch_s

    def _pending(self) -> bool:
        """A fetch is under way in this loop: joining it costs nothing."""
        inflight = self._inflight
        return (inflight is not None and not inflight.done()
                and inflight.get_loop() is asyncio.get_running_loop())

    async def _current(self) -> tuple[VerificationKey, ...]:
        if self.settings.jwks_file is not None:
            self._read_file(self.settings.jwks_file)
        elif self._clock() - self._loaded_at > self.settings.jwks_max_age_s and (
                self._pending() or self._may_fetch()):
            await self._refresh()
        if self._keys is None:
            raise InvalidSubjectToken("jwks unavailable")
        return self._keys

    def _refresh(self) -> asyncio.Future[None]:
        """The one fetch in flight, started if none is: every caller awaits the same one, and
        a caller that gives up (a client gone) does not cancel it for the others."""
        inflight = self._inflight
        if inflight is None or not self._pending():
            self._attempted_at = self._clock()
            self.fetches += 1
            inflight = self._inflight = asyncio.ensure_future(self._fetch())
        return asyncio.shield(inflight)

    async def _fetch(self) -> None:
        url = self.settings.jwks_url
        assert url is not None
        try:
            answer = await self._http.send(
                "GET", url, ca_file=self.settings.ca_file, timeout_s=self.settings.fetch_timeout_s,
                max_bytes=self.settings.jwks_max_bytes)
            if isinstance(answer, str):
                raise FetchFailed(answer)
            if answer[0] != 200:
                raise FetchFailed(f"status {answer[0]} (redirects are not followed)")
            keys = parse_jwks(_json(answer[1]))
        except FetchFailed as exc:
            self._failed(str(exc))
        except Exception as exc:  # the fetch task must never die unobserved
            self._failed(type(exc).__name__)
        else:
            self._keys, self._loaded_at = keys, self._clock()
            log.info("issuer %s: %d usable keys fetched", self.name, len(keys))

    def cancel(self) -> None:
        """Stop a fetch in flight (at shutdown, before the client it uses is closed)."""
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()

    def _failed(self, reason: str) -> None:
        kept = "keeps its cached keys" if self._keys is not None else "has no keys"
        log.warning("issuer %s: JWKS fetch failed: %s; it %s", self.name, reason, kept)

    def _read_file(self, path: str) -> None:
        """Re-read the file when it changed (a mounted ConfigMap is replaced, not edited)."""
        try:
            stat = os.stat(path)
        except OSError as exc:
            if self._file_stamp != _MISSING:  # once per disappearance, not once per token
                self._file_stamp = _MISSING
                self._failed(f"jwks_file unreadable ({type(exc).__name__})")
            return
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp == self._file_stamp:
            return
        self._file_stamp = stamp
        self.fetches += 1
        try:
            if stat.st_size > self.settings.jwks_max_bytes:
                raise FetchFailed("jwks_file too large")
            with open(path, "rb") as handle:
                data = handle.read(self.settings.jwks_max_bytes + 1)
            if len(data) > self.settings.jwks_max_bytes:
                raise FetchFailed("jwks_file too large")
            self._keys, self._loaded_at = parse_jwks(_json(data)), self._clock()
        except (FetchFailed, OSError) as exc:
            self._failed(str(exc) if isinstance(exc, FetchFailed) else type(exc).__name__)
