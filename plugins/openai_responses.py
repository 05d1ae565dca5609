"""The OpenAI Responses API wire format (``POST /v1/responses``): the OpenAI Agents SDK's default.

Bound like a chat completion: every known field as text, ``input`` items by their kind (messages
with text, image and file parts; function calls and their outputs; reasoning items), image and
file parts by the same rules as chat. Server-side tools billed per call with results billed as
input (web search, file search) are listed for the gateway, which prices them
(``tools.<name>``), caps their calls with ``max_tool_calls`` and counts the calls the provider
reports (its ``*_call`` output items). Server-side tools billed otherwise (code interpreter
containers, image generation, remote MCP servers, ...) are refused, as are the fields that make
the provider read input the broker cannot see: a stored ``conversation``, a reusable ``prompt``,
a ``background`` job. ``previous_response_id`` is
accepted when the broker metered that response itself: the gateway then tells the bound how many
tokens the stored conversation holds (:attr:`BoundContext.prior_context_tokens`), which the
provider bills again as input.

Usage comes from the response's ``usage`` (``input_tokens`` with ``input_tokens_details.
cached_tokens``, ``output_tokens`` with reasoning inside); in a stream from the terminal
``response.completed`` (or ``.incomplete`` / ``.failed``) event, which the provider always sends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.plugin import (
    OPENAI_COSTLIEST,
    BoundContext,
    EndReason,
    InvalidRequest,
    MeterState,
    RequestBound,
    SseEvent,
    ToolUse,
    Unbounded,
    Usage,
    base64_data,
    check_fields,
    data_url,
    delta_tokens,
    ended_code,
    ended_message,
    image_rule,
    image_tokens,
    json_tokens,
    pdf_tokens,
    positive_int,
    sse,
    unsized_tokens,
    without,
)

PATH = "/responses"
PER_REQUEST_TOKENS = 3
PER_ITEM_TOKENS = 4
# The system text a provider adds, unseen, when tools are offered (a ceiling).
TOOL_FRAMING_TOKENS = 1024
FIELDS = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
    "max_output_tokens", "max_tool_calls", "metadata", "previous_response_id", "store", "stream",
    "temperature", "top_p", "top_logprobs", "text", "reasoning", "truncation", "user",
    "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier", "include",
    "stream_options",
})
REFUSED = {
    "conversation": "a stored conversation is input the broker cannot see, so it cannot bound "
                    "its cost (send the input, or previous_response_id of a metered response)",
    "prompt": "a stored prompt template is input the broker cannot see, so it cannot bound its "
              "cost",
    "background": "background responses run after the call has ended, outside its hold",
}
# Tools the client runs itself: they cost only the tokens of their definitions.
CLIENT_TOOLS = frozenset({"function", "custom"})
# Server-side tools billed per call, whose results are input tokens: what the broker meters.
METERED_TOOLS = ("web_search", "file_search")
# Output items of tools the client runs: not calls the provider bills.
_CLIENT_CALLS = frozenset({"function_call", "custom_tool_call", "computer_call",
                           "local_shell_call", "shell_call", "apply_patch_call"})
# Input items whose every token is in the request: messages, and the calls of client-side
# tools with their outputs.
INPUT_ITEMS = frozenset({"message", "function_call", "function_call_output", "custom_tool_call",
                         "custom_tool_call_output"})
_DELTAS = frozenset({
    "response.output_text.delta", "response.refusal.delta",
    "response.function_call_arguments.delta", "response.custom_tool_call_input.delta",
    "response.reasoning_summary_text.delta", "response.reasoning_text.delta",
})
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def read_usage(response: Any) -> Usage | None:
    """The usage of a Response object (or None when it reports none)."""
    raw = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(raw, dict):
        return None
    prompt, completion = _count(raw, "input_tokens"), _count(raw, "output_tokens")
    if prompt is None or completion is None:
        return None
    details = raw.get("input_tokens_details")
    cached = _count(details, "cached_tokens") if isinstance(details, dict) else None
    return Usage(prompt, completion, cached_tokens=min(cached or 0, prompt),
                 context_id=response_id(response), tool_calls=tool_calls(response))


def tool_calls(response: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """The server-side tool calls of a response: its ``<tool>_call`` output items, by tool.
    Where the response says which of them are billable (``tool_usage.<tool>.num_requests``:
    opening a page is an item, not a billed search), that count replaces the items'."""
    output = response.get("output")
    counts: dict[str, int] = {}
    for item in output if isinstance(output, list) else ():
        kind = item.get("type") if isinstance(item, dict) else None
        if isinstance(kind, str) and kind.endswith("_call") and kind not in _CLIENT_CALLS:
            name = kind[: -len("_call")][:64]
            counts[name] = counts.get(name, 0) + 1
    billed = response.get("tool_usage")
    billed = billed if isinstance(billed, dict) else {}
    for name in list(counts):
        entry = billed.get(name)
        requests = _count(entry, "num_requests") if isinstance(entry, dict) else None
        if requests is not None:
            counts[name] = requests
    return tuple(sorted((name, n) for name, n in counts.items() if n))


def tools(body: dict[str, Any]) -> list[ToolUse]:
    """The tools a request offers, by policy name: client-side functions (and custom tools) are
    ``function``; a server-side tool is its ``type``, all under one ``max_tool_calls``."""
    raw = body.get("tools")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidRequest("tools must be a list", param="tools")
    cap = body.get("max_tool_calls")
    if cap is not None and positive_int(cap) is None:
        raise InvalidRequest("max_tool_calls must be a positive integer", param="max_tool_calls")
    found = []
    for i, tool in enumerate(raw):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(kind, str) or not kind:
            raise InvalidRequest(f"tools[{i}].type is required", param=f"tools[{i}].type")
        if kind in CLIENT_TOOLS:
            found.append(ToolUse("function", i))
        else:
            found.append(ToolUse(kind[:64], i, server=True, max_calls=cap, shared=True))
    return found


def cap_tools(body: dict[str, Any], calls: int) -> None:
    body["max_tool_calls"] = calls


def response_id(response: Any) -> str | None:
    """The id a later request may continue from (``previous_response_id``)."""
    value = response.get("id") if isinstance(response, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


def _count(raw: Any, name: str) -> int | None:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def continues(body: dict[str, Any]) -> str | None:
    """The stored response a request continues, if any."""
    ref = body.get("previous_response_id")
    if ref is None:
        return None
    if not isinstance(ref, str) or not 0 < len(ref) <= 128:
        raise InvalidRequest("previous_response_id must be a response id",
                             param="previous_response_id")
    return ref


def bound(body: dict[str, Any], ctx: BoundContext, tier_percent: Callable[[Any], int],
          part_tokens: Callable[[Any, str], int]) -> RequestBound:
    check_fields(body, FIELDS, ctx, REFUSED)
    percent = tier_percent(body.get("service_tier"))
    tools = body.get("tools")
    check_client_tools(tools, METERED_TOOLS)
    total = PER_REQUEST_TOKENS + json_tokens(without(body, ("input",)))
    if tools:
        total += TOOL_FRAMING_TOKENS
    if continues(body) is not None:
        total += ctx.prior_context_tokens
    total += _input_tokens(body.get("input"), lambda part, where: _part(part, where, ctx,
                                                                        part_tokens))
    return RequestBound(total, None, 0, percent)


def check_client_tools(tools: Any, metered: tuple[str, ...] = ()) -> None:
    """Refuse any tool whose cost the broker cannot bound: a server-side tool other than the
    ``metered`` ones (by type prefix), which the gateway prices per call. Chat completions and
    responses offer the same kinds of client-side tools."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind in CLIENT_TOOLS or (isinstance(kind, str) and kind.startswith(metered)
                                    and metered):
            continue
        raise Unbounded(
            f"tools[{i}].type: {str(kind)[:60]!r} is a server-side tool the broker cannot "
            "price on this route", param=f"tools[{i}].type")


def _input_tokens(items: Any, part: Callable[[Any, str], int]) -> int:
    if not isinstance(items, list):
        return json_tokens(items)
    total = 0
    for i, item in enumerate(items):
        total += PER_ITEM_TOKENS
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind not in INPUT_ITEMS:
            # A reference to stored items, a reasoning item (billed as the reasoning it stands
            # for, which the broker never saw) or a server-side tool's item: input the broker
            # cannot bound. previous_response_id continues such a conversation instead.
            raise Unbounded(f"input[{i}].type: {str(kind)[:40]!r} items are input the broker "
                            "cannot bound (continue with previous_response_id instead)",
                            param=f"input[{i}]")
        content = item.get("content")
        if isinstance(content, list):
            total += json_tokens(without(item, ("content",)))
            total += sum(part(p, f"input[{i}].content[{j}]") for j, p in enumerate(content))
        else:
            total += json_tokens(item)
    return total


def _part(part: Any, where: str, ctx: BoundContext, chat_part: Callable[[Any, str], int]) -> int:
    """A content part: text as text, images and files by the rules chat parts use."""
    if not isinstance(part, dict):
        return json_tokens(part)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "refusal", "summary_text", "reasoning_text"):
        return json_tokens(part)
    if kind == "input_image":
        url = part.get("image_url")
        if part.get("file_id") is not None or url is None:
            rest = json_tokens(without(part, ("image_url",)))
            return rest + image_tokens(image_rule(ctx, OPENAI_COSTLIEST), None, where)
        decoded = data_url(url, ctx, f"{where}.image_url")
        if decoded is not None and not decoded[0].startswith("image/"):
            raise Unbounded(f"{where}.image_url: not an image", param=where)
        detail = part.get("detail")
        return json_tokens(without(part, ("image_url",))) + image_tokens(
            image_rule(ctx, OPENAI_COSTLIEST), decoded[1] if decoded else None, where,
            detail if isinstance(detail, str) else None)
    if kind == "input_file":
        rest = json_tokens(without(part, ("file_data",)))
        data = part.get("file_data")
        if data is None:
            return rest + unsized_tokens(ctx, f"{where}.file_id")
        decoded = data_url(data, ctx, f"{where}.file_data")
        raw = decoded[1] if decoded is not None else base64_data(data, ctx, f"{where}.file_data")
        return rest + pdf_tokens(raw, ctx, f"{where}.file_data")
    if kind == "input_audio":
        raise Unbounded(f"{where}: audio input is billed at audio prices the broker does not "
                        "know", param=where)
    return chat_part(part, where)


def output_limit(body: dict[str, Any]) -> tuple[int | None, int]:
    raw = body.get("max_output_tokens")
    if raw is None:
        return None, 1
    value = positive_int(raw)
    if value is None:
        raise InvalidRequest("max_output_tokens must be a positive integer",
                             param="max_output_tokens")
    return value, 1


def output_bound(response: Any) -> int:
    output = response.get("output") if isinstance(response, dict) else None
    return json_tokens(output) if isinstance(output, list) else 0


class ResponsesStreamMeter(MeterState):
    """Counts the generated deltas (for the hold's wall) and takes usage from the terminal
    event. Every event goes to the client as it came."""

    def read(self, event: SseEvent) -> bool:
        data = event.json_object()
        if data is None:
            return True
        kind = data.get("type", event.event)
        if kind in _DELTAS:
            delta = data.get("delta")
            if isinstance(delta, str):
                low, high = delta_tokens(delta)
                self.streamed_tokens += low
                self.output_bound += high
        elif kind in _TERMINAL:
            response = data.get("response")
            usage = read_usage(response)
            if usage is not None:
                self.usage, self.final = usage, True
            self.done = True
            self.failed = kind == "response.failed"
        elif kind == "error":
            self.failed = True
        return True

    def epilogue(self, reason: EndReason) -> bytes:
        return sse({"type": "error", "code": ended_code(reason), "message": ended_message(reason),
                    "param": None, "sequence_number": 0}, event="error")
