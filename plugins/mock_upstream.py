"""A deterministic fake model provider speaking the OpenAI and Anthropic wire formats.

It backs the `mock` provider plugin in-process (through `httpx.ASGITransport`, for `broker dev`)
and runs as a real HTTP server in the tests (`tests/fake_provider.py`), where `MockState.faults`
injects the failures the gateway must survive: error statuses, latency, cut streams, missing
usage, and answers longer than the `max_tokens` the gateway asked for. `MockState.bills` records
what the fake billed for each request, so that a test can compare the broker's ledger with the
provider's invoice.

Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/embeddings` (OpenAI);
`POST /v1/messages` (Anthropic; its web search and fetch tools in :mod:`plugins.mock_server_tools`);
`POST /v1/responses` and `POST /v1/messages/count_tokens` (in :mod:`plugins.mock_responses`);
`POST /v1/files`, `GET|DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`, `POST /v1/batches`,
`GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel` (in :mod:`plugins.mock_batches`, whose jobs
follow the test's `MockState.clock`). OpenRouter's base URL is `{origin}/api/v1`:
`GET /api/v1/models` and `POST /api/v1/chat/completions` are the OpenAI routes again.

The providers' admin APIs (OpenAI service accounts, keys and spend limit; OpenRouter's keys;
Anthropic's key status), their faults and `MockState.live_admin_keys()` are in
:mod:`plugins.mock_provider_admin`; the token exchanges of federated credentials
(`MockState.openai_idp`, `anthropic_rule`) in :mod:`plugins.mock_federation`.

Token rules (`MockState.billing`: `"words"` or `"tokenizer"`): see :mod:`plugins.mock_billing`.

The answer: `n = min(limit, faults.answer_tokens)` words (16 by default), where the limit is
`max_completion_tokens` or else `max_tokens` (OpenAI, optional: no limit gives `answer_tokens`)
or `max_tokens` (Anthropic, required). With `faults.ignore_max_tokens`,
`n = faults.overrun_tokens` whatever the limit. With `faults.answer_script == "latin"` the answer
is `"w0 w1 ... w{n-1}"` and a stream sends one word per chunk (`"w0"`, `" w1"`, ...); with
`"cjk"` each word is one ideograph (cycling through `CJK_WORDS`), without spaces, so that each is
exactly one token in tokenizer mode too. The stop reason is `length` / `max_tokens` when the
limit was below `answer_tokens`, otherwise `stop` / `end_turn`. In tokenizer mode the answer is
also cut to the last word that keeps its count within the limit (only long Latin answers, past
word 99, can need it): without `ignore_max_tokens` the fake never bills more output than asked.

Caching: `faults.cache_read_tokens = k` reports `min(k, prompt)` of the prompt tokens as cache
reads (OpenAI: `usage.prompt_tokens_details.cached_tokens`, `prompt_tokens` staying the total;
Anthropic: `cache_read_input_tokens`). On Anthropic, a request with a `cache_control` anywhere
reports the rest of its prompt as cache writes -- 1-hour writes if any `cache_control` has
`"ttl": "1h"`, else 5-minute ones -- in `cache_creation_input_tokens` and `usage.cache_creation`,
with `input_tokens` 0. Without either, usage has exactly the fields it always had.

Bills: one `Bill` per generation request, or batch line, in `MockState.bills` (see
:mod:`plugins.mock_billing`).

Each chat completion echoes the request's `service_tier` (or `"default"`), as OpenAI does.

A request without an API key (`Authorization: Bearer` or `x-api-key`) is refused with 401, as a
real provider does; with `valid_keys` set, so is any key outside it, and any key or token past its
`token_expiry` (see :func:`plugins.mock_federation.key_refused`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from plugins.mock_billing import (
    Bill,
    Billing,
    BillRoute,
    Meter,
    Script,
    Sent,
    _cache_ttls,
    _fit,
    _Prompt,
    _prompt_tokens,
    _words,
    count_tokens,
    text_tokens,
    tokenizer_tokens,
)
from plugins.mock_federation import FederationState, key_refused
from plugins.mock_provider_admin import ProviderAccounts, check_fault
from plugins.mock_server_tools import ServerTools

if TYPE_CHECKING:
    from plugins.mock_batches import BatchJob

Dialect = Literal["openai", "anthropic"]

DEFAULT_ANSWER_TOKENS = 16
MAX_ANSWER_TOKENS = DEFAULT_ANSWER_TOKENS  # the former fixed cap, now `Faults.answer_tokens`
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
    """Failures to inject and answers to shape; all off (today's behaviour) by default."""

    status: int | None = None  # answer this HTTP error status instead of generating
    delay_s: float = 0.0  # sleep before answering
    cut_after_chunks: int | None = None  # streams: drop the connection after N SSE events
    omit_usage: bool = False  # no usage in responses or streams
    ignore_max_tokens: bool = False  # generate `overrun_tokens` whatever the request's limit
    overrun_tokens: int = 1000
    chunk_delay_s: float = 0.0  # sleep between stream events
    answer_tokens: int = DEFAULT_ANSWER_TOKENS  # words in an answer the limit does not cut
    answer_script: Script = "latin"  # "w0 w1 ..." or one CJK ideograph per word
    cache_read_tokens: int = 0  # report this many prompt tokens (at most all) as cache reads
    omit_final_usage: bool = False  # streams: no final usage (Anthropic keeps message_start's)
    web_searches: int = 1  # web searches (Responses, Anthropic) when a web search tool is offered
    unoffered_tool_calls: int = 0  # Responses: web searches although no search tool was offered
    web_fetches: int = 1  # Anthropic: web fetches when a web_fetch_* tool is offered
    search_result_tokens: int = 100  # input tokens each web search or fetch result adds
    reasoning_tokens: int = 8  # Responses: reasoning tokens of a reasoning request
    batch_duration_s: float = 0.0  # a batch finishes once `MockState.clock` is this far past its start
    batch_outcome: Literal["completed", "failed", "expired"] = "completed"  # how a batch then ends
    batch_failed_lines: Collection[str] = ()  # custom_ids a batch answers with an error (unbilled)
    batch_done_lines: int | None = None  # lines answered before expiry (None: all) or a cancel (none)


@dataclass
class MockState(ProviderAccounts, FederationState):
    """What the fake saw and how it should misbehave; mutable, shared with the test (the admin
    APIs' and token exchanges' fields come from the two bases)."""

    received_keys: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    faults: Faults = field(default_factory=Faults)
    valid_keys: set[str] | None = None  # None accepts any key
    admin_key: str = "fake-admin-key"
    models: tuple[str, ...] = DEFAULT_MODELS
    billing: Billing = "words"
    bills: list[Bill] = field(default_factory=list)
    responses: dict[str, int] = field(default_factory=dict)  # stored id -> its context tokens
    files: dict[str, bytes] = field(default_factory=dict)  # id -> content (see plugins.mock_batches)
    file_objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> its FileObject
    batches: dict[str, BatchJob] = field(default_factory=dict)
    clock: float | None = None  # the batches' time, which the test moves (None: `time.time()`)

    def reset(self) -> None:
        """Forget received keys, requests, bills, responses, files, batches, admin calls and
        exchanges; faults off; words; real time. Keys made, accounts and registrations stay."""
        self.forget_admin_calls()
        self.forget_exchanges()
        self.received_keys.clear()
        self.requests.clear()
        self.bills.clear()
        self.responses.clear()
        self.files.clear()
        self.file_objects.clear()
        self.batches.clear()
        self.faults, self.billing, self.clock = Faults(), "words", None

    def forget_batches(self) -> None:
        """Drop every batch job, as a provider that lost them: retrieving one answers 404."""
        self.batches.clear()

    def total_billed(
        self,
        price_in: int,
        price_out: int,
        cache_write: int | None = None,
        cache_write_1h: int | None = None,
        cache_read: int | None = None,
    ) -> int:
        """The sum of `Bill.cost_micros` over the bills: each one rounded up on its own."""
        return sum(
            bill.cost_micros(price_in, price_out, cache_write, cache_write_1h, cache_read)
            for bill in list(self.bills)
        )


def create_mock_upstream(state: MockState | None = None) -> Starlette:
    """Build the fake provider app around `state` (a fresh one if not given)."""
    from plugins.mock_batches import batch_routes  # they build on this module
    from plugins.mock_federation import federation_routes
    from plugins.mock_provider_admin import admin_routes
    from plugins.mock_responses import ResponsesApi

    upstream = _Upstream(state if state is not None else MockState())
    responses = ResponsesApi(upstream)
    app = Starlette(
        routes=[
            Route("/v1/models", upstream.list_models, methods=["GET"]),
            Route("/api/v1/models", upstream.list_models, methods=["GET"]),
            Route("/v1/chat/completions", upstream.chat_completions, methods=["POST"]),
            Route("/api/v1/chat/completions", upstream.chat_completions, methods=["POST"]),
            Route("/v1/embeddings", upstream.embeddings, methods=["POST"]),
            Route("/v1/messages", upstream.messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", responses.count_tokens, methods=["POST"]),
            Route("/v1/responses", responses.create, methods=["POST"]),
            *admin_routes(upstream.state),
            *federation_routes(upstream.state),
            *batch_routes(upstream, responses),
        ]
    )
    app.state.mock = upstream.state
    return app


def _is_texts(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


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
    prompt: _Prompt
    words: list[str]
    truncated: bool
    completion_tokens: int

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
        if key_refused(self.state, request, key, dialect):
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

    def _prompt(self, body: dict[str, Any], dialect: Dialect) -> _Prompt:
        tokenizer = self.state.billing == "tokenizer"
        total = tokenizer_tokens(body) if tokenizer else _prompt_tokens(body)
        read = min(max(self.state.faults.cache_read_tokens, 0), total)
        if dialect == "openai":
            return _Prompt(total, cache_read=read)
        ttls = _cache_ttls(body)
        written = total - read if ttls else 0
        return _Prompt(
            total,
            cache_read=read,
            cache_write=0 if "1h" in ttls else written,
            cache_write_1h=written if "1h" in ttls else 0,
            caching=bool(ttls) or read > 0,
        )

    def _answer(self, body: dict[str, Any], limit: int | None, dialect: Dialect) -> _Answer:
        faults = self.state.faults
        tokenizer = self.state.billing == "tokenizer"
        if faults.ignore_max_tokens:
            n, truncated = faults.overrun_tokens, False
        else:
            n = faults.answer_tokens if limit is None else min(limit, faults.answer_tokens)
            truncated = limit is not None and limit < faults.answer_tokens
        words = _words(max(n, 0), faults.answer_script)
        if tokenizer and limit is not None and not faults.ignore_max_tokens:
            fitted = _fit(words, limit)
            truncated = truncated or len(fitted) < len(words)
            words = fitted
        completion = text_tokens("".join(words)) if tokenizer else len(words)
        prompt = self._prompt(body, dialect)
        return _Answer(str(body["model"]), prompt, words, truncated, completion)

    def _bill(self, route: BillRoute, model: str, stream: bool, prompt: _Prompt) -> Bill:
        bill = Bill(
            route,
            model,
            stream,
            prompt_tokens=prompt.uncached,
            cache_write_tokens=prompt.cache_write,
            cache_write_1h_tokens=prompt.cache_write_1h,
            cache_read_tokens=prompt.cache_read,
        )
        self.state.bills.append(bill)
        return bill

    def _bill_whole(self, route: BillRoute, answer: _Answer) -> Bill:
        bill = self._bill(route, answer.model, False, answer.prompt)
        bill.completion_tokens = answer.completion_tokens
        bill.complete = bill.ended = True
        return bill

    async def _stream(
        self, events: list[tuple[str, Sent]], meter: Meter
    ) -> AsyncIterator[str]:
        """Send the events; the meter counts an event's text once the server took the event."""
        faults = self.state.faults
        try:
            for i, (event, text) in enumerate(events):
                if faults.cut_after_chunks is not None and i >= faults.cut_after_chunks:
                    raise StreamCut(f"stream cut after {i} events")
                if i and faults.chunk_delay_s:
                    await asyncio.sleep(faults.chunk_delay_s)
                yield event
                if text is not None:
                    meter.sent(text)
            meter.bill.complete = True
        finally:
            meter.bill.ended = True

    def _event_stream(
        self, events: list[tuple[str, Sent]], route: BillRoute, answer: _Answer
    ) -> StreamingResponse:
        bill = self._bill(route, answer.model, True, answer.prompt)
        meter = Meter(bill, self.state.billing)
        return StreamingResponse(self._stream(events, meter), media_type="text/event-stream")

    # --- OpenAI ---------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        admitted = await self._admit(request, "openai", has_body=False)
        if isinstance(admitted, Response):
            return admitted
        if (fault := check_fault(self.state)) is not None:
            return fault
        data = [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "mock"}
            for m in self.state.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, request: Request) -> Response:
        body = await self._admit(request, "openai")
        return body if isinstance(body, Response) else self.chat(body)

    def chat(self, body: dict[str, Any]) -> Response:
        """The chat completion of an admitted body (the route's, and a batch line's)."""
        if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
            return _error("openai", 400, "'model' and 'messages' are required.")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            return _error("openai", 400, "The token limit must be a positive integer.")
        faults = self.state.faults
        answer = self._answer(body, limit, "openai")
        completion_id = f"chatcmpl-mock-{len(self.state.requests)}"
        finish_reason = "length" if answer.truncated else "stop"
        tier = body.get("service_tier")
        service_tier = tier if isinstance(tier, str) else "default"
        usage: dict[str, Any] = {
            "prompt_tokens": answer.prompt.total,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt.total + answer.completion_tokens,
        }
        if faults.cache_read_tokens > 0:
            usage["prompt_tokens_details"] = {"cached_tokens": answer.prompt.cache_read}
        if not body.get("stream"):
            self._bill_whole("chat", answer)
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
                "service_tier": service_tier,
            }
            if not faults.omit_usage:
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
                "service_tier": service_tier,
                "choices": choices,
            }
            # OpenAI sends `usage: null` on every chunk once the caller asked for usage.
            if include_usage:
                data["usage"] = None
            return _sse(data)

        def delta(content: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]

        events: list[tuple[str, Sent]] = [
            (chunk(delta({"role": "assistant", "content": ""})), None)
        ]
        events += [(chunk(delta({"content": word})), word) for word in answer.words]
        events.append((chunk(delta({}, finish_reason)), None))
        if include_usage and not faults.omit_usage and not faults.omit_final_usage:
            final = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": answer.model,
                "service_tier": service_tier,
                "choices": [],
                "usage": usage,
            }
            events.append((_sse(final), None))
        events.append(("data: [DONE]\n\n", None))
        return self._event_stream(events, "chat", answer)

    async def embeddings(self, request: Request) -> Response:
        body = await self._admit(request, "openai")
        return body if isinstance(body, Response) else self.embed(body)

    def embed(self, body: dict[str, Any]) -> Response:
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(body.get("model"), str) or not _is_texts(inputs):
            return _error("openai", 400, "'model' and 'input' (string or strings) are required.")
        tokenizer = self.state.billing == "tokenizer"
        tokens = tokenizer_tokens(raw) if tokenizer else count_tokens(inputs)
        bill = self._bill("embeddings", body["model"], False, _Prompt(tokens))
        bill.complete = bill.ended = True
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
        faults = self.state.faults
        answer = self._answer(body, limit, "anthropic")
        tools = ServerTools(body, faults)
        message_id = f"msg_mock_{len(self.state.requests)}"
        stop_reason = "max_tokens" if answer.truncated else "end_turn"
        message: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": answer.model,
            "content": [*tools.blocks, {"type": "text", "text": answer.text}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
        }
        if not body.get("stream"):
            tools.bill(self._bill_whole("messages", answer))
            if not faults.omit_usage:
                message["usage"] = tools.usage(answer.prompt.anthropic_usage(answer.completion_tokens))
            return JSONResponse(message)

        start = {**message, "content": [], "stop_reason": None}
        final_delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        }
        if not faults.omit_usage:
            start["usage"] = answer.prompt.anthropic_usage(1)
            if not faults.omit_final_usage:
                final_usage = answer.prompt.anthropic_usage(answer.completion_tokens)
                final_delta["usage"] = tools.usage(final_usage, delta=True)
        text = len(tools.blocks)  # the answer's block comes after the server tools' blocks
        block = {"type": "content_block_start", "index": text, "content_block": {"type": "text", "text": ""}}
        events: list[tuple[str, Sent]] = [
            (_sse({"type": "message_start", "message": start}, "message_start"), None),
            *[(_sse(data, data["type"]), sent) for data, sent in tools.events()],
            (_sse(block, "content_block_start"), None),
            (_sse({"type": "ping"}, "ping"), None),
        ]
        events += [(_sse({"type": "content_block_delta", "index": text,
                          "delta": {"type": "text_delta", "text": word}}, "content_block_delta"), word)
                   for word in answer.words]
        events += [
            (_sse({"type": "content_block_stop", "index": text}, "content_block_stop"), None),
            (_sse(final_delta, "message_delta"), None),
            (_sse({"type": "message_stop"}, "message_stop"), None),
        ]
        return self._event_stream(events, "messages", answer)
