"""The provider plugin interface: the one module of ``broker`` that plugins import (with
:mod:`broker.errors` and :mod:`broker.settings`).

A provider plugin is a :class:`ProviderPlugin` registered under the entry-point group
``broker.providers`` (found by :func:`broker.plugins.load_plugins`); the entry point's name is
the plugin name that ``providers.<name>.plugin`` refers to. Its ``create`` receives a
:class:`ProviderConfig` and returns a :class:`Provider`, which knows its wire format:
how to estimate a request's input, read and clamp its output-token limit, build the upstream
request, and read usage from a response or a stream. The gateway owns everything else (money,
keys, limits, the HTTP client), so a plugin never sees a broker token or a budget.

Plugins are found once at start. A duplicate name is refused and a plugin that fails to load
stops the start: a gateway that silently lost a provider would be worse than one that does not
start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import httpx

from broker.errors import ConfigError
from broker.plugins import load_plugins
from broker.settings import ProviderSettings

ENTRY_POINT_GROUP = "broker.providers"

# chat: OpenAI /v1/chat/completions; embeddings: OpenAI /v1/embeddings; messages: Anthropic.
Operation = Literal["chat", "embeddings", "messages"]
# Why the broker ends a stream before the provider did.
EndReason = Literal["limit", "revoked", "upstream"]

# Flat allowance for an image, audio clip or document part whose size the broker cannot see
# cheaply (the largest image most providers bill is about this many tokens).
MEDIA_TOKENS = 1_600
_MEDIA_PARTS = frozenset(
    {"image_url", "image", "input_image", "input_audio", "audio", "file", "document", "input_file"}
)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ProviderConfig:
    """One ``[providers.<name>]`` table, as a plugin sees it."""

    name: str
    plugin: str
    base_url: str | None
    timeout_s: float
    has_key: bool  # a Vault path is configured; the key itself never reaches the factory

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


class StreamMeter(Protocol):
    """Reads one upstream stream event by event, for money, not for content."""

    usage: Usage | None  # the latest counts the provider reported
    final: bool  # ``usage`` is the provider's final count for the whole answer
    streamed_tokens: int  # output tokens estimated from what was streamed so far
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

    def estimate_input_tokens(self, op: Operation, body: dict[str, Any]) -> int:
        """An estimate of the request's input tokens that errs high, never low, for text."""
        ...

    def output_limit(self, op: Operation, body: dict[str, Any]) -> tuple[int | None, int]:
        """(the output-token limit the client asked for or None, how many answers it asked
        for); raises :class:`broker.errors.InvalidRequest` when they are malformed."""
        ...

    def set_output_limit(self, op: Operation, body: dict[str, Any], limit: int) -> None:
        """Lower (or set) the output-token limit of ``body`` to ``limit`` per answer."""
        ...

    def ask_stream_usage(self, op: Operation, body: dict[str, Any]) -> bool:
        """Make the provider report usage in the stream; True when the client asked itself."""
        ...

    def build_request(
        self, op: Operation, body: dict[str, Any], *, key: str, client_headers: Mapping[str, str]
    ) -> UpstreamRequest:
        """The upstream request: the URL from configuration, the provider key, an allowlist of
        the client's headers (never its credentials)."""
        ...

    def read_usage(self, op: Operation, response: Any) -> Usage | None:
        """The usage a non-stream response reports, or None when it reports none."""
        ...

    def estimate_output_tokens(self, op: Operation, response: Any) -> int:
        """Output tokens estimated from a non-stream response's content."""
        ...

    def stream_meter(self, op: Operation, *, client_wants_usage: bool) -> StreamMeter: ...


# --- helpers for plugins -----------------------------------------------------------------


def text_tokens(text: str) -> int:
    """Tokens in ``text``, estimated high: one per 4 ASCII characters (the usual English ratio,
    rounded up) and one per other character, since non-Latin scripts tokenize densely."""
    if text.isascii():
        return -(-len(text) // 4)
    wide = sum(1 for ch in text if ord(ch) > 127)
    return -(-(len(text) - wide) // 4) + wide


def output_tokens(text: str) -> int:
    """Tokens in generated ``text``: models emit short words as one token each, so the word
    count bounds the estimate from below."""
    return max(text_tokens(text), len(text.split()))


def content_tokens(value: Any, depth: int = 0) -> int:
    """Tokens of every string inside a JSON value, media parts counted as :data:`MEDIA_TOKENS`."""
    if isinstance(value, str):
        return text_tokens(value)
    if depth > 32:
        return 0
    if isinstance(value, list):
        return sum(content_tokens(v, depth + 1) for v in value)
    if isinstance(value, dict):
        if value.get("type") in _MEDIA_PARTS:
            return MEDIA_TOKENS
        return sum(content_tokens(v, depth + 1) for v in value.values())
    return 0


def strings(value: Any, skip: frozenset[str] = frozenset(), depth: int = 0) -> list[str]:
    """Every string inside a JSON value, except under the keys in ``skip``."""
    if isinstance(value, str):
        return [value]
    if depth > 32:
        return []
    if isinstance(value, list):
        return [s for v in value for s in strings(v, skip, depth + 1)]
    if isinstance(value, dict):
        return [s for k, v in value.items() if k not in skip for s in strings(v, skip, depth + 1)]
    return []


def positive_int(value: Any) -> int | None:
    """``value`` when it is a JSON integer of at least 1, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def json_bytes(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sse(data: Any, event: str | None = None) -> bytes:
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


# --- the registry ------------------------------------------------------------------------


@runtime_checkable
class ProviderPlugin(Protocol):
    """What an entry point of the ``broker.providers`` group names: a factory of providers."""

    def create(self, config: ProviderConfig) -> Provider:
        """A provider for one ``[providers.<name>]`` table; a bad table is a
        :class:`ConfigError` naming the key (see :meth:`ProviderConfig.key`)."""
        ...


def load_provider_plugins() -> dict[str, ProviderPlugin]:
    """Every installed provider plugin by entry-point name (a duplicate or a plugin that fails
    to load is a :class:`ConfigError`)."""
    return load_plugins(ENTRY_POINT_GROUP, ProviderPlugin)  # type: ignore[type-abstract]


def build_providers(
    providers: Mapping[str, ProviderSettings],
    plugins: Mapping[str, ProviderPlugin] | None = None,
) -> dict[str, Provider]:
    """Build every configured provider through its plugin; a missing plugin or a bad table is
    a :class:`ConfigError` naming the key."""
    plugins = load_provider_plugins() if plugins is None else plugins
    built: dict[str, Provider] = {}
    for name, settings in providers.items():
        plugin = settings.plugin or name
        factory = plugins.get(plugin)
        if factory is None:
            known = ", ".join(sorted(plugins)) or "none installed"
            raise ConfigError(
                f"invalid configuration: providers.{name}.plugin: no provider plugin {plugin!r} "
                f"(known: {known})"
            )
        config = ProviderConfig(
            name=name,
            plugin=plugin,
            base_url=settings.base_url,
            timeout_s=settings.timeout_s,
            has_key=settings.vault_path is not None,
        )
        built[name] = factory.create(config)
    return built
