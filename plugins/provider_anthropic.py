"""The ``anthropic`` provider plugin, and the Anthropic Messages wire format.

Usage is always in the answer: ``message_start`` carries the input tokens, and the last
``message_delta`` the output tokens of the whole answer. Cache reads and writes are reported
apart (``cache_read_input_tokens``, ``cache_creation_input_tokens`` with its five-minute and
one-hour split) and are charged at their own prices.

The hold's input bound (see :mod:`broker.money.bounds`): every field the plugin knows is counted as
text; images by Anthropic's pixel rule, PDF documents by their pages, text documents by their
bytes; a request that may write the prompt cache is held at the cache-write price (twice the
input price for a one-hour cache); Anthropic's own client tools add their documented hidden
prompt, held at a ceiling. Server-side tools, remote MCP servers, code-execution containers, an
``anthropic-beta`` value outside ``providers.<name>.allowed_beta`` and any unknown field or
content block are refused.

Credentials without a static key (:class:`AnthropicProvider`):

- Watched keys (:class:`KeyWatch`): the Admin API cannot create keys, only report them, with
  the admin key as ``x-api-key`` (``GET /v1/organizations/api_keys[/{id}]``, paged by
  ``after_id``). A key without a known id is found by its ``partial_key_hint``
  (``sk-ant-api03-R2D...igAA``: the key's start and end). ``expires_at`` is RFC 3339 or null.
- Federation (:class:`Federated`): the RFC 7523 jwt-bearer exchange of the SDK's
  ``oidcFederationProvider`` (``lib/credentials/oidc-federation.ts``), a JSON body sent with
  the OAuth and federation betas in ``anthropic-beta``. The token then goes as ``Authorization:
  Bearer`` with the OAuth beta added to the client's betas, never as ``x-api-key``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from broker.plugin import (
    ANTHROPIC_PIXELS,
    BoundContext,
    CacheTtl,
    ConfigError,
    EndReason,
    ExchangeRequest,
    FederationTarget,
    InvalidRequest,
    KeyStatus,
    MeterState,
    Operation,
    ProviderConfig,
    ProviderToken,
    RequestBound,
    SseEvent,
    ToolUse,
    Unbounded,
    UpstreamRequest,
    Usage,
    base64_data,
    base_url,
    check_fields,
    delta_tokens,
    ended_message,
    image_rule,
    image_tokens,
    json_bytes,
    json_tokens,
    messages_tokens,
    pdf_tokens,
    positive_int,
    sse,
    unsized_tokens,
    without,
)
from plugins.provider_admin_http import AdminHttp, path_part, read_token

API_VERSION = "2023-06-01"
# ``anthropic-beta`` of a request made with an OAuth token, and of the token exchange (the
# values of the SDK's ``lib/credentials/types.ts``).
OAUTH_BETA = "oauth-2025-04-20"
FEDERATION_BETA = "oidc-federation-2026-04-01"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
PER_REQUEST_TOKENS = 3
PER_MESSAGE_TOKENS = 4
# The tool-use system prompt Anthropic adds when tools are offered (documented: up to 530).
TOOL_FRAMING_TOKENS = 1024
# Anthropic-defined tools the client runs: their definitions are a hidden prompt of a documented
# size (bash 245, text editor about 700, computer 735 plus 499 of system prompt), held at a
# ceiling well above it.
CLIENT_TOOL_TOKENS = {"bash_": 1_000, "text_editor_": 1_500, "computer_": 2_500}
# Server-side tools billed per call (``usage.server_tool_use.<name>_requests``), whose results
# are input tokens: the gateway prices and caps them (``max_uses``); their definitions are a
# hidden prompt too, held at this ceiling. Code execution is billed by container time: refused.
SERVER_TOOL_TOKENS = {"web_search": 1_000, "web_fetch": 1_000}
SERVER_TOOLS = frozenset({"web_search", "web_fetch", "code_execution"})
# Betas that change the price in ways the broker does not model, refused even when allowed:
# the 1M-token context bills a prompt past 200k tokens at twice the input price.
UNPRICED_BETAS = ("context-1m",)
_DATED = re.compile(r"_\d{8}$")
FIELDS = frozenset({
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
    "temperature", "top_k", "top_p", "tools", "tool_choice", "thinking", "service_tier",
})
REFUSED = {
    "mcp_servers": "remote MCP servers add tool definitions and results the broker cannot "
                   "see or bound",
    "container": "code-execution containers are billed by the hour, which the broker does "
                 "not price",
}
SERVICE_TIERS = frozenset({"auto", "standard_only"})
# Content blocks whose whole content is text the model reads (a past turn's tool calls and
# results, thinking, search results).
TEXT_BLOCKS = frozenset({
    "text", "thinking", "redacted_thinking", "tool_use", "server_tool_use", "search_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result", "text_editor_code_execution_tool_result",
})
_PASSED_HEADERS = ("anthropic-version", "anthropic-beta")


def _count(raw: Mapping[str, Any], name: str) -> int | None:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _input_usage(raw: Mapping[str, Any]) -> Usage | None:
    """The input side of a usage object: uncached, cache reads and cache writes (split into
    five-minute and one-hour writes when the provider says so)."""
    base = _count(raw, "input_tokens")
    if base is None:
        return None
    read = _count(raw, "cache_read_input_tokens") or 0
    written = _count(raw, "cache_creation_input_tokens") or 0
    split = raw.get("cache_creation")
    hour = 0
    if isinstance(split, dict):
        hour = min(written, _count(split, "ephemeral_1h_input_tokens") or 0)
    return Usage(base + read + written, 0, cached_tokens=read,
                 cache_write_tokens=written - hour, cache_write_1h_tokens=hour)


def _with_output(usage: Usage, output: int) -> Usage:
    return dataclasses.replace(usage, completion_tokens=output)


def _server_tool_calls(raw: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    """``usage.server_tool_use``: ``{"web_search_requests": 3}`` is three ``web_search`` calls."""
    counts = raw.get("server_tool_use")
    if not isinstance(counts, dict):
        return ()
    found = []
    for key in counts:
        n = _count(counts, key)
        if isinstance(key, str) and key.endswith("_requests") and n:
            found.append((key[: -len("_requests")][:64], n))
    return tuple(sorted(found))


def tool_name(kind: str) -> str:
    """The policy's name of an Anthropic tool type: its date suffix dropped
    (``web_search_20250305`` is ``web_search``)."""
    return _DATED.sub("", kind)[:64]


def _delta_text(delta: Any) -> str:
    """The generated text of a content delta (text, thinking, a tool call's JSON, ...)."""
    if not isinstance(delta, dict):
        return ""
    return "".join(v for k, v in delta.items() if isinstance(v, str) and k != "type")


class AnthropicStreamMeter(MeterState):
    def read(self, event: SseEvent) -> bool:
        kind = event.event
        if kind == "ping":
            return True
        if kind == "message_stop":
            self.done = True
            return True
        if kind == "error":
            self.failed = True
            return True
        data = event.json_object()
        if data is None:
            return True
        if kind == "content_block_delta":
            low, high = delta_tokens(_delta_text(data.get("delta")))
            self.streamed_tokens += low
            self.output_bound += high
        elif kind == "content_block_start":
            self.output_bound += json_tokens(data.get("content_block"))
        elif kind == "message_start":
            message = data.get("message")
            raw = message.get("usage") if isinstance(message, dict) else None
            if isinstance(raw, dict):
                start = _input_usage(raw)
                if start is not None:
                    self.usage = _with_output(start, _count(raw, "output_tokens") or 0)
        elif kind == "message_delta":
            raw = data.get("usage")
            if isinstance(raw, dict) and (out := _count(raw, "output_tokens")) is not None:
                # The final delta may repeat the input counts; else message_start's stand.
                known = [u for u in (self._delta_input(raw), self.usage) if u is not None]
                if known:
                    reported = max(known, key=lambda u: u.prompt_tokens)
                    calls = _server_tool_calls(raw) or reported.tool_calls
                    self.usage = dataclasses.replace(reported, completion_tokens=out,
                                                     tool_calls=calls)
                    self.final = True
        return True

    def _delta_input(self, raw: Mapping[str, Any]) -> Usage | None:
        """The input counts a ``message_delta`` repeats. It does not repeat how the cache
        writes split into five-minute and one-hour ones (``cache_creation``): without it,
        ``message_start``'s split stands, or one-hour writes would be charged as five-minute
        ones, below the bill."""
        usage = _input_usage(raw)
        start = self.usage
        if usage is None or start is None or isinstance(raw.get("cache_creation"), dict):
            return usage
        written = usage.cache_write_tokens + usage.cache_write_1h_tokens
        hour = min(written, start.cache_write_1h_tokens)
        return dataclasses.replace(usage, cache_write_tokens=written - hour,
                                   cache_write_1h_tokens=hour)

    def epilogue(self, reason: EndReason) -> bytes:
        if reason == "limit":
            delta = {"type": "message_delta",
                     "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                     "usage": {"output_tokens": self.streamed_tokens}}
            return sse(delta, "message_delta") + sse({"type": "message_stop"}, "message_stop")
        error = {"type": "api_error", "message": ended_message(reason)}
        return sse({"type": "error", "error": error}, "error")


class AnthropicWire:
    """The Anthropic Messages wire format, against ``self.base`` (without ``/v1``)."""

    operations: frozenset[Operation] = frozenset({"messages"})

    def __init__(self, config: ProviderConfig, base: str) -> None:
        self.config = config
        self.base = base

    def transport(self) -> httpx.AsyncBaseTransport | None:
        return None

    # --- the hold's bound ----------------------------------------------------------------

    def bound_request(
        self, op: Operation, body: dict[str, Any], ctx: BoundContext,
        client_headers: Mapping[str, str],
    ) -> RequestBound:
        check_fields(body, FIELDS, ctx, REFUSED)
        self._check_beta(client_headers.get("anthropic-beta"), ctx)
        tier = body.get("service_tier")
        if tier is not None and tier not in SERVICE_TIERS:
            raise Unbounded(f"service_tier: {str(tier)[:40]!r} is not a tier the broker prices",
                            param="service_tier")
        total = PER_REQUEST_TOKENS + json_tokens(without(body, ("messages",)))
        total += self._tool_tokens(body.get("tools"))
        total += messages_tokens(body.get("messages"), PER_MESSAGE_TOKENS,
                                 lambda block, where: self._block_tokens(block, where, ctx))
        return RequestBound(total, _cache_ttl(body))

    def _check_beta(self, header: str | None, ctx: BoundContext) -> None:
        if header is None:
            return
        for value in header.split(","):
            flag = value.strip()
            if flag.startswith(UNPRICED_BETAS):
                raise Unbounded(
                    f"anthropic-beta: {flag[:80]!r} bills long prompts at a premium the broker "
                    "does not price", param="anthropic-beta")
            if flag and flag not in ctx.allowed_beta:
                raise Unbounded(
                    f"anthropic-beta: {flag[:80]!r} is not allowed for this provider "
                    "(providers.<name>.allowed_beta)", param="anthropic-beta")

    def _tool_tokens(self, tools: Any) -> int:
        if tools is None:
            return 0
        if not isinstance(tools, list):
            raise InvalidRequest("tools must be a list", param="tools")
        total = TOOL_FRAMING_TOKENS if tools else 0
        for i, tool in enumerate(tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind is None or kind == "custom":
                continue
            ceiling = next((t for prefix, t in CLIENT_TOOL_TOKENS.items()
                            if isinstance(kind, str) and kind.startswith(prefix)), None)
            if ceiling is None and isinstance(kind, str):
                ceiling = SERVER_TOOL_TOKENS.get(tool_name(kind))
            if ceiling is None:
                raise Unbounded(
                    f"tools[{i}].type: {str(kind)[:60]!r} is a tool the broker cannot price",
                    param=f"tools[{i}].type")
            total += ceiling
        return total

    def tools(self, op: Operation, body: dict[str, Any]) -> list[ToolUse]:
        raw = body.get("tools")
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise InvalidRequest("tools must be a list", param="tools")
        found = []
        for i, tool in enumerate(raw):
            if not isinstance(tool, dict):
                raise InvalidRequest(f"tools[{i}] must be an object", param=f"tools[{i}]")
            kind = tool.get("type")
            if kind is None or kind == "custom":
                found.append(ToolUse("function", i))
                continue
            if not isinstance(kind, str) or not kind:
                raise InvalidRequest(f"tools[{i}].type must be a string", param=f"tools[{i}].type")
            name = tool_name(kind)
            if name not in SERVER_TOOLS:
                found.append(ToolUse(name, i))
                continue
            cap = tool.get("max_uses")
            if cap is not None and positive_int(cap) is None:
                raise InvalidRequest(f"tools[{i}].max_uses must be a positive integer",
                                     param=f"tools[{i}].max_uses")
            found.append(ToolUse(name, i, server=True, max_calls=cap))
        return found

    def cap_tools(self, op: Operation, body: dict[str, Any], tool: ToolUse, calls: int,
                  result_tokens: int) -> None:
        entry = body["tools"][tool.index]
        entry["max_uses"] = calls
        if tool.name == "web_fetch" and result_tokens:
            # The provider cuts a fetched page to this many tokens: the result's bound holds.
            asked = positive_int(entry.get("max_content_tokens"))
            entry["max_content_tokens"] = min(asked or result_tokens, result_tokens)

    def _block_tokens(self, block: Any, where: str, ctx: BoundContext) -> int:
        if not isinstance(block, dict):
            return json_tokens(block)
        kind = block.get("type")
        if kind in TEXT_BLOCKS:
            return json_tokens(block)
        if kind in ("web_search_tool_result", "web_fetch_tool_result"):
            # Sent back in a conversation, a past result is billed as the pages it stands for,
            # which it carries encrypted: held at the tool's ceiling per result.
            tool = str(kind).removesuffix("_tool_result")
            ceiling = ctx.tool_result_tokens.get(tool)
            if ceiling is None:
                raise Unbounded(f"{where}: a {tool} result is billed as the pages it stands for; "
                                f"the broker bounds it only with tools.{tool}."
                                "result_tokens_per_call", param=f"{where}.type")
            return json_tokens(block) + ceiling
        if kind == "image":
            source = block.get("source")
            data = None
            if isinstance(source, dict) and source.get("type") == "base64":
                data = base64_data(source.get("data"), ctx, f"{where}.source.data")
            elif not isinstance(source, dict) or source.get("type") not in ("url", "file"):
                raise InvalidRequest(f"{where}.source: an image source is base64, url or file",
                                     param=where)
            tokens = image_tokens(image_rule(ctx, ANTHROPIC_PIXELS), data, where)
            return tokens + json_tokens({**block, "source": without(source, ("data",))})
        if kind == "document":
            return self._document_tokens(block, where, ctx)
        if kind == "tool_result":
            content = block.get("content")
            rest = json_tokens(without(block, ("content",)))
            if isinstance(content, list):
                return rest + sum(self._block_tokens(b, f"{where}.content[{k}]", ctx)
                                  for k, b in enumerate(content))
            return rest + json_tokens(content)
        raise Unbounded(f"{where}.type: the content block type {str(kind)[:40]!r} cannot be "
                        "priced", param=f"{where}.type")

    def _document_tokens(self, block: dict[str, Any], where: str, ctx: BoundContext) -> int:
        source = block.get("source")
        if not isinstance(source, dict):
            raise InvalidRequest(f"{where}.source must be an object", param=where)
        kind = source.get("type")
        if kind == "text":
            return json_tokens(block)
        rest = json_tokens({**block, "source": without(source, ("data", "content"))})
        if kind == "base64":
            data = base64_data(source.get("data"), ctx, f"{where}.source.data")
            return rest + pdf_tokens(data, ctx, f"{where}.source.data")
        if kind == "content":
            content = source.get("content")
            if isinstance(content, list):
                return rest + sum(self._block_tokens(b, f"{where}.source.content[{k}]", ctx)
                                  for k, b in enumerate(content))
            return rest + json_tokens(content)
        if kind in ("url", "file"):
            return rest + unsized_tokens(ctx, f"{where}.source")
        raise Unbounded(f"{where}.source.type: {str(kind)[:40]!r} cannot be priced",
                        param=f"{where}.source.type")

    # --- the output limit ----------------------------------------------------------------

    def output_limit(self, op: Operation, body: dict[str, Any]) -> tuple[int | None, int]:
        if body.get("max_tokens") is None:
            return None, 1
        limit = positive_int(body["max_tokens"])
        if limit is None:
            raise InvalidRequest("max_tokens must be a positive integer", param="max_tokens")
        return limit, 1

    def set_output_limit(self, op: Operation, body: dict[str, Any], limit: int) -> None:
        body["max_tokens"] = limit

    def ask_stream_usage(self, op: Operation, body: dict[str, Any]) -> bool:
        return True  # usage is always part of the stream; nothing to strip

    def continues(self, op: Operation, body: dict[str, Any]) -> str | None:
        return None  # the Messages API keeps no conversation at the provider

    # --- the wire ------------------------------------------------------------------------

    def build_request(
        self, op: Operation, body: dict[str, Any], *, key: str, client_headers: Mapping[str, str]
    ) -> UpstreamRequest:
        headers = {"content-type": "application/json", "accept": "application/json",
                   "anthropic-version": API_VERSION}
        for name in _PASSED_HEADERS:
            value = client_headers.get(name)
            if value and len(value) <= 512 and value.isprintable():
                headers[name] = value
        if self.config.credential == "federated":
            # An OAuth token is refused without the OAuth beta, whatever betas the client asked.
            betas = [v.strip() for v in headers.get("anthropic-beta", "").split(",") if v.strip()]
            headers["anthropic-beta"] = ",".join([*betas, OAUTH_BETA] if OAUTH_BETA not in betas
                                                 else betas)
            if key:
                headers["authorization"] = f"Bearer {key}"
        elif key:
            headers["x-api-key"] = key
        return UpstreamRequest(self.base + "/v1/messages", headers, json_bytes(body))

    def read_usage(self, op: Operation, response: Any) -> Usage | None:
        raw = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(raw, dict):
            return None
        start, out = _input_usage(raw), _count(raw, "output_tokens")
        if start is None or out is None:
            return None
        return dataclasses.replace(start, completion_tokens=out,
                                   tool_calls=_server_tool_calls(raw))

    def output_bound(self, op: Operation, response: Any) -> int:
        content = response.get("content") if isinstance(response, dict) else None
        return json_tokens(content) if content is not None else 0

    def stream_meter(self, op: Operation, *, client_wants_usage: bool) -> AnthropicStreamMeter:
        return AnthropicStreamMeter()


def _cache_ttl(body: dict[str, Any]) -> CacheTtl | None:
    """Whether the request may write the prompt cache, and for how long: read from the text of
    the whole body, so a ``cache_control`` anywhere (even where the provider would ignore it)
    makes the hold assume the dearer price."""
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    if '"cache_control"' not in raw:
        return None
    return "1h" if '"1h"' in raw else "5m"


def _hint_matches(hint: Any, key: str) -> bool:
    """Whether ``key`` has the start and end that a ``partial_key_hint`` shows."""
    if not isinstance(hint, str) or hint.count("...") != 1:
        return False
    start, end = hint.split("...")
    return (bool(start) and bool(end) and len(key) >= len(start) + len(end)
            and key.startswith(start) and key.endswith(end))


def _unix(value: Any) -> int | None:
    """An RFC 3339 time as Unix seconds (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("not a string")
    moment = datetime.fromisoformat(value)
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


class AnthropicProvider(AnthropicWire):
    """The ``anthropic`` plugin: the wire format, watched keys and federation."""

    def __init__(self, config: ProviderConfig) -> None:
        if not config.has_key and config.credential != "federated":
            raise ConfigError(f"invalid configuration: {config.key('vault_path')}: required")
        super().__init__(config, base_url(config, "https://api.anthropic.com"))
        self.admin = AdminHttp("anthropic", config.timeout_s)

    # --- KeyWatch ------------------------------------------------------------------------

    def key_status(self, admin_key: str, key: str, key_id: str | None) -> KeyStatus | None:
        headers = {"x-api-key": admin_key, "anthropic-version": API_VERSION,
                   "accept": "application/json"}
        url = f"{self.base}/v1/organizations/api_keys"
        if key_id:
            step = "reading an API key"
            found = self.admin.call(step, "GET", f"{url}/{path_part(key_id)}", headers,
                                    gone_ok=True)
            return None if found is None else self._status(step, found)
        step = "listing API keys"
        matches = [k for k in self.admin.cursor_pages(step, url, headers, "after_id")
                   if _hint_matches(k.get("partial_key_hint"), key)]
        if len(matches) > 1:
            # Hints are short: keep the one key in use, if the others are retired.
            matches = [k for k in matches if k.get("status") == "active"] or matches
        if len(matches) > 1:
            raise self.admin.error(step, f"{len(matches)} keys have the key's hint; configure "
                                   "its key_id")
        return self._status(step, matches[0]) if matches else None

    def _status(self, step: str, found: dict[str, Any]) -> KeyStatus:
        key_id, status, name = found.get("id"), found.get("status"), found.get("name")
        try:
            expires_at = _unix(found.get("expires_at"))
        except ValueError:
            raise self.admin.error(step, "expires_at is not an RFC 3339 time") from None
        if not (isinstance(key_id, str) and key_id and isinstance(status, str) and status):
            raise self.admin.error(step, "the answer holds no key id and status")
        return KeyStatus(key_id, status[:32], expires_at, name if isinstance(name, str) else None)

    # --- Federated -----------------------------------------------------------------------

    def exchange_request(self, assertion: str, target: FederationTarget) -> ExchangeRequest:
        if not target.federation_rule_id or not target.organization_id:
            raise ConfigError(f"invalid configuration: {self.config.key('federation_rule_id')} "
                              f"and {self.config.key('organization_id')}: required")
        body = {"grant_type": JWT_BEARER, "assertion": assertion,
                "federation_rule_id": target.federation_rule_id,
                "organization_id": target.organization_id}
        if target.service_account_id:
            body["service_account_id"] = target.service_account_id
        if target.workspace_id:
            body["workspace_id"] = target.workspace_id
        headers = {"content-type": "application/json", "accept": "application/json",
                   "anthropic-beta": f"{OAUTH_BETA},{FEDERATION_BETA}"}
        return ExchangeRequest(target.token_url, headers, body)

    def read_exchange(self, status: int, body: bytes, now: float) -> ProviderToken:
        return read_token("anthropic", status, body, now)


class AnthropicPlugin:
    def create(self, config: ProviderConfig) -> AnthropicProvider:
        return AnthropicProvider(config)


plugin = AnthropicPlugin()
