"""The ``anthropic`` provider plugin, and the Anthropic Messages wire format.

Usage is always in the answer: ``message_start`` carries the input tokens, and the last
``message_delta`` the output tokens of the whole answer. Cache reads and writes are counted as
input tokens at the model's input price.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from broker.errors import ConfigError, InvalidRequest
from broker.providers import (
    EndReason,
    Operation,
    ProviderConfig,
    SseEvent,
    UpstreamRequest,
    Usage,
    base_url,
    content_tokens,
    json_bytes,
    output_tokens,
    positive_int,
    sse,
    strings,
)

API_VERSION = "2023-06-01"
PER_REQUEST_TOKENS = 3
PER_MESSAGE_TOKENS = 4
_PROMPT_FIELDS = ("system", "messages", "tools")
_INPUT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# Client headers that describe the request's format, not the client: safe to pass on.
_PASSED_HEADERS = ("anthropic-version", "anthropic-beta")
_NOT_OUTPUT = frozenset({"type", "id", "signature"})


def _count(raw: Mapping[str, Any], name: str) -> int | None:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _input_tokens(raw: Mapping[str, Any]) -> int | None:
    base = _count(raw, "input_tokens")
    if base is None:
        return None
    return base + sum(_count(raw, name) or 0 for name in _INPUT_FIELDS[1:])


class AnthropicStreamMeter:
    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.final = False
        self.streamed_tokens = 0
        self.done = False
        self.failed = False

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
        try:
            data = json.loads(event.data)
        except ValueError:
            return True
        if not isinstance(data, dict):
            return True
        if kind == "content_block_delta":
            text = "".join(strings(data.get("delta"), _NOT_OUTPUT))
            if text:
                # Deltas carry a few tokens each, about four characters apiece.
                self.streamed_tokens += -(-len(text) // 4)
        elif kind == "message_start":
            message = data.get("message")
            raw = message.get("usage") if isinstance(message, dict) else None
            if isinstance(raw, dict):
                prompt = _input_tokens(raw)
                if prompt is not None:
                    self.usage = Usage(prompt, _count(raw, "output_tokens") or 0)
        elif kind == "message_delta":
            raw = data.get("usage")
            if isinstance(raw, dict) and (out := _count(raw, "output_tokens")) is not None:
                prompt = _input_tokens(raw)
                if prompt is None:
                    prompt = self.usage.prompt_tokens if self.usage else None
                if prompt is not None:
                    self.usage, self.final = Usage(prompt, out), True
        return True

    def epilogue(self, reason: EndReason) -> bytes:
        if reason == "limit":
            delta = {"type": "message_delta",
                     "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                     "usage": {"output_tokens": self.streamed_tokens}}
            return sse(delta, "message_delta") + sse({"type": "message_stop"}, "message_stop")
        message = (
            "the broker ended the stream: the token was revoked" if reason == "revoked"
            else "the provider's stream ended before the answer was complete"
        )
        return sse({"type": "error", "error": {"type": "api_error", "message": message}}, "error")


class AnthropicWire:
    """The Anthropic Messages wire format, against ``self.base`` (without ``/v1``)."""

    operations: frozenset[Operation] = frozenset({"messages"})

    def __init__(self, config: ProviderConfig, base: str) -> None:
        self.config = config
        self.base = base

    def transport(self) -> httpx.AsyncBaseTransport | None:
        return None

    def estimate_input_tokens(self, op: Operation, body: dict[str, Any]) -> int:
        messages = body.get("messages")
        count = len(messages) if isinstance(messages, list) else 0
        prompt = sum(content_tokens(body.get(name)) for name in _PROMPT_FIELDS)
        return PER_REQUEST_TOKENS + PER_MESSAGE_TOKENS * count + prompt

    def output_limit(self, op: Operation, body: dict[str, Any]) -> tuple[int | None, int]:
        if body.get("max_tokens") is None:
            return None, 1
        limit = positive_int(body["max_tokens"])
        if limit is None:
            raise InvalidRequest("max_tokens must be a positive integer")
        return limit, 1

    def set_output_limit(self, op: Operation, body: dict[str, Any], limit: int) -> None:
        body["max_tokens"] = limit

    def ask_stream_usage(self, op: Operation, body: dict[str, Any]) -> bool:
        return True  # usage is always part of the stream; nothing to strip

    def build_request(
        self, op: Operation, body: dict[str, Any], *, key: str, client_headers: Mapping[str, str]
    ) -> UpstreamRequest:
        headers = {"content-type": "application/json", "accept": "application/json",
                   "anthropic-version": API_VERSION}
        for name in _PASSED_HEADERS:
            value = client_headers.get(name)
            if value and len(value) <= 512 and value.isprintable():
                headers[name] = value
        if key:
            headers["x-api-key"] = key
        return UpstreamRequest(self.base + "/v1/messages", headers, json_bytes(body))

    def read_usage(self, op: Operation, response: Any) -> Usage | None:
        raw = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(raw, dict):
            return None
        prompt, out = _input_tokens(raw), _count(raw, "output_tokens")
        return None if prompt is None or out is None else Usage(prompt, out)

    def estimate_output_tokens(self, op: Operation, response: Any) -> int:
        content = response.get("content") if isinstance(response, dict) else None
        return sum(output_tokens(t) for t in strings(content, _NOT_OUTPUT))

    def stream_meter(self, op: Operation, *, client_wants_usage: bool) -> AnthropicStreamMeter:
        return AnthropicStreamMeter()


class AnthropicProvider(AnthropicWire):
    def __init__(self, config: ProviderConfig) -> None:
        if not config.has_key:
            raise ConfigError(f"invalid configuration: {config.key('vault_path')}: required")
        super().__init__(config, base_url(config, "https://api.anthropic.com"))


class AnthropicPlugin:
    def create(self, config: ProviderConfig) -> AnthropicProvider:
        return AnthropicProvider(config)


plugin = AnthropicPlugin()
