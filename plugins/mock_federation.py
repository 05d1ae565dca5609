"""The fake providers' token exchanges: a workload signs a short JWT, the provider checks it
against the issuer it registered and answers a minutes-long access token.

- OpenAI (RFC 8693; the `openai-node` SDK's workload identity, whose real endpoint is
  `https://auth.openai.com/oauth/token`): `POST /oauth/token`, a JSON body
  `{"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token",
  "subject_token_type": "urn:ietf:params:oauth:token-type:jwt" (or `…:id_token`),
  "identity_provider_id", "service_account_id"}` -> `{"access_token", "issued_token_type":
  "urn:ietf:params:oauth:token-type:access_token", "token_type": "Bearer", "expires_in"}`. The
  JWKS is the document uploaded with the identity provider (`MockState.openai_idp`).
- Anthropic (RFC 7523; the TypeScript SDK's `lib/credentials/oidc-federation.ts`):
  `POST /v1/oauth/token` with `anthropic-beta` holding `oidc-federation-2026-04-01`, a JSON body
  `{"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion",
  "federation_rule_id", "organization_id", "service_account_id"?, "workspace_id"?}` ->
  `{"access_token", "token_type": "Bearer", "expires_in"}`. The JWKS is discovered on every
  exchange: `GET {issuer}/.well-known/openid-configuration` (its `issuer` must be the rule's),
  then its `jwks_uri`. The token works on `/v1/messages` only as `Authorization: Bearer` with
  the OAuth beta `oauth-2025-04-20` in `anthropic-beta`, as the SDK sends it.

The assertion must be signed (RS*, PS*, ES* or EdDSA: never `none` or HS*) by the JWKS key its
`kid` names; carry the registered `iss` and `aud`, a `sub` (the registered one, when set), `iat`
and `exp` no more than 300 s apart, and be valid now (no leeway: the broker and the fake share
a clock). Refusals are OAuth errors `{"error", "error_description"}`: `unsupported_grant_type`
and `invalid_request` 400, `invalid_grant` 400 at OpenAI and 401 at Anthropic (whose SDK reads a
401 as "the federation rule does not match"); the statuses are the fake's choice.

A token lives `MockState.token_ttl_s` (600 s by default) by the fake's clock
(`MockState.token_expiry`). `MockState.exchanges` names the provider of each issued token,
`exchange_refusals` the reason of each refusal. Faults: `openai.token`, `anthropic.token` (see
:mod:`plugins.mock_provider_admin`), after the checks; with `after` the token is issued first.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import httpx
import jwt  # noqa: TID251 -- the fake provider checks the broker's assertions as a provider would
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from plugins.mock_provider_admin import accept, now, take_fault

if TYPE_CHECKING:
    from plugins.mock_upstream import MockState

Dialect = Literal["openai", "anthropic"]

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SUBJECT_TOKEN_TYPES = ("urn:ietf:params:oauth:token-type:jwt",
                       "urn:ietf:params:oauth:token-type:id_token")
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
FEDERATION_BETA = "oidc-federation-2026-04-01"
OAUTH_BETA = "oauth-2025-04-20"
ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                        "ES256", "ES384", "ES512", "EdDSA"})
MAX_ASSERTION_LIFE_S = 300
MAX_ASSERTION_BYTES = 16 * 1024  # Anthropic's documented limit
DISCOVERY_TIMEOUT_S = 5.0


@dataclass
class OpenAIIdentityProvider:
    """An external issuer registered with an OpenAI organization, and its uploaded JWKS."""

    id: str
    issuer: str
    audience: str
    jwks: dict[str, Any]
    service_account_id: str
    subject: str | None = None  # when set, the assertion's `sub` must be it


@dataclass
class AnthropicFederationRule:
    """An Anthropic federation rule: which issuer's tokens become which service account's."""

    id: str
    organization_id: str
    issuer: str
    audience: str
    service_account_id: str | None = None  # an exchange naming another one is refused
    workspace_id: str | None = None
    subject: str | None = None


@dataclass
class FederationState:
    """The token exchanges' part of `MockState`."""

    openai_idp: OpenAIIdentityProvider | None = None
    anthropic_rule: AnthropicFederationRule | None = None
    token_ttl_s: int = 600
    exchanges: list[Dialect] = field(default_factory=list)
    exchange_refusals: list[str] = field(default_factory=list)
    federated_tokens: dict[str, Dialect] = field(default_factory=dict)  # token -> its provider

    def forget_exchanges(self) -> None:
        """What `MockState.reset` forgets here: the record of exchanges."""
        self.exchanges.clear()
        self.exchange_refusals.clear()


class Refused(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.description = status, error, description


def _betas(request: Request) -> set[str]:
    return {v.strip() for v in request.headers.get("anthropic-beta", "").split(",")}


def key_refused(state: MockState, request: Request, key: str | None, dialect: Dialect) -> bool:
    """Whether a model route refuses `key`: none at all, one outside `valid_keys` (when set),
    one past its `token_expiry`, or a federated token of another provider or, at Anthropic,
    not sent as a bearer token with the OAuth beta."""
    if key is None or (state.valid_keys is not None and key not in state.valid_keys):
        return True
    expiry = state.token_expiry.get(key)
    if expiry is not None and now(state) >= expiry:
        return True
    issuer = state.federated_tokens.get(key)
    if issuer is None:
        return False
    if issuer != dialect:
        return True
    bearer = request.headers.get("authorization", "") == f"Bearer {key}"
    return dialect == "anthropic" and not (bearer and OAUTH_BETA in _betas(request))


def verify_assertion(token: str, jwks: Any, issuer: str, audience: str,
                     subject: str | None) -> None:
    """Raise :class:`Refused` unless `token` is an assertion the registration accepts."""

    def refuse(why: str) -> Refused:
        return Refused(400, "invalid_grant", why)

    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise refuse("the assertion is not a JWT") from None
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in ALGORITHMS:
        raise refuse(f"the assertion's alg {str(alg)[:16]!r} is not accepted")
    if not isinstance(kid, str):
        raise refuse("the assertion names no kid")
    raw = [k for k in (jwks.get("keys") if isinstance(jwks, dict) else None) or []
           if isinstance(k, dict) and k.get("kid") == kid]
    if not raw:
        raise refuse("no key of the issuer's JWKS has the assertion's kid")
    if raw[0].get("alg") not in (None, alg):
        raise refuse("the assertion's alg is not its key's")
    try:
        key = jwt.PyJWK(raw[0]).key
        claims = jwt.decode(token, key, algorithms=[alg], audience=audience, issuer=issuer,
                            options={"require": ["exp", "iat", "iss", "aud", "sub"]})
    except jwt.ExpiredSignatureError:
        raise refuse("the assertion has expired") from None
    except jwt.ImmatureSignatureError:
        raise refuse("the assertion is not valid yet") from None
    except jwt.InvalidAudienceError:
        raise refuse("the assertion's aud is not the registered audience") from None
    except jwt.InvalidIssuerError:
        raise refuse("the assertion's iss is not the registered issuer") from None
    except jwt.InvalidSignatureError:
        raise refuse("the assertion's signature does not verify") from None
    except (jwt.PyJWTError, TypeError, ValueError) as exc:
        raise refuse(f"the assertion is not acceptable ({type(exc).__name__})") from None
    exp, iat = claims["exp"], claims["iat"]
    if not isinstance(exp, int | float) or not isinstance(iat, int | float):
        raise refuse("exp and iat must be numbers")
    if exp - iat > MAX_ASSERTION_LIFE_S:
        raise refuse(f"the assertion lives longer than {MAX_ASSERTION_LIFE_S} s")
    if subject is not None and claims.get("sub") != subject:
        raise refuse("the assertion's sub is not the registered subject")


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise Refused(400, "invalid_request", f"{name} is required")
    return value


def _same(body: dict[str, Any], name: str, expected: str | None, status: int) -> None:
    if body.get(name) != expected:
        raise Refused(status, "invalid_grant", f"{name} does not match the registration")


class FederationApi:
    """The token endpoints, bound to one `MockState`."""

    def __init__(self, state: MockState) -> None:
        self.state = state

    def routes(self) -> list[Route]:
        return [Route("/oauth/token", self.openai, methods=["POST"]),
                Route("/v1/oauth/token", self.anthropic, methods=["POST"])]

    async def openai(self, request: Request) -> Response:
        return await self._exchange(request, "openai")

    async def anthropic(self, request: Request) -> Response:
        return await self._exchange(request, "anthropic")

    async def _exchange(self, request: Request, dialect: Dialect) -> Response:
        try:
            try:
                body = json.loads(await request.body())
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise Refused(400, "invalid_request", "the body must be a JSON object")
            if dialect == "openai":
                self._check_openai(body)
            else:
                await self._check_anthropic(request, body)
        except Refused as refusal:
            self.state.exchange_refusals.append(refusal.description)
            return _oauth_error(refusal.status, refusal.error, refusal.description)
        fault = take_fault(self.state, f"{dialect}.token")
        if fault is not None and not fault.after:
            return _fault(fault.status)
        token = self._issue(dialect)
        if fault is not None:
            return _fault(fault.status)
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer",
                                  "expires_in": self.state.token_ttl_s}
        if dialect == "openai":
            answer["issued_token_type"] = ACCESS_TOKEN_TYPE
        return JSONResponse(answer, headers={"cache-control": "no-store"})

    def _issue(self, dialect: Dialect) -> str:
        prefix = "sk-ant-oat01-mock-" if dialect == "anthropic" else "oai-wif-mock-"
        token = prefix + secrets.token_urlsafe(32)
        state = self.state
        accept(state, token)
        state.token_expiry[token] = now(state) + state.token_ttl_s
        state.federated_tokens[token] = dialect
        state.exchanges.append(dialect)
        return token

    def _check_openai(self, body: dict[str, Any]) -> None:
        idp = self.state.openai_idp
        if body.get("grant_type") != TOKEN_EXCHANGE:
            raise Refused(400, "unsupported_grant_type", "grant_type must be token-exchange")
        token = _field(body, "subject_token")
        if body.get("subject_token_type") not in SUBJECT_TOKEN_TYPES:
            raise Refused(400, "invalid_request", "subject_token_type must be a JWT or ID token")
        _field(body, "identity_provider_id")
        _field(body, "service_account_id")
        if idp is None:
            raise Refused(400, "invalid_grant", "no identity provider is registered")
        _same(body, "identity_provider_id", idp.id, 400)
        _same(body, "service_account_id", idp.service_account_id, 400)
        verify_assertion(token, idp.jwks, idp.issuer, idp.audience, idp.subject)

    async def _check_anthropic(self, request: Request, body: dict[str, Any]) -> None:
        rule = self.state.anthropic_rule
        if FEDERATION_BETA not in _betas(request):
            raise Refused(400, "invalid_request", f"anthropic-beta must hold {FEDERATION_BETA}")
        if body.get("grant_type") != JWT_BEARER:
            raise Refused(400, "unsupported_grant_type", "grant_type must be jwt-bearer")
        token = _field(body, "assertion")
        if len(token) > MAX_ASSERTION_BYTES:
            raise Refused(400, "invalid_request", "the assertion exceeds 16 KiB")
        _field(body, "federation_rule_id")
        _field(body, "organization_id")
        if rule is None:
            raise Refused(401, "invalid_grant", "no federation rule is registered")
        _same(body, "federation_rule_id", rule.id, 401)
        _same(body, "organization_id", rule.organization_id, 401)
        for name in ("service_account_id", "workspace_id"):
            if name in body:  # optional: absent, the rule's own applies
                _same(body, name, getattr(rule, name), 401)
        try:
            verify_assertion(token, await self._discover(rule.issuer), rule.issuer,
                             rule.audience, rule.subject)
        except Refused as refusal:
            refusal.status = 401
            raise

    async def _discover(self, issuer: str) -> Any:
        """The issuer's JWKS, by its discovery document (fetched on every exchange)."""
        url = httpx.URL(issuer)
        if url.scheme != "https" and url.host not in ("127.0.0.1", "localhost", "::1"):
            raise Refused(401, "invalid_grant", "the issuer must be https")
        try:
            async with httpx.AsyncClient(timeout=DISCOVERY_TIMEOUT_S) as client:
                found = await client.get(f"{issuer.rstrip('/')}/.well-known/openid-configuration")
                document = found.json() if found.status_code == 200 else None
                if not isinstance(document, dict) or document.get("issuer") != issuer:
                    raise Refused(401, "invalid_grant", "the issuer's discovery document does "
                                  "not name it")
                jwks_uri = document.get("jwks_uri")
                if not isinstance(jwks_uri, str):
                    raise Refused(401, "invalid_grant", "the discovery document has no jwks_uri")
                keys = await client.get(jwks_uri)
                return keys.json() if keys.status_code == 200 else None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError):
            raise Refused(401, "invalid_grant", "the issuer's keys could not be fetched") from None


def _oauth_error(status: int, error: str, description: str) -> Response:
    return JSONResponse({"error": error, "error_description": description}, status,
                        headers={"cache-control": "no-store"})


def _fault(status: int) -> Response:
    error = "temporarily_unavailable" if status >= 500 else "invalid_request"
    return _oauth_error(status, error, f"Injected fault: HTTP {status}.")


def federation_routes(state: MockState) -> list[Route]:
    """The token endpoints' routes, for `create_mock_upstream`."""
    return FederationApi(state).routes()
