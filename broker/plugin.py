"""The plugin contract: the one module of ``broker`` that plugins import.

Two kinds of plugin exist, both found through entry points so that a third party adds one by
installing a package (:mod:`broker.registry` loads them):

- a provider (group ``broker.providers``) is a :class:`ProviderPlugin` whose ``create`` receives
  a :class:`ProviderConfig` and returns a :class:`Provider`, which knows its wire format: how to
  bound a request's cost, read and clamp its output-token limit, build the upstream request, and
  read usage from a response or a stream. The gateway owns everything else (money, keys, limits,
  the HTTP client), so a plugin never sees a broker token or a budget;
- an auth method (group ``broker.auth_methods``) is either an :class:`AuthMethod` that turns
  the parameters of one OAuth grant into a broker identity, or an :class:`IssuerType` that
  verifies an external subject token (a Kubernetes service-account token, a GitHub Actions OIDC
  token, a SPIFFE JWT-SVID, a Vault token) for the token-exchange grant. The broker then maps
  the verified claims to a workload by the bindings stored with it: a plugin never names one.

The errors a plugin raises and the bounding helpers it builds a hold with are re-exported here,
so that a plugin needs nothing else from ``broker``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import httpx

from broker.credentials.contract import (
    ExchangeRequest,
    Federated,
    FederationTarget,
    KeyAdmin,
    KeyRef,
    KeyStatus,
    KeyWatch,
    MintedKey,
    ProviderAdminError,
    ProviderToken,
    SpendLimiter,
)
from broker.errors import (
    ConfigError,
    InvalidClient,
    InvalidRequest,
    InvalidSubjectToken,
    Unbounded,
)
from broker.money.bounds import (
    BoundContext,
    RequestBound,
    base64_data,
    check_fields,
    data_url,
    delta_tokens,
    image_rule,
    image_tokens,
    json_tokens,
    messages_tokens,
    pdf_tokens,
    text_tokens,
    unsized_tokens,
    without,
)
from broker.money.media import ANTHROPIC_PIXELS, OPENAI_COSTLIEST, ImageRule
from broker.money.pricing import NOTHING, CacheTtl, Usage
from broker.settings import ExternalIssuerSettings

__all__ = [
    "ANTHROPIC_PIXELS",
    "NOTHING",
    "OPENAI_COSTLIEST",
    "AuthContext",
    "AuthMethod",
    "BoundContext",
    "CacheTtl",
    "ClientCredentials",
    "ConfigError",
    "EndReason",
    "ExchangeRequest",
    "ExternalIdentity",
    "ExternalIssuerSettings",
    "Federated",
    "FederationTarget",
    "Identity",
    "ImageRule",
    "InvalidClient",
    "InvalidRequest",
    "InvalidSubjectToken",
    "IssuerType",
    "JsonObject",
    "KeyAdmin",
    "KeyRef",
    "KeyStatus",
    "KeyWatch",
    "MeterState",
    "MintedKey",
    "Operation",
    "Provider",
    "ProviderAdminError",
    "ProviderConfig",
    "ProviderPlugin",
    "ProviderToken",
    "RequestBound",
    "SpendLimiter",
    "SseEvent",
    "SseParser",
    "StreamMeter",
    "SubjectVerifier",
    "ToolUse",
    "Unbounded",
    "UpstreamRequest",
    "Usage",
    "base64_data",
    "base_url",
    "check_fields",
    "data_url",
    "delta_tokens",
    "ended_code",
    "ended_message",
    "image_rule",
    "image_tokens",
    "json_bytes",
    "json_tokens",
    "messages_tokens",
    "pdf_tokens",
    "positive_int",
    "sse",
    "text_tokens",
    "unsized_tokens",
    "without",
]

# A JSON request or response body as parsed (``json.loads``): a plugin narrows what it reads.
JsonObject = dict[str, object]

PROVIDERS_GROUP = "broker.providers"
AUTH_METHODS_GROUP = "broker.auth_methods"

# chat: OpenAI /v1/chat/completions; embeddings: OpenAI /v1/embeddings; responses: OpenAI
# /v1/responses; messages: Anthropic /v1/messages.
Operation = Literal["chat", "embeddings", "responses", "messages"]
# Why the broker ends a stream before the provider did.
EndReason = Literal["limit", "revoked", "upstream", "expired"]

@dataclass(frozen=True)
class ToolUse:
    """One tool a request offers the model, by the name a policy gives it (``policy.tools``).

    The gateway checks every one against the workload's policy, prices the server-side ones
    (``tools.<name>``) and caps their calls, so a plugin lists every tool the request names,
    even one it would refuse to bound."""

    name: str  # "function" for the client's own functions; else the tool type's policy name
    index: int  # its place in the request's ``tools``
    server: bool = False  # the provider runs it and bills each call
    max_calls: int | None = None  # the request's own cap on its calls, if it set one
    # The cap counts the calls of every shared tool together (OpenAI ``max_tool_calls``),
    # rather than this tool's alone (Anthropic ``max_uses``).
    shared: bool = False


@dataclass(frozen=True)
class ProviderConfig:
    """One ``[providers.<name>]`` table, as a plugin sees it."""

    name: str
    plugin: str
    base_url: str | None
    timeout_s: float
    has_key: bool  # a Vault path is configured; the key itself never reaches the factory
    # static | rotating | federated (``providers.<name>.credential``): a federated provider's
    # token is a bearer token, which some wire formats send differently from a key.
    credential: str = "static"
    project_id: str | None = None  # OpenAI: the project whose service accounts hold the keys

    def key(self, field: str) -> str:
        """The configuration key a :class:`ConfigError` about ``field`` should name."""
        return f"providers.{self.name}.{field}"


@dataclass(frozen=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str]
    content: bytes


@dataclass(frozen=True)
class SseEvent:
    """One server-sent event: its name, its data lines joined, and its bytes as received."""

    event: str | None
    data: str
    raw: bytes

    def json_object(self) -> JsonObject | None:
        """The event's data as a JSON object; None when it is not one (a ``[DONE]``, a
        keep-alive, a malformed event), which a meter passes on unread."""
        try:
            value = json.loads(self.data)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


class MeterState:
    """The state every :class:`StreamMeter` keeps, as a stream starts: a plugin's meter
    builds on it."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.final = False
        self.streamed_tokens = 0
        self.output_bound = 0
        self.done = False
        self.failed = False


_ENDED_MESSAGES: dict[str, str] = {
    "limit": "the broker ended the stream: the token's budget slice is spent",
    "revoked": "the broker ended the stream: the token was revoked",
    "expired": "the broker ended the stream: it reached its time limit",
}
_ENDED_CODES: dict[str, str] = {
    "limit": "insufficient_quota", "revoked": "token_revoked", "expired": "stream_time_limit",
}


def ended_message(reason: EndReason) -> str:
    """What a stream's closing error event tells the client of why it ended early."""
    return _ENDED_MESSAGES.get(reason, "the provider's stream ended before the answer was complete")


def ended_code(reason: EndReason) -> str:
    """The error code of a stream's closing error event (OpenAI dialects)."""
    return _ENDED_CODES.get(reason, "upstream_error")


class StreamMeter(Protocol):
    """Reads one upstream stream event by event, for money, not for content."""

    usage: Usage | None  # the latest counts the provider reported
    final: bool  # ``usage`` is the provider's final count for the whole answer
    streamed_tokens: int  # output tokens streamed so far, counted low: for the hold's wall
    output_bound: int  # output tokens streamed so far, counted high (UTF-8 bytes): for charging
    done: bool  # the provider's end-of-stream marker arrived
    failed: bool  # the provider reported an error inside the stream

    def read(self, event: SseEvent) -> bool:
        """Meter one event; False when it must not reach the client (usage it did not ask for)."""
        ...

    def epilogue(self, reason: EndReason) -> bytes:
        """The bytes that close the client's stream when the broker ends it early: a clean
        end for ``limit``, an error event otherwise."""
        ...


class Provider(Protocol):
    """One configured provider. Every method is pure and fast: it runs on the hot path."""

    config: ProviderConfig
    operations: frozenset[Operation]

    def transport(self) -> httpx.AsyncBaseTransport | None:
        """A transport of its own (in-process providers), or None for the shared network client."""
        ...

    def bound_request(
        self, op: Operation, body: JsonObject, ctx: BoundContext,
        client_headers: Mapping[str, str],
    ) -> RequestBound:
        """The most the provider can bill for the request's input (see :mod:`broker.money.bounds`):
        a proven upper bound, whatever the body holds. Raises :class:`broker.errors.Unbounded`
        naming the field for anything whose cost it cannot bound."""
        ...

    def output_limit(self, op: Operation, body: JsonObject) -> tuple[int | None, int]:
        """(the output-token limit the client asked for or None, how many answers it asked
        for); raises :class:`broker.errors.InvalidRequest` when they are malformed."""
        ...

    def set_output_limit(self, op: Operation, body: JsonObject, limit: int) -> None:
        """Lower (or set) the output-token limit of ``body`` to ``limit`` per answer."""
        ...

    def ask_stream_usage(self, op: Operation, body: JsonObject) -> bool:
        """Make the provider report usage in the stream; True when the client asked itself."""
        ...

    def tools(self, op: Operation, body: JsonObject) -> list[ToolUse]:
        """Every tool the request offers; :class:`broker.errors.InvalidRequest` when ``tools``
        is malformed."""
        ...

    def cap_tools(self, op: Operation, body: JsonObject, tool: ToolUse, calls: int,
                  result_tokens: int) -> None:
        """Cap the calls of a server-side ``tool`` (of every shared tool, for a shared cap) at
        ``calls``, and, where the provider enforces such a limit, the tokens one call's result
        may add at ``result_tokens``."""
        ...

    def continues(self, op: Operation, body: JsonObject) -> str | None:
        """The id of a context stored at the provider that this request continues (and the
        provider bills again as input), or None. The gateway bounds it by what it metered when
        that context was made (:attr:`BoundContext.prior_context_tokens`), and refuses an id
        it did not meter."""
        ...

    def build_request(
        self, op: Operation, body: JsonObject, *, key: str, client_headers: Mapping[str, str]
    ) -> UpstreamRequest:
        """The upstream request: the URL from configuration, the provider key, an allowlist of
        the client's headers (never its credentials)."""
        ...

    def read_usage(self, op: Operation, response: object) -> Usage | None:
        """The usage a non-stream response reports, or None when it reports none."""
        ...

    def output_bound(self, op: Operation, response: object) -> int:
        """An upper bound on the output tokens of a non-stream response that reports no usage
        (the UTF-8 bytes of what it generated)."""
        ...

    def stream_meter(self, op: Operation, *, client_wants_usage: bool) -> StreamMeter: ...


# --- helpers for plugins -----------------------------------------------------------------


def positive_int(value: object) -> int | None:
    """``value`` when it is a JSON integer of at least 1, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def json_bytes(body: object) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sse(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def base_url(config: ProviderConfig, default: str | None) -> str:
    """The provider's base URL without a trailing slash; only ``http(s)`` and from configuration."""
    url = config.base_url or default
    if not url:
        raise ConfigError(f"invalid configuration: {config.key('base_url')}: required")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise ConfigError(f"invalid configuration: {config.key('base_url')}: not a URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host or parsed.query or parsed.fragment:
        raise ConfigError(
            f"invalid configuration: {config.key('base_url')}: must be an http(s) URL "
            "without query or fragment"
        )
    return url.rstrip("/")


class SseParser:
    """Splits a byte stream into server-sent events (the framing only; data stays text)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SseEvent]:
        data = self._buffer + chunk
        if b"\r" in data:
            # A trailing CR may be the first half of a CRLF split across reads: keep it back.
            tail = b"\r" if data.endswith(b"\r") else b""
            data = data[: len(data) - len(tail)].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            data += tail
        *blocks, self._buffer = data.split(b"\n\n")
        return [parse_event(block) for block in blocks if block.strip(b"\n")]

    @property
    def pending(self) -> bytes:
        return self._buffer


def parse_event(block: bytes) -> SseEvent:
    event: str | None = None
    data: list[str] = []
    for line in block.decode("utf-8", "replace").split("\n"):
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    return SseEvent(event, "\n".join(data), block.strip(b"\n") + b"\n\n")


@runtime_checkable
class ProviderPlugin(Protocol):
    """What an entry point of the ``broker.providers`` group names: a factory of providers."""

    def create(self, config: ProviderConfig) -> Provider:
        """A provider for one ``[providers.<name>]`` table; a bad table is a
        :class:`ConfigError` naming the key (see :meth:`ProviderConfig.key`)."""
        ...


# --- auth methods ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCredentials:
    """What a caller presented; ``client_id`` keys the failure throttle."""

    client_id: str
    secret: str


class Identity(Protocol):
    """A broker identity, as an :class:`AuthContext` hands it out. An auth method returns one it
    was given; the broker refuses any other (a plugin cannot make up an identity)."""

    @property
    def client_id(self) -> str: ...


class AuthContext(Protocol):
    """What the broker lends an auth method, inside the issuance transaction."""

    def check_client_secret(self, client_id: str, secret: str) -> Identity | None:
        """The live identity whose secret matches (constant time, keyed hash), else None."""
        ...


@runtime_checkable
class AuthMethod(Protocol):
    """Turns the parameters of one OAuth grant into a broker identity."""

    grant_type: str

    def credentials(
        self, params: Mapping[str, object], basic: tuple[str, str] | None
    ) -> ClientCredentials:
        """Read the caller's credentials; raise ``InvalidClient``/``InvalidRequest`` if absent."""
        ...

    def authenticate(self, ctx: AuthContext, creds: ClientCredentials) -> Identity | None:
        """The identity the credentials prove, or None (one answer for every failure)."""
        ...


# --- external identities (token exchange, RFC 8693) ------------------------------------------


@dataclass(frozen=True)
class ExternalIdentity:
    """What a verified subject token says about who presents it.

    ``claims`` is what bindings match, by dotted path (``kubernetes.io.namespace``); it never
    holds the subject token itself or anything that would work as one.
    """

    issuer: str  # the configured issuer's name, as bindings name it ("vault" for Vault tokens)
    iss: str  # the token's own issuer (URL), for the audit
    sub: str
    jti: str | None
    claims: Mapping[str, object]


class SubjectVerifier(Protocol):
    """What the broker lends an :class:`IssuerType`: the checks every issuer shares, so that
    a plugin cannot forget one."""

    async def verify_jwt(
        self, token: str, issuer: ExternalIssuerSettings, algorithms: tuple[str, ...]
    ) -> dict[str, object]:
        """The claims of ``token`` once its signature (against the issuer's configured JWKS,
        with an algorithm both in ``algorithms`` and the issuer's own list), exact ``iss``, the
        configured ``aud``, ``exp``/``nbf`` (30 s leeway) and ``iat`` age are checked; else
        :class:`InvalidSubjectToken`."""
        ...

    async def vault_lookup_self(self, token: str) -> dict[str, object]:
        """The ``data`` of ``auth/token/lookup-self`` made with ``token`` at the broker's own
        Vault, without the token's ``id``; :class:`InvalidSubjectToken` when Vault refuses it."""
        ...

    async def post_json(self, url: str, body: object, *, bearer: str, ca_file: str | None,
                        timeout_s: float) -> dict[str, object]:
        """POST to a configured URL (never one from a request): no redirects, a size limit."""
        ...


@runtime_checkable
class IssuerType(Protocol):
    """Verifies the subject tokens of one kind of issuer (``auth.issuers.<name>.type``)."""

    issuer_type: str
    # The algorithms this kind of issuer may sign with; configuration can only narrow them.
    algorithms: tuple[str, ...]
    # Claim sets that pin one workload within an issuer, besides ``sub``: a binding must name
    # every claim of at least one of them (or ``sub``), else it is refused (422).
    pinning: tuple[tuple[str, ...], ...]

    async def verify(
        self, token: str, issuer: ExternalIssuerSettings | None, ctx: SubjectVerifier
    ) -> ExternalIdentity:
        """The identity the token proves; :class:`InvalidSubjectToken` otherwise. ``issuer``
        is the configured issuer the token claims to come from (None for ``vault``, whose
        tokens are checked at the broker's own Vault)."""
        ...
