"""The fake provider's OpenAI Responses API and Anthropic token counting (see :mod:`plugins.mock_upstream`).

Routes (registered by `create_mock_upstream`, on the same `MockState`, keys and faults):
`POST /v1/responses` (OpenAI dialect) and `POST /v1/messages/count_tokens` (Anthropic dialect).

Input tokens of a response: in `"words"` billing, `count_tokens` (`ceil(len / 4)` per text, at
least 1) over `responses_texts(body)`: `instructions`, `input` when a string, else each item's
`content` (a string, or the `text` of each part: `input_text`, `output_text`...), each
`function_call`'s `arguments`, each `function_call_output`'s `output` (a string or text parts),
and each function tool's `name`, `description` and `parameters` as compact JSON
(`json.dumps(parameters, separators=(",", ":"))`). In `"tokenizer"` billing, `tokenizer_tokens`
of the whole body, as for chat. Then, with `previous_response_id`, the stored conversation is
billed again: plus that response's input and output tokens (so a chain accumulates). A response
is stored when it was generated with `store` not false (a stream: once its last event went
out); an id the fake never stored is a 404 `previous_response_not_found`, as OpenAI answers.
`faults.cache_read_tokens = k` reports `min(k, input)` as `input_tokens_details.cached_tokens`.
Last, each `web_search_call` adds `faults.search_result_tokens` (100 by default) to
`input_tokens`: its results are fed to the model, billed as input as OpenAI does, never cached
(a continued conversation carries them too, being part of the stored input).

Output, in order: a `reasoning` item when the request has a `reasoning` (other than effort
"none") or the model name starts with "o"; `faults.web_searches` `web_search_call` items (at
most `max_tool_calls`) when `tools` has `web_search` / `web_search_preview` (without one,
`faults.unoffered_tool_calls` of them: a provider running a tool it was not offered); then the
answer:

* a `function_call` of the first function tool (or the one `tool_choice` names) when the input
  has no `function_call_output` item and `tool_choice` is not "none"; its `arguments` are the
  compact JSON of placeholders for the schema's required properties ("mock", 1, true, [], {}, or
  an enum's first value); they cost `text_tokens(arguments)`, streamed 4 characters a delta;
* else a message whose text is: the `output`s of the input's last run of `function_call_output`
  items (its words, whitespace kept) when there is one -- so a test sees the tool's result come
  back; else, with a `json_schema` text format, placeholder JSON for that schema (costed like
  arguments); else the chat answer, `faults.answer_tokens` words "w0 w1 ..." (or CJK).

Words cost one token each (tokenizer billing: `text_tokens` of the text). Reasoning costs
`r = min(faults.reasoning_tokens, max_output_tokens)`, counted in `output_tokens` and in
`output_tokens_details.reasoning_tokens`; the answer gets the rest of `max_output_tokens` and is
cut to it -- a words answer, as on chat, to at most that many words, then (tokenizer billing)
to the last word that keeps its count within it --, so output_tokens <= max_output_tokens
(unless `faults.ignore_max_tokens`: then `faults.overrun_tokens` words whatever the limit). A cut
answer makes the response `status` "incomplete" with `incomplete_details.reason`
"max_output_tokens", and the stream then ends with `response.incomplete` instead of
`response.completed`, as OpenAI does.

Streams: `response.created`, `response.in_progress`, then per output item `output_item.added`,
its own events (`content_part.added`, one `output_text.delta` per word, `output_text.done`,
`content_part.done`; or `function_call_arguments.delta`/`.done`; or `web_search_call.*`),
`output_item.done`; finally `response.completed` (or `.incomplete`) with the whole response and
its usage. No `[DONE]`. `cut_after_chunks`, `chunk_delay_s`, `omit_usage` and
`omit_final_usage` (no usage on the final event) apply as on the chat routes.

Bills: one `Bill` with route "responses" per response, like a chat call; `completion_tokens`
include the reasoning, also kept in `reasoning_tokens`; `web_search_calls` counts the searches,
whose results are in `prompt_tokens`. A stream's bill grows as each billed event goes out (a
search: its call and its results' input, once its `output_item.done` went out). `respond(body)`
answers an admitted body, for the route and for a batch's lines. `count_tokens` answers
`{"input_tokens": N}`, N being the input the messages route bills for the same body (with a
`max_tokens`); it is free: no bill.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from plugins.mock_billing import (
    Bill,
    _char_counts,
    _Prompt,
    _texts,
    _tokenizer_count,
    _words,
    count_tokens,
    tokenizer_tokens,
)
from plugins.mock_upstream import CREATED, StreamCut, _error, _sse

if TYPE_CHECKING:
    from plugins.mock_upstream import _Upstream

WEB_SEARCH_TYPES = frozenset({"web_search", "web_search_preview", "web_search_2025_08_26",
                              "web_search_preview_2025_03_11"})
ARGUMENT_CHUNK = 4  # characters per `function_call_arguments.delta` (one token each)
PLACEHOLDERS: dict[str, object] = {
    "string": "mock", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {},
    "null": None,
}


# --- reading the request ---------------------------------------------------------------------


def _items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The input as items: a string input is one user message."""
    raw = body.get("input")
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    return [item for item in raw if isinstance(item, dict)] if isinstance(raw, list) else []


def _function_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return []
    return [t for t in tools if isinstance(t, dict) and t.get("type") == "function"
            and isinstance(t.get("name"), str)]


def _has_web_search(body: dict[str, Any]) -> bool:
    tools = body.get("tools")
    return isinstance(tools, list) and any(
        isinstance(t, dict) and t.get("type") in WEB_SEARCH_TYPES for t in tools)


def _item_texts(item: dict[str, Any]) -> Iterator[str]:
    kind = item.get("type")
    if kind == "function_call":
        yield from _texts(item.get("arguments"))
    elif kind == "function_call_output":
        yield from _texts(item.get("output"))
    elif kind in (None, "message"):
        yield from _texts(item.get("content"))


def responses_texts(body: dict[str, Any]) -> list[str]:
    """The texts whose words-mode tokens make a response's input (see the module's doc)."""
    texts = list(_texts(body.get("instructions")))
    for item in _items(body):
        texts.extend(_item_texts(item))
    for tool in _function_tools(body):
        texts.append(tool["name"])
        texts.extend(_texts(tool.get("description")))
        if tool.get("parameters") is not None:
            texts.append(json.dumps(tool["parameters"], separators=(",", ":")))
    return texts


def _tool_outputs(items: list[dict[str, Any]]) -> str | None:
    """The text of the last run of `function_call_output` items, or None when there is none."""
    run: list[str] = []
    for index, item in enumerate(items):
        if item.get("type") == "function_call_output":
            if index == 0 or items[index - 1].get("type") != "function_call_output":
                run = []
            run.extend(_texts(item.get("output")))
    if not any(item.get("type") == "function_call_output" for item in items):
        return None
    return " ".join(run)


def _query(items: list[dict[str, Any]]) -> str:
    """What the fake searches the web for: the last user message's text, or a stock query."""
    for item in reversed(items):
        if item.get("role") == "user" and (text := " ".join(_texts(item.get("content")))):
            return text[:100]
    return "mock query"


def _placeholder(schema: object) -> object:
    """A value of the JSON schema's type: its required properties filled, recursively."""
    if not isinstance(schema, dict):
        return "mock"
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for union in ("anyOf", "oneOf"):
        if isinstance(schema.get(union), list) and schema[union]:
            return _placeholder(schema[union][0])
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind != "object":
        return PLACEHOLDERS.get(kind, "mock") if isinstance(kind, str) else "mock"
    properties = schema.get("properties")
    required = schema.get("required")
    if not isinstance(properties, dict) or not isinstance(required, list):
        return {}
    return {name: _placeholder(properties.get(name)) for name in required
            if isinstance(name, str)}


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _chosen_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The function tool to call, or None to answer with text."""
    choice = body.get("tool_choice")
    tools = _function_tools(body)
    if choice == "none" or not tools:
        return None
    if isinstance(choice, dict) and choice.get("type") == "function":
        return next((t for t in tools if t["name"] == choice.get("name")), tools[0])
    return tools[0]


def _reasons(body: dict[str, Any]) -> bool:
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict):
        return reasoning.get("effort") != "none"
    return reasoning is not None or str(body.get("model", "")).startswith("o")


# --- the plan: what the fake generates ---------------------------------------------------------


@dataclass(frozen=True)
class _Main:
    """The answer item: text pieces (words or 4-character chunks) and their running cost."""

    call: dict[str, Any] | None  # the function tool called, or None for a message
    pieces: list[str]
    costs: list[int]  # costs[i]: tokens of pieces[: i + 1]
    words: bool = True  # pieces are words: at most one per token of the limit, as on chat

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def tokens(self) -> int:
        return self.costs[-1] if self.costs else 0


def _costs(pieces: list[str], per_piece: bool) -> list[int]:
    """Running token counts: one per piece, or the tokenizer count of the text so far."""
    if per_piece:
        return list(range(1, len(pieces) + 1))
    costs: list[int] = []
    ascii_chars = other_chars = 0
    for piece in pieces:
        more_ascii, more_other = _char_counts(piece)
        ascii_chars, other_chars = ascii_chars + more_ascii, other_chars + more_other
        costs.append(_tokenizer_count(ascii_chars, other_chars))
    return costs


def _chunks(text: str) -> list[str]:
    return [text[i : i + ARGUMENT_CHUNK] for i in range(0, len(text), ARGUMENT_CHUNK)]


class _Mark(NamedTuple):
    """A stream's bill once an event went out: output tokens, reasoning, web searches."""

    completion: int
    reasoning: int
    searches: int


@dataclass(frozen=True)
class _Plan:
    response_id: str
    model: str
    prompt: _Prompt
    reasoning: int
    searches: list[str]  # one query per web_search_call
    main: _Main
    truncated: bool
    result_tokens: int  # input tokens of each search's results (in `prompt`)

    @property
    def output_tokens(self) -> int:
        return self.reasoning + self.main.tokens

    def prompt_billed(self, searched: int) -> int:
        """The plain input billed once `searched` searches are done (a stream's bill grows)."""
        return self.prompt.uncached - (len(self.searches) - searched) * self.result_tokens


class ResponsesApi:
    """`POST /v1/responses` and `POST /v1/messages/count_tokens`, bound to one `_Upstream`."""

    def __init__(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        self.state = upstream.state

    # --- planning ----------------------------------------------------------------------------

    def _input_tokens(self, body: dict[str, Any], context: int, searches: int) -> _Prompt:
        """The request's tokens, the stored context's, then the search results' (never cached)."""
        if self.state.billing == "tokenizer":
            total = tokenizer_tokens(body)
        else:
            total = count_tokens(responses_texts(body))
        total += context
        cached = min(max(self.state.faults.cache_read_tokens, 0), total)
        return _Prompt(total + searches * self._result_tokens, cache_read=cached)

    @property
    def _result_tokens(self) -> int:
        return max(self.state.faults.search_result_tokens, 0)

    def _main(self, body: dict[str, Any], items: list[dict[str, Any]]) -> _Main:
        faults = self.state.faults
        per_word = self.state.billing == "words"
        outputs = _tool_outputs(items)
        tool = _chosen_tool(body) if outputs is None else None
        if faults.ignore_max_tokens:
            words = _words(max(faults.overrun_tokens, 0), faults.answer_script)
            return _Main(None, words, _costs(words, per_word))
        if tool is not None:
            arguments = _compact(_placeholder(tool.get("parameters")))
            return _Main(tool, _chunks(arguments), _costs(_chunks(arguments), False), False)
        if outputs:
            words = re.findall(r"\s*\S+", outputs)
            return _Main(None, words, _costs(words, per_word))
        text = body.get("text")
        text_format = text.get("format") if isinstance(text, dict) else None
        if isinstance(text_format, dict) and text_format.get("type") == "json_schema":
            pieces = _chunks(_compact(_placeholder(text_format.get("schema"))))
            return _Main(None, pieces, _costs(pieces, False), False)
        words = _words(max(faults.answer_tokens, 0), faults.answer_script)
        return _Main(None, words, _costs(words, per_word))

    def _plan(self, body: dict[str, Any], limit: int | None, context: int) -> _Plan:
        faults = self.state.faults
        items = _items(body)
        reasoning = max(faults.reasoning_tokens, 0) if _reasons(body) else 0
        main = self._main(body, items)
        truncated = False
        if limit is not None and not faults.ignore_max_tokens:
            truncated = reasoning > limit
            reasoning = min(reasoning, limit)
            budget = limit - reasoning
            kept = sum(1 for cost in main.costs if cost <= budget)
            kept = min(kept, budget) if main.words else kept
            truncated = truncated or kept < len(main.pieces)
            main = _Main(main.call, main.pieces[:kept], main.costs[:kept], main.words)
        searches = 0
        if _has_web_search(body) and body.get("tool_choice") != "none":
            searches = max(faults.web_searches, 0)
            cap = body.get("max_tool_calls")
            if isinstance(cap, int):
                searches = min(searches, max(cap, 0))
        elif faults.unoffered_tool_calls > 0:
            searches = faults.unoffered_tool_calls  # a provider that misbehaves
        query = _query(items)
        queries = [query if searches == 1 else f"{query} ({i + 1})" for i in range(searches)]
        return _Plan(f"resp_{secrets.token_hex(24)}", str(body["model"]),
                     self._input_tokens(body, context, searches), reasoning, queries, main, truncated,
                     self._result_tokens)

    # --- shapes ------------------------------------------------------------------------------

    def _output(self, plan: _Plan, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The output items, each as `response.output_item.done` carries it."""
        base = plan.response_id[len("resp_") :]
        output: list[dict[str, Any]] = []
        if plan.reasoning:
            item: dict[str, Any] = {"id": f"rs_{base}", "type": "reasoning", "summary": []}
            include = body.get("include")
            if isinstance(include, list) and "reasoning.encrypted_content" in include:
                item["encrypted_content"] = f"mock-encrypted-{base}"
            output.append(item)
        for index, query in enumerate(plan.searches):
            output.append({"id": f"ws_{base}_{index}", "type": "web_search_call",
                           "status": "completed", "action": {"type": "search", "query": query}})
        status = "incomplete" if plan.truncated else "completed"
        main = plan.main
        if plan.truncated and not main.pieces:
            return output  # the limit left nothing for the answer
        if main.call is not None:
            output.append({"id": f"fc_{base}", "type": "function_call", "status": status,
                           "call_id": f"call_{base[:24]}", "name": main.call["name"],
                           "arguments": main.text})
        else:
            part = {"type": "output_text", "text": main.text, "annotations": [], "logprobs": []}
            output.append({"id": f"msg_{base}", "type": "message", "status": status,
                           "role": "assistant", "content": [part]})
        return output

    def _usage(self, plan: _Plan) -> dict[str, Any]:
        total = plan.prompt.total
        return {
            "input_tokens": total,
            "input_tokens_details": {"cached_tokens": plan.prompt.cache_read,
                                     "cache_write_tokens": 0},
            "output_tokens": plan.output_tokens,
            "output_tokens_details": {"reasoning_tokens": plan.reasoning},
            "total_tokens": total + plan.output_tokens,
        }

    def _response(self, plan: _Plan, body: dict[str, Any], *, final: bool,
                  usage: bool = True) -> dict[str, Any]:
        """The `Response` object: as it ends when `final`, else as it starts (in progress)."""
        status = ("incomplete" if plan.truncated else "completed") if final else "in_progress"
        tools = [{"description": None, "strict": True, **t} if t.get("type") == "function" else t
                 for t in body.get("tools") or [] if isinstance(t, dict)]
        requested = body.get("reasoning")
        reasoning = requested if isinstance(requested, dict) else {}
        tier = body.get("service_tier")
        return {
            "id": plan.response_id,
            "object": "response",
            "created_at": CREATED,
            "status": status,
            "background": False,
            "completed_at": CREATED if status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": body.get("max_tool_calls"),
            "model": plan.model,
            "output": self._output(plan, body) if final else [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {"effort": None, "summary": None, **reasoning},
            "safety_identifier": body.get("safety_identifier"),
            "service_tier": tier if isinstance(tier, str) and tier != "auto" else "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": tools,
            "top_logprobs": body.get("top_logprobs", 0),
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation", "disabled"),
            "usage": self._usage(plan) if final and usage else None,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }

    # --- routes ------------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        body = await self.upstream._admit(request, "openai")
        return body if isinstance(body, Response) else self.respond(body)

    def respond(self, body: dict[str, Any]) -> Response:
        """The response to an admitted body (the route's, and a batch line's)."""
        if not isinstance(body.get("model"), str):
            return _error("openai", 400, "Missing required parameter: 'model'.")
        if "input" not in body and "previous_response_id" not in body:
            return _error("openai", 400, "Missing required parameter: 'input'.")
        if not isinstance(body.get("input", ""), str | list):
            return _error("openai", 400, "'input' must be a string or a list of items.")
        limit = body.get("max_output_tokens")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            return _error("openai", 400, "'max_output_tokens' must be a positive integer.")
        context = 0
        previous = body.get("previous_response_id")
        if previous is not None:
            if previous not in self.state.responses:
                error = {"message": f"Previous response with id '{previous}' not found.",
                         "type": "invalid_request_error", "param": "previous_response_id",
                         "code": "previous_response_not_found"}
                return JSONResponse({"error": error}, 404)
            context = self.state.responses[previous]
        plan = self._plan(body, limit, context)
        bill = self.upstream._bill("responses", plan.model, bool(body.get("stream")), plan.prompt)
        store = body.get("store") is not False
        faults = self.state.faults
        if not body.get("stream"):
            bill.completion_tokens, bill.reasoning_tokens = plan.output_tokens, plan.reasoning
            bill.web_search_calls = len(plan.searches)
            bill.complete = bill.ended = True
            if store:
                self.state.responses[plan.response_id] = plan.prompt.total + plan.output_tokens
            return JSONResponse(self._response(plan, body, final=True,
                                               usage=not faults.omit_usage))
        usage = not (faults.omit_usage or faults.omit_final_usage)
        bill.prompt_tokens = plan.prompt_billed(0)
        events = self._events(plan, body, usage)
        return StreamingResponse(self._send(events, bill, plan, store),
                                 media_type="text/event-stream")

    async def count_tokens(self, request: Request) -> Response:
        body = await self.upstream._admit(request, "anthropic")
        if isinstance(body, Response):
            return body
        if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
            return _error("anthropic", 400, "model: Field required; messages: Field required")
        prompt = self.upstream._prompt({"max_tokens": 1, **body}, "anthropic")
        return JSONResponse({"input_tokens": prompt.total})

    # --- streaming ---------------------------------------------------------------------------

    def _events(self, plan: _Plan, body: dict[str, Any],
                usage: bool) -> list[tuple[str, _Mark | None]]:
        """The SSE events, each with the bill's state once it went out (None: unchanged)."""
        events: list[tuple[str, _Mark | None]] = []

        def emit(kind: str, mark: _Mark | None = None, **fields: Any) -> None:
            data = {"type": kind, "sequence_number": len(events), **fields}
            events.append((_sse(data, kind), mark))

        start = self._response(plan, body, final=False)
        emit("response.created", response=start)
        emit("response.in_progress", response=start)
        searched = 0
        for index, item in enumerate(self._output(plan, body)):
            kind = item["type"]
            if kind == "reasoning":
                emit("response.output_item.added", output_index=index, item=item)
                mark = _Mark(plan.reasoning, plan.reasoning, 0)
            elif kind == "web_search_call":
                emit("response.output_item.added", output_index=index,
                     item={**item, "status": "in_progress"})
                for phase in ("in_progress", "searching", "completed"):
                    emit(f"response.web_search_call.{phase}", output_index=index,
                         item_id=item["id"])
                searched += 1
                mark = _Mark(plan.reasoning, plan.reasoning, searched)
            elif kind == "function_call":
                emit("response.output_item.added", output_index=index,
                     item={**item, "arguments": "", "status": "in_progress"})
                for piece, cost in zip(plan.main.pieces, plan.main.costs, strict=True):
                    emit("response.function_call_arguments.delta",
                         _Mark(plan.reasoning + cost, plan.reasoning, searched),
                         output_index=index, item_id=item["id"], delta=piece)
                emit("response.function_call_arguments.done", output_index=index,
                     item_id=item["id"], arguments=item["arguments"])
                mark = None
            else:
                ids = {"output_index": index, "item_id": item["id"], "content_index": 0}
                part = item["content"][0]
                emit("response.output_item.added", output_index=index,
                     item={**item, "status": "in_progress", "content": []})
                emit("response.content_part.added", **ids, part={**part, "text": ""})
                for piece, cost in zip(plan.main.pieces, plan.main.costs, strict=True):
                    emit("response.output_text.delta",
                         _Mark(plan.reasoning + cost, plan.reasoning, searched),
                         **ids, delta=piece, logprobs=[])
                emit("response.output_text.done", **ids, text=part["text"], logprobs=[])
                emit("response.content_part.done", **ids, part=part)
                mark = None
            emit("response.output_item.done", mark, output_index=index, item=item)
        final = self._response(plan, body, final=True, usage=usage)
        kind = "response.incomplete" if plan.truncated else "response.completed"
        emit(kind, response=final)
        return events

    async def _send(self, events: list[tuple[str, _Mark | None]], bill: Bill, plan: _Plan,
                    store: bool) -> AsyncIterator[str]:
        """Send the events, billing each mark once its event went out (see `_Upstream._stream`)."""
        faults = self.state.faults
        try:
            for i, (event, mark) in enumerate(events):
                if faults.cut_after_chunks is not None and i >= faults.cut_after_chunks:
                    raise StreamCut(f"stream cut after {i} events")
                if i and faults.chunk_delay_s:
                    await asyncio.sleep(faults.chunk_delay_s)
                yield event
                if mark is not None:
                    bill.completion_tokens, bill.reasoning_tokens, bill.web_search_calls = mark
                    bill.prompt_tokens = plan.prompt_billed(mark.searches)
            bill.complete = True
            if store:
                self.state.responses[plan.response_id] = plan.prompt.total + plan.output_tokens
        finally:
            bill.ended = True
