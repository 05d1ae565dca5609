"""Anthropic server-side tools on the fake's `POST /v1/messages` (see :mod:`plugins.mock_upstream`).

A tool whose `type` starts with `web_search_` (`web_search_20250305`...) makes the answer begin
with `n = faults.web_searches` searches, at most the tool's `max_uses` when it has one; a tool whose
`type` starts with `web_fetch_` adds `faults.web_fetches` fetches the same way, after the
searches. `tool_choice` `{"type": "none"}` makes none. Each call is two content blocks before the
usual text answer (which is unchanged: same words, same limit; the calls cost no output tokens):

* `server_tool_use` `{"id": "srvtoolu_<hex>", "name": "web_search", "input": {"query": Q}}` (Q:
  the last user message's text, its first 100 characters, numbered " (i)" when n > 1) or
  `{"name": "web_fetch", "input": {"url": U}}` (U: the URLs in that text in turn, else
  `https://example.com/`);
* `web_search_tool_result` `{"tool_use_id", "content": [two "web_search_result" {url, title,
  encrypted_content, page_age}]}`, or `web_fetch_tool_result` `{"tool_use_id", "content":
  {"type": "web_fetch_result", "url": U, "content": a plain-text document, "retrieved_at"}}`.

Billing, as Anthropic does: each result is fed to the model, so each call adds
`faults.search_result_tokens` (100 by default) to `usage.input_tokens` -- a fetch at most its
tool's `max_content_tokens`, the ceiling on a fetched page --; `usage.server_tool_use`
is `{"web_search_requests": n, "web_fetch_requests": m}` when the answer made any call (absent
otherwise). The `Bill` gets the extra input in `prompt_tokens` (so `cost_micros` stays the
provider's invoice) and the calls in `web_search_calls` / `web_fetch_calls`, whose per-call fees a
test adds itself.

Streams: after `message_start` (whose usage is the prompt alone), each block comes as
`content_block_start` -- a `server_tool_use` with `input: {}`, then one `input_json_delta` with
the whole input, then `content_block_stop`; a result whole in its `content_block_start`, then
`content_block_stop` -- and the text block follows at the next index. The final `message_delta`
usage then carries the cumulative `input_tokens` (and cache fields, if any) and
`server_tool_use`. The stream's bill counts a call and its input once its result block's
`content_block_stop` went out.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plugins.mock_billing import Bill, Sent, _texts

if TYPE_CHECKING:
    from plugins.mock_upstream import Faults

SEARCH_PREFIX = "web_search_"
FETCH_PREFIX = "web_fetch_"
RESULTS_PER_SEARCH = 2
DEFAULT_URL = "https://example.com/"
RETRIEVED_AT = "2023-11-14T22:13:20Z"  # mock_upstream.CREATED, as a date


@dataclass(frozen=True)
class _Call:
    """One server tool call: its `server_tool_use` block and its result block."""

    use: dict[str, Any]
    result: dict[str, Any]
    tokens: int  # the input its result adds

    @property
    def search(self) -> bool:
        return bool(self.use["name"] == "web_search")


def _tool(tools: list[Any], prefix: str) -> dict[str, Any] | None:
    return next((t for t in tools if isinstance(t, dict) and str(t.get("type", "")).startswith(prefix)),
                None)


def _uses(tool: dict[str, Any] | None, wanted: int) -> int:
    """How many calls of `tool` the answer makes: `wanted`, at most its `max_uses`."""
    if tool is None:
        return 0
    cap = tool.get("max_uses")
    return max(0, min(wanted, cap) if isinstance(cap, int) else wanted)


def _user_text(body: dict[str, Any]) -> str:
    """The text of the last user message (what the fake searches for)."""
    users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    return " ".join(_texts(users[-1].get("content"))) if users else ""


def _search(query: str, tokens: int) -> _Call:
    use_id = f"srvtoolu_{secrets.token_hex(12)}"
    results = [
        {"type": "web_search_result", "url": f"https://example.com/search/{use_id[-8:]}/{i}",
         "title": f"Mock result {i + 1} for {query}", "encrypted_content": f"mock-encrypted-{use_id}-{i}",
         "page_age": "1 day ago"}
        for i in range(RESULTS_PER_SEARCH)
    ]
    return _Call(
        {"type": "server_tool_use", "id": use_id, "name": "web_search", "input": {"query": query}},
        {"type": "web_search_tool_result", "tool_use_id": use_id, "content": results},
        tokens,
    )


def _fetch(url: str, tokens: int) -> _Call:
    use_id = f"srvtoolu_{secrets.token_hex(12)}"
    document = {"type": "document", "title": f"Mock page at {url}",
                "source": {"type": "text", "media_type": "text/plain", "data": f"The mock page {url}."}}
    page = {"type": "web_fetch_result", "url": url, "content": document, "retrieved_at": RETRIEVED_AT}
    return _Call(
        {"type": "server_tool_use", "id": use_id, "name": "web_fetch", "input": {"url": url}},
        {"type": "web_fetch_tool_result", "tool_use_id": use_id, "content": page},
        tokens,
    )


class ServerTools:
    """The server tool calls the fake makes before its answer to one messages request."""

    def __init__(self, body: dict[str, Any], faults: Faults) -> None:
        tools = body.get("tools")
        tools = tools if isinstance(tools, list) else []
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and choice.get("type") == "none":
            tools = []
        search, fetch = _tool(tools, SEARCH_PREFIX), _tool(tools, FETCH_PREFIX)
        searches, fetches = _uses(search, faults.web_searches), _uses(fetch, faults.web_fetches)
        tokens = max(faults.search_result_tokens, 0)
        ceiling = fetch.get("max_content_tokens") if fetch is not None else None
        page_tokens = min(tokens, ceiling) if isinstance(ceiling, int) else tokens
        text = _user_text(body)
        query = text[:100] or "mock query"
        urls = re.findall(r"https?://[^\s\"'<>]+", text) or [DEFAULT_URL]
        self.calls = [_search(query if searches == 1 else f"{query} ({i + 1})", tokens)
                      for i in range(searches)]
        self.calls += [_fetch(urls[i % len(urls)], page_tokens) for i in range(fetches)]

    @property
    def blocks(self) -> list[dict[str, Any]]:
        """The content blocks of the calls, in order (none without server tools)."""
        return [block for call in self.calls for block in (call.use, call.result)]

    @property
    def counts(self) -> dict[str, int]:
        searches = sum(call.search for call in self.calls)
        return {"web_search_requests": searches, "web_fetch_requests": len(self.calls) - searches}

    def usage(self, usage: dict[str, Any], *, delta: bool = False) -> dict[str, Any]:
        """The answer's usage from the plain one (the prompt's and the output's), or with `delta`
        its stream's final `message_delta` usage (without server tools: the output tokens alone)."""
        if not self.calls:
            return {"output_tokens": usage["output_tokens"]} if delta else usage
        more = {**usage, "input_tokens": usage["input_tokens"] + sum(call.tokens for call in self.calls)}
        if delta:
            more.pop("cache_creation", None)  # not a field of a message_delta's usage
        return {**more, "server_tool_use": self.counts}

    def _billed(self, call: _Call) -> Callable[[Bill], None]:
        def bill(bill: Bill) -> None:
            bill.prompt_tokens += call.tokens
            if call.search:
                bill.web_search_calls += 1
            else:
                bill.web_fetch_calls += 1

        return bill

    def bill(self, bill: Bill) -> None:
        """Add every call (its result's input and the call itself) to a non-stream bill."""
        for call in self.calls:
            self._billed(call)(bill)

    def events(self) -> list[tuple[dict[str, Any], Sent]]:
        """The stream events of the calls (blocks 0 to 2n - 1), each with what it bills once sent."""
        events: list[tuple[dict[str, Any], Sent]] = []
        for number, call in enumerate(self.calls):
            use, result = 2 * number, 2 * number + 1
            partial = json.dumps(call.use["input"])
            events += [
                ({"type": "content_block_start", "index": use, "content_block": {**call.use, "input": {}}},
                 None),
                ({"type": "content_block_delta", "index": use,
                  "delta": {"type": "input_json_delta", "partial_json": partial}}, None),
                ({"type": "content_block_stop", "index": use}, None),
                ({"type": "content_block_start", "index": result, "content_block": call.result}, None),
                ({"type": "content_block_stop", "index": result}, self._billed(call)),
            ]
        return events
