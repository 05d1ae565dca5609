"""The ``openai`` provider plugin, and the OpenAI wire format that other plugins reuse.

Chat completions and embeddings. Usage comes from the response's ``usage``; in a stream it comes
from the final chunk, which the provider sends only when ``stream_options.include_usage`` is
set, so the broker always sets it and drops that chunk when the client had not asked for it.
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
    strings,
    text_tokens,
)

# A chat request's framing: a few tokens per message and for priming the reply.
PER_REQUEST_TOKENS = 3
PER_MESSAGE_TOKENS = 4
MAX_CHOICES = 128
# Request fields whose content the model reads as input.
_PROMPT_FIELDS = ("messages", "tools", "functions", "response_format")
_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens")
_NOT_OUTPUT = frozenset({"role"})


def _usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens", 0)
    if isinstance(prompt, bool) or not isinstance(prompt, int) or prompt < 0:
        return None
    if isinstance(completion, bool) or not isinstance(completion, int) or completion < 0:
        return None
    return Usage(prompt, completion)


def _embedding_tokens(value: Any) -> int:
    if isinstance(value, str):
        return text_tokens(value)
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return len(value)  # already token ids
        return sum(_embedding_tokens(v) for v in value)
    return 0


class OpenAIStreamMeter:
    def __init__(self, *, client_wants_usage: bool) -> None:
        self.client_wants_usage = client_wants_usage
        self.usage: Usage | None = None
        self.final = False
        self.streamed_tokens = 0
        self.done = False
        self.failed = False

    def read(self, event: SseEvent) -> bool:
        data = event.data
        if data.startswith("[DONE]"):
            self.done = True
            return True
        try:
            chunk = json.loads(data)
        except ValueError:
            return True
        if not isinstance(chunk, dict):
            return True
        if chunk.get("error"):
            self.failed = True
            return True
        usage = _usage(chunk.get("usage"))
        if usage is not None:
            self.usage, self.final = usage, True
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    text = "".join(strings(choice.get("delta"), _NOT_OUTPUT))
                    if text:
                        # A chunk carries one token; servers that batch send longer ones.
                        self.streamed_tokens += 1 + len(text) // 16
        return not (usage is not None and not choices and not self.client_wants_usage)

    def epilogue(self, reason: EndReason) -> bytes:
        if reason == "limit":
            return b"data: [DONE]\n\n"
        message = (
            "the broker ended the stream: the token was revoked" if reason == "revoked"
            else "the provider's stream ended before the answer was complete"
        )
        error = {"message": message, "type": "api_error",
                 "code": "token_revoked" if reason == "revoked" else "upstream_error",
                 "param": None}
        return json_bytes_sse({"error": error})


def json_bytes_sse(data: Any) -> bytes:
    return b"data: " + json_bytes(data) + b"\n\n"


class OpenAIWire:
    """The OpenAI chat-completions and embeddings wire format, against ``self.base``."""

    # Which field to set when the client sent no limit; OpenAI's own API prefers the newer one,
    # servers that only mimic it (vLLM, Ollama) all know ``max_tokens``.
    limit_field = "max_completion_tokens"
    operations: frozenset[Operation] = frozenset({"chat", "embeddings"})

    def __init__(self, config: ProviderConfig, base: str) -> None:
        self.config = config
        self.base = base

    def transport(self) -> httpx.AsyncBaseTransport | None:
        return None

    def estimate_input_tokens(self, op: Operation, body: dict[str, Any]) -> int:
        if op == "embeddings":
            return max(1, _embedding_tokens(body.get("input")))
        messages = body.get("messages")
        count = len(messages) if isinstance(messages, list) else 0
        prompt = sum(content_tokens(body.get(name)) for name in _PROMPT_FIELDS)
        return PER_REQUEST_TOKENS + PER_MESSAGE_TOKENS * count + prompt

    def output_limit(self, op: Operation, body: dict[str, Any]) -> tuple[int | None, int]:
        if op == "embeddings":
            return 0, 1
        limits = []
        for name in _LIMIT_FIELDS:
            if body.get(name) is not None:
                value = positive_int(body[name])
                if value is None:
                    raise InvalidRequest(f"{name} must be a positive integer")
                limits.append(value)
        choices = 1 if body.get("n") is None else positive_int(body["n"])
        if choices is None or choices > MAX_CHOICES:
            raise InvalidRequest(f"n must be an integer from 1 to {MAX_CHOICES}")
        # The provider honours max_completion_tokens over max_tokens; the larger bounds both.
        return (max(limits) if limits else None), choices

    def set_output_limit(self, op: Operation, body: dict[str, Any], limit: int) -> None:
        if op == "embeddings":
            return
        present = [name for name in _LIMIT_FIELDS if body.get(name) is not None]
        for name in present or [self.limit_field]:
            body[name] = limit

    def ask_stream_usage(self, op: Operation, body: dict[str, Any]) -> bool:
        options = body.get("stream_options")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise InvalidRequest("stream_options must be an object")
        asked = options.get("include_usage") is True
        body["stream_options"] = {**options, "include_usage": True}
        return asked

    def build_request(
        self, op: Operation, body: dict[str, Any], *, key: str, client_headers: Mapping[str, str]
    ) -> UpstreamRequest:
        path = "/embeddings" if op == "embeddings" else "/chat/completions"
        headers = {"content-type": "application/json", "accept": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        return UpstreamRequest(self.base + path, headers, json_bytes(body))

    def read_usage(self, op: Operation, response: Any) -> Usage | None:
        return _usage(response.get("usage")) if isinstance(response, dict) else None

    def estimate_output_tokens(self, op: Operation, response: Any) -> int:
        if op == "embeddings" or not isinstance(response, dict):
            return 0
        choices = response.get("choices")
        if not isinstance(choices, list):
            return 0
        return sum(
            output_tokens(text)
            for choice in choices
            if isinstance(choice, dict)
            for text in strings(choice.get("message"), _NOT_OUTPUT)
        )

    def stream_meter(self, op: Operation, *, client_wants_usage: bool) -> OpenAIStreamMeter:
        return OpenAIStreamMeter(client_wants_usage=client_wants_usage)


class OpenAIProvider(OpenAIWire):
    def __init__(self, config: ProviderConfig) -> None:
        if not config.has_key:
            raise ConfigError(f"invalid configuration: {config.key('vault_path')}: required")
        super().__init__(config, base_url(config, "https://api.openai.com/v1"))


class OpenAIPlugin:
    def create(self, config: ProviderConfig) -> OpenAIProvider:
        return OpenAIProvider(config)


plugin = OpenAIPlugin()
