"""How the fake provider counts and bills tokens (see :mod:`plugins.mock_upstream`).

Token rules, so that tests can compute the expected usage. `MockState.billing` picks one:

* `"words"` (the default) -- prompt tokens: the sum of `ceil(len(text) / 4)` over every text of
  the request, minimum 1, no per-message overhead. The texts are each message's `content` when it
  is a string, or the `text` of each part when it is a list; Anthropic's `system` (string or text
  blocks) counts too. For embeddings, each string of `input` is a text. Completion tokens: one
  per generated word.
* `"tokenizer"` -- prompt tokens: over EVERY string anywhere in the request body, at any depth
  (every string value and every object key: messages, system, tools and their JSON schemas,
  images' base64 data, unknown fields...), `ceil(ascii_chars / 4) + non_ascii_chars` per
  string, summed, minimum 1 (`tokenizer_tokens`; the walk is iterative, any depth is fine).
  Embeddings: the same over `input`. Completion tokens: the same count (`text_tokens`, no
  minimum) of the generated answer text, as one string.

Bills: every generation request that gets past authentication, the faults and validation
(chat, messages, embeddings, responses -- see :mod:`plugins.mock_responses`) appends one `Bill`
to `MockState.bills`, with `prompt_tokens` holding the prompt tokens billed at the plain input
price (the total minus cache reads and writes), web search and fetch results included (see
:mod:`plugins.mock_server_tools`; `web_search_calls` and `web_fetch_calls` count the calls). A
non-stream bill is filled at once with what the usage reports (even when `omit_usage` hides
it). A stream's bill holds the prompt from the start and counts the completion as the server
sends each content chunk: one token per chunk in words mode, the tokenizer count of the text
sent so far in tokenizer mode -- and a server tool's call and result once its result went out;
`complete` turns True after the last event went out, `ended` whenever the stream stops
(finished, cut by `cut_after_chunks`, or abandoned by the client). Each line a batch answers
appends its route's bill, with `batch_id` set (see :mod:`plugins.mock_batches`).
`MockState.total_billed` prices them all, each bill rounded up to a whole micro-dollar on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

Billing = Literal["words", "tokenizer"]
Script = Literal["latin", "cjk"]
BillRoute = Literal["chat", "messages", "embeddings", "responses"]

CJK_WORDS = "字文中語言模型測試"  # a "cjk" answer cycles through these, one per word
PER_MILLION = 1_000_000


@dataclass
class Bill:
    """What the fake billed for one generation request; a stream's grows as it is sent.

    `prompt_tokens` are the prompt tokens billed at the plain input price: the prompt minus its
    cache writes and reads, which have fields of their own; they include the web search and fetch
    results the provider fed the model (billed as input, as the real providers do). The tool
    calls' own fees are not in `cost_micros`: a test adds `web_search_calls` x its price.
    """

    route: BillRoute
    model: str
    stream: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_write_tokens: int = 0  # Anthropic 5-minute cache writes
    cache_write_1h_tokens: int = 0  # Anthropic 1-hour cache writes
    cache_read_tokens: int = 0
    reasoning_tokens: int = 0  # Responses API: the part of `completion_tokens` spent reasoning
    web_search_calls: int = 0  # web searches: `web_search_call` items, Anthropic's web_search (not priced)
    web_fetch_calls: int = 0  # Anthropic's web_fetch calls (not priced here)
    complete: bool = False  # the whole answer was sent
    ended: bool = False  # nothing more will be billed (finished, cut or abandoned)
    batch_id: str | None = None  # the batch that answered this request (see plugins.mock_batches)

    def cost_micros(
        self,
        price_in: int,
        price_out: int,
        cache_write: int | None = None,
        cache_write_1h: int | None = None,
        cache_read: int | None = None,
    ) -> int:
        """This bill in micro-dollars, rounded up; prices are micro-dollars per million tokens.

        Cache prices default to Anthropic's multiples of the input price: 5-minute writes 1.25x,
        1-hour writes 2x; reads default to the input price. Exact: the sum is kept in quarters.
        """
        write_quarters = 5 * price_in if cache_write is None else 4 * cache_write
        write_1h = 2 * price_in if cache_write_1h is None else cache_write_1h
        read = price_in if cache_read is None else cache_read
        whole = (
            self.prompt_tokens * price_in
            + self.completion_tokens * price_out
            + self.cache_write_1h_tokens * write_1h
            + self.cache_read_tokens * read
        )
        quarters = 4 * whole + self.cache_write_tokens * write_quarters
        return -(-quarters // (4 * PER_MILLION))


@dataclass(frozen=True)
class _Prompt:
    """A request's prompt tokens, split the way the provider bills them."""

    total: int
    cache_read: int = 0
    cache_write: int = 0  # 5-minute writes
    cache_write_1h: int = 0
    caching: bool = False  # report Anthropic's cache fields

    @property
    def uncached(self) -> int:
        return self.total - self.cache_read - self.cache_write - self.cache_write_1h

    def anthropic_usage(self, output_tokens: int) -> dict[str, Any]:
        usage: dict[str, Any] = {"input_tokens": self.uncached}
        if self.caching:
            usage["cache_creation_input_tokens"] = self.cache_write + self.cache_write_1h
            usage["cache_read_input_tokens"] = self.cache_read
            usage["cache_creation"] = {
                "ephemeral_5m_input_tokens": self.cache_write,
                "ephemeral_1h_input_tokens": self.cache_write_1h,
            }
        usage["output_tokens"] = output_tokens
        return usage


# What a stream event bills once it went out: its answer text (counted by a `Meter`), an action on
# the bill (a server tool's result: more input, one more call), or nothing.
Sent = str | Callable[[Bill], None] | None


def _texts(content: object) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def count_tokens(texts: Iterable[str]) -> int:
    """The words-mode tokenizer: `ceil(len / 4)` per text, summed, at least 1."""
    return max(1, sum(math.ceil(len(text) / 4) for text in texts))


def _prompt_tokens(body: dict[str, Any]) -> int:
    """The words-mode prompt tokens of a chat or messages body."""
    texts = [t for m in body["messages"] if isinstance(m, dict) for t in _texts(m.get("content"))]
    return count_tokens([*texts, *_texts(body.get("system"))])


def _char_counts(text: str) -> tuple[int, int]:
    """(ASCII characters, other characters) of `text`."""
    if text.isascii():
        return len(text), 0
    ascii_chars = sum(1 for char in text if char < "\x80")
    return ascii_chars, len(text) - ascii_chars


def _tokenizer_count(ascii_chars: int, other_chars: int) -> int:
    return -(-ascii_chars // 4) + other_chars


def text_tokens(text: str) -> int:
    """The tokenizer-mode count of one string: a token per 4 ASCII characters (rounded up) plus a
    token per non-ASCII character; 0 for the empty string."""
    return _tokenizer_count(*_char_counts(text))


def _walk(value: object) -> Iterator[object]:
    """Every node of a JSON value, object keys included, depth-first, without recursion."""
    stack: list[object] = [value]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, dict):
            for key, item in reversed(list(node.items())):
                stack.append(item)
                stack.append(key)
        elif isinstance(node, list | tuple):
            stack.extend(reversed(node))


def tokenizer_tokens(value: object) -> int:
    """The tokenizer-mode count of a JSON value: `text_tokens` of every string at any depth, keys
    included, summed, at least 1."""
    return max(1, sum(text_tokens(node) for node in _walk(value) if isinstance(node, str)))


def _cache_ttls(body: object) -> set[str]:
    """The TTL of every `cache_control` in the body ("5m" unless it says "1h")."""
    ttls: set[str] = set()
    for node in _walk(body):
        if isinstance(node, dict) and node.get("cache_control") is not None:
            control = node["cache_control"]
            ttl = control.get("ttl") if isinstance(control, dict) else None
            ttls.add("1h" if ttl == "1h" else "5m")
    return ttls


def _words(n: int, script: Script = "latin") -> list[str]:
    if script == "cjk":
        return [CJK_WORDS[i % len(CJK_WORDS)] for i in range(n)]
    return [f"w{i}" if i == 0 else f" w{i}" for i in range(n)]


def _fit(words: list[str], limit: int) -> list[str]:
    """The longest prefix of `words` whose tokenizer count stays within `limit`."""
    ascii_chars = other_chars = 0
    for i, word in enumerate(words):
        more_ascii, more_other = _char_counts(word)
        ascii_chars, other_chars = ascii_chars + more_ascii, other_chars + more_other
        if _tokenizer_count(ascii_chars, other_chars) > limit:
            return words[:i]
    return words


class Meter:
    """Counts a stream's output into its bill as the chunks are sent (and applies the billing
    action of an event that is no text: a server tool's result)."""

    def __init__(self, bill: Bill, billing: Billing) -> None:
        self.bill = bill
        self.billing = billing
        self.ascii_chars = 0
        self.other_chars = 0

    def sent(self, text: str | Callable[[Bill], None]) -> None:
        if callable(text):
            text(self.bill)
            return
        if self.billing == "words":
            self.bill.completion_tokens += 1
            return
        more_ascii, more_other = _char_counts(text)
        self.ascii_chars += more_ascii
        self.other_chars += more_other
        self.bill.completion_tokens = _tokenizer_count(self.ascii_chars, self.other_chars)
