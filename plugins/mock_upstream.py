"""A deterministic fake model provider speaking the OpenAI and Anthropic wire formats.

It backs the `mock` provider plugin in-process (through `httpx.ASGITransport`, for `broker dev`)
and runs as a real HTTP server in the tests (`tests/fake_provider.py`), where `MockState.faults`
injects the failures the gateway must survive: error statuses, latency, cut streams, missing
usage, and answers longer than the `max_tokens` the gateway asked for.

Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/embeddings` (OpenAI);
`POST /v1/messages` (Anthropic); `POST|GET /admin/keys`, `DELETE /admin/keys/{id}` (key rotation,
authenticated by the `x-admin-key` header).

Token rule, so that tests can compute the expected usage:

* prompt tokens: the sum of `ceil(len(text) / 4)` over every text of the request, minimum 1, no
  per-message overhead. The texts are each message's `content` when it is a string, or the `text`
  of each part when it is a list; Anthropic's `system` (string or text blocks) counts too. For
  embeddings, each string of `input` is a text.
* completion tokens: `n = min(limit, 16)`, where the limit is `max_completion_tokens` or else
  `max_tokens` (OpenAI, optional: no limit gives 16) or `max_tokens` (Anthropic, required).
  With `faults.ignore_max_tokens`, `n = faults.overrun_tokens` whatever the limit.
* the answer is `"w0 w1 ... w{n-1}"`, one token per word; a stream sends one word per chunk
  (`"w0"`, `" w1"`, ...). The stop reason is `length` / `max_tokens` when the limit was below 16,
  otherwise `stop` / `end_turn`.

A request without an API key (`Authorization: Bearer` or `x-api-key`) is refused with 401, as a
real provider does; with `valid_keys` set, so is any key outside it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import secrets
import struct
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Dialect = Literal["openai", "anthropic"]

MAX_ANSWER_TOKENS = 16
EMBEDDING_SIZE = 8
# A fixed timestamp keeps every response byte-for-byte reproducible.
CREATED = 1_700_000_000
DEFAULT_MODELS = ("mock-gpt", "mock-claude", "mock-embedding")

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class StreamCut(Exception):
    """Raised inside a stream's body to drop the connection mid-answer (`cut_after_chunks`)."""


@dataclass
class Faults:
    """Failures to inject; all off by default."""

    status: int | None = None  # answer this HTTP error status instead of generating
    delay_s: float = 0.0  # sleep before answering
    cut_after_chunks: int | None = None  # streams: drop the connection after N SSE events
    omit_usage: bool = False  # no usage in responses or streams
    ignore_max_tokens: bool = False  # generate `overrun_tokens` whatever the request's limit
    overrun_tokens: int = 1000
    chunk_delay_s: float = 0.0  # sleep between stream events


@dataclass
class MockState:
    """What the fake saw and how it should misbehave; mutable, shared with the test."""

    received_keys: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    faults: Faults = field(default_factory=Faults)
    valid_keys: set[str] | None = None  # None accepts any key
    admin_key: str = "fake-admin-key"
    admin_keys: dict[str, str] = field(default_factory=dict)  # id -> key made by POST /admin/keys
    models: tuple[str, ...] = DEFAULT_MODELS

    def reset(self) -> None:
        """Forget the recorded keys and requests and turn every fault off."""
        self.received_keys.clear()
        self.requests.clear()
        self.faults = Faults()


def create_mock_upstream(state: MockState | None = None) -> Starlette:
    """Build the fake provider app around `state` (a fresh one if not given)."""
    upstream = _Upstream(state if state is not None else MockState())
    app = Starlette(
        routes=[
            Route("/v1/models", upstream.list_models, methods=["GET"]),
            Route("/v1/chat/completions", upstream.chat_completions, methods=["POST"]),
            Route("/v1/embeddings", upstream.embeddings, methods=["POST"]),
            Route("/v1/messages", upstream.messages, methods=["POST"]),
            Route("/admin/keys", upstream.create_key, methods=["POST"]),
            Route("/admin/keys", upstream.list_keys, methods=["GET"]),
            Route("/admin/keys/{key_id}", upstream.delete_key, methods=["DELETE"]),
        ]
    )
    app.state.mock = upstream.state
    return app


# --- token accounting ------------------------------------------------------------------------


def _texts(content: object) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def count_tokens(texts: Iterable[str]) -> int:
    """The fake's tokenizer: `ceil(len / 4)` per text, summed, at least 1."""
    return max(1, sum(math.ceil(len(text) / 4) for text in texts))


def _prompt_tokens(body: dict[str, Any]) -> int:
    texts = [t for m in body["messages"] if isinstance(m, dict) for t in _texts(m.get("content"))]
    return count_tokens([*texts, *_texts(body.get("system"))])


def _is_texts(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _words(n: int) -> list[str]:
    return [f"w{i}" if i == 0 else f" w{i}" for i in range(n)]


def _vector(text: str) -> list[float]:
    # Multiples of 1/256 survive the float32 round trip of `encoding_format=base64` exactly.
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 256 - 0.5 for b in digest[:EMBEDDING_SIZE]]


# --- wire-format helpers ---------------------------------------------------------------------


def _error(dialect: Dialect, status: int, message: str, code: str | None = None) -> JSONResponse:
    if dialect == "anthropic":
        kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status)
    if status == 429:
        kind = "requests"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    error = {"message": message, "type": kind, "code": code, "param": None}
    return JSONResponse({"error": error}, status)


def _sse(data: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


def _api_key(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        return token
    return request.headers.get("x-api-key") or None


@dataclass(frozen=True)
class _Answer:
    """What the fake generates for one chat or message request."""

    model: str
    prompt_tokens: int
    words: list[str]
    truncated: bool

    @property
    def text(self) -> str:
        return "".join(self.words)


class _Upstream:
    """The route handlers, bound to one `MockState`."""

    def __init__(self, state: MockState) -> None:
        self.state = state

    async def _admit(
        self, request: Request, dialect: Dialect, *, has_body: bool = True
    ) -> dict[str, Any] | Response:
        """Authenticate, parse and record the request, then apply the request-level faults.

        Returns the parsed body, or the error response to send instead.
        """
        key = _api_key(request)
        if key is not None:
            self.state.received_keys.append(key)
        valid = self.state.valid_keys
        if key is None or (valid is not None and key not in valid):
            return _error(dialect, 401, "Invalid API key.", "invalid_api_key")
        body: dict[str, Any] = {}
        if has_body:
            try:
                parsed = json.loads(await request.body())
            except ValueError:
                return _error(dialect, 400, "The request body is not valid JSON.")
            if not isinstance(parsed, dict):
                return _error(dialect, 400, "The request body must be a JSON object.")
            body = parsed
            self.state.requests.append(body)
        faults = self.state.faults
        if faults.delay_s:
            await asyncio.sleep(faults.delay_s)
        if faults.status is not None:
            return _error(dialect, faults.status, f"Injected fault: HTTP {faults.status}.")
        return body

    def _answer(self, body: dict[str, Any], limit: int | None) -> _Answer:
        faults = self.state.faults
        if faults.ignore_max_tokens:
            n, truncated = faults.overrun_tokens, False
        else:
            n = MAX_ANSWER_TOKENS if limit is None else min(limit, MAX_ANSWER_TOKENS)
            truncated = limit is not None and limit < MAX_ANSWER_TOKENS
        return _Answer(str(body["model"]), _prompt_tokens(body), _words(n), truncated)

    async def _stream(self, events: list[str]) -> AsyncIterator[str]:
        faults = self.state.faults
        for i, event in enumerate(events):
            if faults.cut_after_chunks is not None and i >= faults.cut_after_chunks:
                raise StreamCut(f"stream cut after {i} events")
            if i and faults.chunk_delay_s:
                await asyncio.sleep(faults.chunk_delay_s)
            yield event

    def _event_stream(self, events: list[str]) -> StreamingResponse:
        return StreamingResponse(self._stream(events), media_type="text/event-stream")

    # --- OpenAI ---------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        admitted = await self._admit(request, "openai", has_body=False)
        if isinstance(admitted, Response):
            return admitted
        data = [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "mock"}
            for m in self.state.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, request: Request) -> Response:
        body = await self._admit(request, "openai")
        if isinstance(body, Response):
            return body
        if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
            return _error("openai", 400, "'model' and 'messages' are required.")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            return _error("openai", 400, "The token limit must be a positive integer.")
        answer = self._answer(body, limit)
        completion_id = f"chatcmpl-mock-{len(self.state.requests)}"
        finish_reason = "length" if answer.truncated else "stop"
        usage = {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": len(answer.words),
            "total_tokens": answer.prompt_tokens + len(answer.words),
        }
        if not body.get("stream"):
            message = {"role": "assistant", "content": answer.text, "refusal": None}
            response: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion",
                "created": CREATED,
                "model": answer.model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }
            if not self.state.faults.omit_usage:
                response["usage"] = usage
            return JSONResponse(response)

        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        def chunk(choices: list[dict[str, Any]]) -> str:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": answer.model,
                "choices": choices,
            }
            # OpenAI sends `usage: null` on every chunk once the caller asked for usage.
            if include_usage:
                data["usage"] = None
            return _sse(data)

        def delta(content: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]

        events = [chunk(delta({"role": "assistant", "content": ""}))]
        events += [chunk(delta({"content": word})) for word in answer.words]
        events.append(chunk(delta({}, finish_reason)))
        if include_usage and not self.state.faults.omit_usage:
            final = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": answer.model,
                "choices": [],
                "usage": usage,
            }
            events.append(_sse(final))
        events.append("data: [DONE]\n\n")
        return self._event_stream(events)

    async def embeddings(self, request: Request) -> Response:
        body = await self._admit(request, "openai")
        if isinstance(body, Response):
            return body
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(body.get("model"), str) or not _is_texts(inputs):
            return _error("openai", 400, "'model' and 'input' (string or strings) are required.")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(inputs):
            vector = _vector(text)
            embedding: list[float] | str = vector
            if as_base64:
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        response: dict[str, Any] = {"object": "list", "data": data, "model": body["model"]}
        if not self.state.faults.omit_usage:
            tokens = count_tokens(inputs)
            response["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse(response)

    # --- Anthropic ------------------------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        body = await self._admit(request, "anthropic")
        if isinstance(body, Response):
            return body
        if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
            return _error("anthropic", 400, "model: Field required; messages: Field required")
        limit = body.get("max_tokens")
        if not isinstance(limit, int) or limit < 1:
            return _error("anthropic", 400, "max_tokens: Field required (a positive integer)")
        answer = self._answer(body, limit)
        message_id = f"msg_mock_{len(self.state.requests)}"
        stop_reason = "max_tokens" if answer.truncated else "end_turn"
        omit_usage = self.state.faults.omit_usage
        message: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": answer.model,
            "content": [{"type": "text", "text": answer.text}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
        }
        if not body.get("stream"):
            if not omit_usage:
                message["usage"] = {
                    "input_tokens": answer.prompt_tokens,
                    "output_tokens": len(answer.words),
                }
            return JSONResponse(message)

        start = {**message, "content": [], "stop_reason": None}
        final_delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        }
        if not omit_usage:
            start["usage"] = {"input_tokens": answer.prompt_tokens, "output_tokens": 1}
            final_delta["usage"] = {"output_tokens": len(answer.words)}
        block = {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        }
        events = [
            _sse({"type": "message_start", "message": start}, "message_start"),
            _sse(block, "content_block_start"),
            _sse({"type": "ping"}, "ping"),
        ]
        events += [
            _sse(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": word},
                },
                "content_block_delta",
            )
            for word in answer.words
        ]
        events += [
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse(final_delta, "message_delta"),
            _sse({"type": "message_stop"}, "message_stop"),
        ]
        return self._event_stream(events)

    # --- admin: provider-side key rotation ------------------------------------------------

    def _admin_refusal(self, request: Request) -> Response | None:
        presented = request.headers.get("x-admin-key", "")
        if secrets.compare_digest(presented.encode(), self.state.admin_key.encode()):
            return None
        return _error("openai", 401, "Invalid admin key.", "invalid_api_key")

    async def create_key(self, request: Request) -> Response:
        if (refusal := self._admin_refusal(request)) is not None:
            return refusal
        key_id = f"key_{secrets.token_hex(6)}"
        key = f"sk-mock-{secrets.token_urlsafe(24)}"
        self.state.admin_keys[key_id] = key
        if self.state.valid_keys is None:
            self.state.valid_keys = set()
        self.state.valid_keys.add(key)
        return JSONResponse({"id": key_id, "key": key}, 201)

    async def list_keys(self, request: Request) -> Response:
        if (refusal := self._admin_refusal(request)) is not None:
            return refusal
        return JSONResponse({"data": [{"id": key_id} for key_id in self.state.admin_keys]})

    async def delete_key(self, request: Request) -> Response:
        if (refusal := self._admin_refusal(request)) is not None:
            return refusal
        key_id = request.path_params["key_id"]
        key = self.state.admin_keys.pop(key_id, None)
        if key is None:
            return _error("openai", 404, f"No key {key_id!r}.")
        if self.state.valid_keys is not None:
            self.state.valid_keys.discard(key)
        return JSONResponse({"id": key_id, "deleted": True})
