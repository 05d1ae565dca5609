"""The ``mock`` provider plugin: deterministic answers with usage, served in-process.

Requests go through ``httpx.ASGITransport`` to :mod:`plugins.mock_upstream`, so ``broker dev``
and the demo need no network and no real key. Both wire formats are served: chat completions
and embeddings in OpenAI's, messages in Anthropic's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from broker.plugin import (
    BoundContext,
    Operation,
    ProviderConfig,
    RequestBound,
    StreamMeter,
    ToolUse,
    UpstreamRequest,
    Usage,
)
from plugins.mock_upstream import MockState, create_mock_upstream
from plugins.provider_anthropic import AnthropicWire
from plugins.provider_openai import OpenAIWire

# The upstream refuses a keyless request, like a real provider; any key will do.
DUMMY_KEY = "mock-key"
_ORIGIN = "http://mock-upstream.invalid"


class MockProvider:
    operations: frozenset[Operation] = frozenset({"chat", "embeddings", "responses", "messages"})

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.state = MockState()
        self._transport = httpx.ASGITransport(app=create_mock_upstream(self.state))
        self._openai = OpenAIWire(config, _ORIGIN + "/v1")
        self._anthropic = AnthropicWire(config, _ORIGIN)

    def _wire(self, op: Operation) -> OpenAIWire | AnthropicWire:
        return self._anthropic if op == "messages" else self._openai

    def transport(self) -> httpx.AsyncBaseTransport | None:
        return self._transport

    def bound_request(
        self, op: Operation, body: dict[str, Any], ctx: BoundContext,
        client_headers: Mapping[str, str],
    ) -> RequestBound:
        return self._wire(op).bound_request(op, body, ctx, client_headers)

    def output_limit(self, op: Operation, body: dict[str, Any]) -> tuple[int | None, int]:
        return self._wire(op).output_limit(op, body)

    def set_output_limit(self, op: Operation, body: dict[str, Any], limit: int) -> None:
        self._wire(op).set_output_limit(op, body, limit)

    def ask_stream_usage(self, op: Operation, body: dict[str, Any]) -> bool:
        return self._wire(op).ask_stream_usage(op, body)

    def tools(self, op: Operation, body: dict[str, Any]) -> list[ToolUse]:
        return self._wire(op).tools(op, body)

    def cap_tools(self, op: Operation, body: dict[str, Any], tool: ToolUse, calls: int,
                  result_tokens: int) -> None:
        self._wire(op).cap_tools(op, body, tool, calls, result_tokens)

    def continues(self, op: Operation, body: dict[str, Any]) -> str | None:
        return self._wire(op).continues(op, body)

    def build_request(
        self, op: Operation, body: dict[str, Any], *, key: str, client_headers: Mapping[str, str]
    ) -> UpstreamRequest:
        return self._wire(op).build_request(
            op, body, key=key or DUMMY_KEY, client_headers=client_headers
        )

    def read_usage(self, op: Operation, response: Any) -> Usage | None:
        return self._wire(op).read_usage(op, response)

    def output_bound(self, op: Operation, response: Any) -> int:
        return self._wire(op).output_bound(op, response)

    def stream_meter(self, op: Operation, *, client_wants_usage: bool) -> StreamMeter:
        return self._wire(op).stream_meter(op, client_wants_usage=client_wants_usage)


class MockPlugin:
    def create(self, config: ProviderConfig) -> MockProvider:
        return MockProvider(config)


plugin = MockPlugin()
