"""Reconciliation: what the broker charges for a provider's answer is what the provider bills.

Each case replays one recorded provider answer (``tests/data/recorded/``, served by
:mod:`tests.recorded_provider`) to a request made through the broker with the provider's official
SDK, at the prices of the reference table ``config/prices.toml``. The expected charge is worked
out here, apart from the broker, from the recording's own usage fields and each provider's
published arithmetic (written out below with plain fractions), rounded up once to a whole
micro-dollar; the usage event, the ``x-broker-cost-micros`` header and the token's slice must
all show exactly that.

Prices are dollars per million tokens, so ``tokens * price`` is in micro-dollars.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import anthropic
import openai
import pytest
from anthropic.types import Message as AnthropicMessage
from anthropic.types import MessageParam, RawMessageStreamEvent, TextBlockParam, ToolUnionParam
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam
from openai.types.responses import Response, ResponseStreamEvent, ToolParam
from pydantic import TypeAdapter

from broker.settings import ModelSettings
from broker.settings.agents import ToolSettings
from tests.conftest import Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import Env, make_env
from tests.recorded_provider import RecordedProviderServer, recording, sse_events

PRICES: dict[str, Any] = tomllib.loads(
    (Path(__file__).parent.parent / "config" / "prices.toml").read_text())
BUDGET = 20_000_000  # $20: the hold of a web search with its result ceilings fits in it

# --- the providers' published prices (dollars per million tokens) -----------------------------
# https://platform.openai.com/docs/pricing: input, cached input, output.
OPENAI_LIST: dict[str, tuple[Fraction, Fraction, Fraction]] = {
    "gpt-4.1": (Fraction("2.00"), Fraction("0.50"), Fraction("8.00")),
    "gpt-4.1-mini": (Fraction("0.40"), Fraction("0.10"), Fraction("1.60")),
    "gpt-4o-mini": (Fraction("0.15"), Fraction("0.075"), Fraction("0.60")),
    "o4-mini": (Fraction("1.10"), Fraction("0.275"), Fraction("4.40")),
    "gpt-5": (Fraction("1.25"), Fraction("0.125"), Fraction("10.00")),
    "gpt-5-mini": (Fraction("0.25"), Fraction("0.025"), Fraction("2.00")),
}
# https://docs.anthropic.com/en/docs/about-claude/pricing: base input, 5-minute cache write,
# cache hit (read), output. A 1-hour cache write is 2x the base input price.
ANTHROPIC_LIST: dict[str, tuple[Fraction, Fraction, Fraction, Fraction]] = {
    "claude-sonnet-4-5": (Fraction("3"), Fraction("3.75"), Fraction("0.30"), Fraction("15")),
    "claude-haiku-4-5": (Fraction("1"), Fraction("1.25"), Fraction("0.10"), Fraction("5")),
    "claude-opus-4-1": (Fraction("15"), Fraction("18.75"), Fraction("1.50"), Fraction("75")),
    "claude-3-5-haiku": (Fraction("0.80"), Fraction("1"), Fraction("0.08"), Fraction("4")),
}
# Web search, both providers: $10 per 1,000 searches, in micro-dollars per search.
SEARCH_MICROS = Fraction(10, 1000) * 1_000_000


# --- the cases -----------------------------------------------------------------------------------

Api = Literal["chat", "responses", "messages"]
Ttl = Literal["5m", "1h"] | None


@dataclass(frozen=True)
class Segment:
    """A part of the request's prompt: ``tokens`` worth of text (4 ASCII bytes per token, as
    English runs, so the broker's byte-based input bound covers at least ``tokens``), marked
    for the Anthropic prompt cache with ``ttl``."""

    tokens: int
    ttl: Ttl = None


@dataclass(frozen=True)
class Case:
    recording: str  # the file under tests/data/recorded/: the broker model's upstream_model
    api: Api
    model: str  # its prices: config/prices.toml and the published list above
    stream: bool
    # The prompt: OpenAI: a system/instructions text and the question; Anthropic: the system
    # block and the user's content blocks. Cached parts come first, as the providers cache
    # prefixes.
    prompt: tuple[Segment, ...]
    web_search: bool = False
    expected_micros: int = 0  # the charge worked out by hand, for the reader; checked below


CASES = [
    Case("chat-cached", "chat", "gpt-4.1-mini", False, (Segment(3840), Segment(972)),
         expected_micros=1071),
    Case("chat-cached-stream", "chat", "gpt-4o-mini", True, (Segment(2944), Segment(673)),
         expected_micros=406),
    Case("responses-reasoning", "responses", "o4-mini", False, (Segment(4992), Segment(1239)),
         expected_micros=6441),
    Case("responses-reasoning-stream", "responses", "gpt-5-mini", True,
         (Segment(4864), Segment(542)), expected_micros=2440),
    # A web search request's own text is ~2,000 tokens; the rest of the input it is billed is
    # the search results, which the hold covers with tools.web_search.result_tokens_per_call
    # for each of the searches it allows (tools.web_search.default_max_calls, or max_uses).
    Case("responses-web-search", "responses", "gpt-5", False, (Segment(400), Segment(1600)),
         web_search=True, expected_micros=52012),
    Case("messages-cache", "messages", "claude-sonnet-4-5", False,
         (Segment(6412, "5m"), Segment(1893, "5m"), Segment(347)), expected_micros=14009),
    Case("messages-cache-stream", "messages", "claude-haiku-4-5", True,
         (Segment(5632, "5m"), Segment(2210, "5m"), Segment(128)), expected_micros=4549),
    # One-hour writes (2x input) next to five-minute ones; the stream's final message_delta
    # repeats the input counts without their split by TTL, which only message_start carries.
    Case("messages-cache-1h", "messages", "claude-opus-4-1", False,
         (Segment(5874, "1h"), Segment(1435, "5m"), Segment(52)), expected_micros=227757),
    Case("messages-cache-1h-stream", "messages", "claude-3-5-haiku", True,
         (Segment(4418, "1h"), Segment(1276, "1h"), Segment(23)), expected_micros=3042),
    Case("messages-web-search", "messages", "claude-sonnet-4-5", False,
         (Segment(500), Segment(1900)), web_search=True, expected_micros=134481),
    Case("messages-web-search-stream", "messages", "claude-haiku-4-5", True,
         (Segment(500), Segment(1900)), web_search=True, expected_micros=40973),
]


# --- reading a recording as the provider's invoice reads it ---------------------------------------


@dataclass(frozen=True)
class Bill:
    """One call's billed usage, by the provider's own token classes.

    OpenAI: ``input`` counts every input token, ``cached`` of them at the cached price.
    Anthropic: ``input`` counts only the uncached input; cache reads (``cached``) and writes
    are counted apart, each at its price."""

    provider: Literal["openai", "anthropic"]
    input: int
    output: int
    cached: int = 0
    write_5m: int = 0
    write_1h: int = 0
    searches: int = 0

    @property
    def prompt_tokens(self) -> int:
        """Every input token, as the broker records it."""
        if self.provider == "openai":
            return self.input
        return self.input + self.cached + self.write_5m + self.write_1h


def sse(raw: bytes) -> Iterator[tuple[str | None, str]]:
    """(event name, data) of each event of a capture."""
    for event in sse_events(raw):
        name, data = None, []
        for line in event.decode().splitlines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data.append(line.removeprefix("data: "))
        yield name, "\n".join(data)


def recorded(case: Case) -> bytes:
    return recording(case.recording, stream=case.stream).read_bytes()


def read_chat(case: Case) -> Bill:
    if case.stream:
        chunks = [json.loads(data) for _, data in sse(recorded(case)) if data != "[DONE]"]
        usage = [c["usage"] for c in chunks if c.get("usage")][-1]
    else:
        usage = json.loads(recorded(case))["usage"]
    return Bill("openai", usage["prompt_tokens"], usage["completion_tokens"],
                cached=usage["prompt_tokens_details"]["cached_tokens"])


def read_responses(case: Case) -> Bill:
    if case.stream:
        [response] = [json.loads(data)["response"] for name, data in sse(recorded(case))
                      if name == "response.completed"]
    else:
        response = json.loads(recorded(case))
    usage = response["usage"]
    # Reasoning tokens are output tokens, already inside output_tokens.
    assert usage["output_tokens_details"]["reasoning_tokens"] <= usage["output_tokens"]
    searches = sum(1 for item in response["output"]
                   if item["type"] == "web_search_call" and item["action"]["type"] == "search")
    if "tool_usage" in response:  # the provider's own count of billable searches agrees
        assert response["tool_usage"]["web_search"]["num_requests"] == searches
    return Bill("openai", usage["input_tokens"], usage["output_tokens"],
                cached=usage["input_tokens_details"]["cached_tokens"], searches=searches)


def read_messages(case: Case) -> Bill:
    if case.stream:
        # message_start carries the input side; each message_delta's counts are cumulative
        # and replace the earlier ones.
        usage: dict[str, Any] = {}
        for name, data in sse(recorded(case)):
            if name == "message_start":
                usage.update(json.loads(data)["message"]["usage"])
            elif name == "message_delta":
                usage.update(json.loads(data)["usage"])
    else:
        usage = json.loads(recorded(case))["usage"]
    split = usage.get("cache_creation") or {}
    hour, five = split.get("ephemeral_1h_input_tokens", 0), split.get("ephemeral_5m_input_tokens", 0)
    assert five + hour == usage.get("cache_creation_input_tokens", 0)
    searches = (usage.get("server_tool_use") or {}).get("web_search_requests", 0)
    return Bill("anthropic", usage["input_tokens"], usage["output_tokens"],
                cached=usage.get("cache_read_input_tokens", 0), write_5m=five, write_1h=hour,
                searches=searches)


READERS: dict[Api, Callable[[Case], Bill]] = {
    "chat": read_chat, "responses": read_responses, "messages": read_messages}


# --- the providers' arithmetic --------------------------------------------------------------------


def openai_invoice(bill: Bill, model: str) -> Fraction:
    """(input - cached) x input + cached x cached input + output x output (reasoning inside
    output), plus each web search."""
    price_in, price_cached, price_out = OPENAI_LIST[model]
    return ((bill.input - bill.cached) * price_in + bill.cached * price_cached
            + bill.output * price_out + bill.searches * SEARCH_MICROS)


def anthropic_invoice(bill: Bill, model: str) -> Fraction:
    """input x base + 5-minute writes x write + 1-hour writes x 2 x base + reads x read +
    output x output, plus each web search. ``input_tokens`` excludes every cache token."""
    base, write, read, price_out = ANTHROPIC_LIST[model]
    return (bill.input * base + bill.write_5m * write + bill.write_1h * 2 * base
            + bill.cached * read + bill.output * price_out + bill.searches * SEARCH_MICROS)


def expected_charge(case: Case) -> tuple[Bill, int]:
    """The bill, and what it costs rounded up once to a whole micro-dollar."""
    bill = READERS[case.api](case)
    exact = openai_invoice(bill, case.model) if bill.provider == "openai" else \
        anthropic_invoice(bill, case.model)
    return bill, math.ceil(exact)


# --- the request ------------------------------------------------------------------------------------

_PROSE = (
    "Section {n}. Operators keep the runbook current: every alert names its owner, the "
    "dashboard that explains it and the first three commands to run. Changes to production go "
    "through review, are deployed in small batches and can be rolled back within five minutes. "
    "Customer data is read only through audited tools, and any export needs a ticket that "
    "names its purpose and its expiry. Incidents are written up within two working days, "
    "without blame, with the timeline, the impact and the follow-ups that prevent a repeat. "
)


def prose(tokens: int, seed: int) -> str:
    """``4 * tokens`` bytes of ASCII text."""
    text, n = "", seed * 1000
    while len(text) < 4 * tokens:
        text += _PROSE.format(n=n)
        n += 1
    return text[:4 * tokens]


def texts(case: Case) -> list[str]:
    return [prose(s.tokens, i) for i, s in enumerate(case.prompt)]


def call_chat(api: openai.OpenAI, case: Case) -> tuple[int | None, Bill, bytes | None]:
    system, question = texts(case)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": system}, {"role": "user", "content": question}]
    if case.stream:
        with api.chat.completions.create(model=case.recording, messages=messages,
                                         max_completion_tokens=1024, stream=True,
                                         stream_options={"include_usage": True}) as stream:
            chunks: list[ChatCompletionChunk] = list(stream)
        usage = chunks[-1].usage
        assert usage is not None and chunks[-1].choices == []
        header, body = None, None
    else:
        raw = api.chat.completions.with_raw_response.create(
            model=case.recording, messages=messages, max_completion_tokens=1024)
        completion: ChatCompletion = raw.parse()
        assert completion.usage is not None
        usage, header, body = completion.usage, int(raw.headers["x-broker-cost-micros"]), \
            raw.content
    details = usage.prompt_tokens_details
    return header, Bill("openai", usage.prompt_tokens, usage.completion_tokens,
                        cached=(details.cached_tokens or 0) if details else 0), body


def call_responses(api: openai.OpenAI, case: Case) -> tuple[int | None, Bill, bytes | None]:
    instructions, question = texts(case)
    tools: list[ToolParam] = [{"type": "web_search"}] if case.web_search else []
    if case.stream:
        with api.responses.create(model=case.recording, instructions=instructions,
                                  input=question, max_output_tokens=4096, tools=tools,
                                  reasoning={"effort": "medium"}, stream=True) as stream:
            events: list[ResponseStreamEvent] = list(stream)
        assert events[-1].type == "response.completed"
        response, header, body = events[-1].response, None, None
    else:
        raw = api.responses.with_raw_response.create(
            model=case.recording, instructions=instructions, input=question,
            max_output_tokens=4096, tools=tools, reasoning={"effort": "medium"})
        response = raw.parse()
        header, body = int(raw.headers["x-broker-cost-micros"]), raw.content
    usage = response.usage
    assert usage is not None and response.status == "completed"
    searches = sum(1 for item in response.output if item.type == "web_search_call")
    return header, Bill("openai", usage.input_tokens, usage.output_tokens,
                        cached=usage.input_tokens_details.cached_tokens,
                        searches=searches), body


def call_messages(api: anthropic.Anthropic, case: Case) -> tuple[int | None, Bill, bytes | None]:
    blocks: list[TextBlockParam] = []
    for segment, text in zip(case.prompt, texts(case), strict=True):
        block: TextBlockParam = {"type": "text", "text": text}
        if segment.ttl == "1h":
            block["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
        elif segment.ttl == "5m":
            block["cache_control"] = {"type": "ephemeral"}
        blocks.append(block)
    system, content = blocks[:1], blocks[1:]
    messages: list[MessageParam] = [{"role": "user", "content": content}]
    tools: list[ToolUnionParam] = [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
    ] if case.web_search else []
    if case.stream:
        with api.messages.stream(model=case.recording, system=system, messages=messages,
                                 max_tokens=1024, tools=tools) as stream:
            for _ in stream:
                pass
            message: AnthropicMessage = stream.get_final_message()
        header, body = None, None
    else:
        raw = api.messages.with_raw_response.create(model=case.recording, system=system,
                                                    messages=messages, max_tokens=1024,
                                                    tools=tools)
        message = raw.parse()
        header, body = int(raw.headers["x-broker-cost-micros"]), raw.read()
    usage = message.usage
    split = usage.cache_creation
    hour = split.ephemeral_1h_input_tokens if split is not None else 0
    searches = usage.server_tool_use.web_search_requests if usage.server_tool_use else 0
    return header, Bill("anthropic", usage.input_tokens, usage.output_tokens,
                        cached=usage.cache_read_input_tokens or 0,
                        write_5m=(usage.cache_creation_input_tokens or 0) - hour,
                        write_1h=hour, searches=searches), body


# --- the broker in front of the recordings -------------------------------------------------------


@pytest.fixture
def recorded_provider() -> Iterator[RecordedProviderServer]:
    with RecordedProviderServer() as server:
        yield server


@pytest.fixture
def env(make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
        recorded_provider: RecordedProviderServer) -> Env:
    """A live broker whose real ``openai`` and ``anthropic`` provider plugins point at the
    recordings, with their key in Vault, and one model per recording at the reference prices."""

    def adjust(sections: dict[str, dict[str, Any]]) -> None:
        vault_path = sections["providers"]["fake-openai"]["vault_path"]
        sections["providers"]["openai"] = {"base_url": recorded_provider.url + "/v1",
                                           "vault_path": vault_path}
        sections["providers"]["anthropic"] = {"base_url": recorded_provider.url,
                                              "vault_path": vault_path}
        for case in CASES:
            sections["models"][case.recording] = {**PRICES["models"][case.model],
                                                  "upstream_model": case.recording}
        sections["tools"] = PRICES["tools"]

    return make_env(make_live_broker, sqlite_url, fake, adjust=adjust)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.recording)
def test_the_charge_is_the_providers_arithmetic(
        case: Case, env: Env, recorded_provider: RecordedProviderServer) -> None:
    bill, expected = expected_charge(case)
    assert expected == case.expected_micros
    if not case.web_search:  # the request's own text bounds every input token it is billed
        assert sum(len(t.encode()) for t in texts(case)) >= bill.prompt_tokens
    agent = env.agent(BUDGET, models=[c.recording for c in CASES],
                      tools=["function", "web_search"])
    token = env.broker.token(agent["client_id"], agent["client_secret"])

    if case.api == "messages":
        claude = env.broker.opened(anthropic.Anthropic(base_url=env.broker.url, api_key=token,
                                                       max_retries=0))
        header, seen, body = call_messages(claude, case)
    else:
        gpt = env.broker.opened(openai.OpenAI(base_url=f"{env.broker.url}/v1", api_key=token,
                                              max_retries=0))
        header, seen, body = (call_chat if case.api == "chat" else call_responses)(gpt, case)

    # The provider got the request, with the key from Vault, and the client got its answer
    # as the provider sent it.
    [received] = recorded_provider.received
    assert (received.body["model"], received.body.get("stream") is True) == (case.recording,
                                                                            case.stream)
    assert received.api_key == env.key
    assert seen == bill
    if body is not None:
        assert body == recorded(case)

    [event] = env.wait_for_events(1)
    assert event["cost_micros"] == expected, (
        f"{case.recording}: the broker charged {event['cost_micros']} micro-dollars, the "
        f"provider bills {expected}")
    if header is not None:
        assert header == expected
    assert (event["prompt_tokens"], event["completion_tokens"]) == (bill.prompt_tokens,
                                                                    bill.output)
    assert (event["status"], event["estimated"], event["stream"]) == ("ok", 0, case.stream)
    calls = json.loads(event["tool_calls"] or "{}")
    assert calls == ({"web_search": bill.searches} if bill.searches else {})
    assert env.slice_of(token)["spent_micros"] == expected


# --- the reference table and the recordings themselves ---------------------------------------------


def test_the_reference_table_is_the_published_list() -> None:
    models, tools = PRICES["models"], PRICES["tools"]
    assert set(models) == set(OPENAI_LIST) | set(ANTHROPIC_LIST)
    for name, table in models.items():
        ModelSettings.model_validate(table)  # pastes into broker.toml as it is
        assert table["batch_discount_percent"] == 50
        assert table["upstream_model"].startswith(name)
        if name in OPENAI_LIST:
            price_in, price_cached, price_out = OPENAI_LIST[name]
            price_write = price_in  # OpenAI adds nothing for writing its cache
            assert table["provider"] == "openai"
        else:
            price_in, price_write, price_cached, price_out = ANTHROPIC_LIST[name]
            assert table["provider"] == "anthropic"
        assert (table["input_micros_per_mtok"], table["cached_input_micros_per_mtok"],
                table["cache_write_micros_per_mtok"], table["output_micros_per_mtok"]) == (
            price_in * 1_000_000, price_cached * 1_000_000, price_write * 1_000_000,
            price_out * 1_000_000)
    for tool in tools.values():
        ToolSettings.model_validate(tool)
    assert tools["web_search"]["micros_per_call"] == SEARCH_MICROS == 10_000
    assert (tools["web_search"]["default_max_calls"],
            tools["web_search"]["result_tokens_per_call"]) == (5, 50_000)
    assert tools["web_fetch"]["micros_per_call"] == 0


_CHAT = TypeAdapter(ChatCompletion)
_CHUNK = TypeAdapter(ChatCompletionChunk)
_RESPONSE = TypeAdapter(Response)
_RESPONSE_EVENT: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)
_MESSAGE = TypeAdapter(AnthropicMessage)
_MESSAGE_EVENT: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.recording)
def test_each_recording_is_what_the_official_sdk_reads(case: Case) -> None:
    """Every body and event validates strictly against the SDK's types, and a stream is framed
    as its provider frames it."""
    raw = recorded(case)
    assert raw.endswith(b"\n\n" if case.stream else b"\n")
    if not case.stream:
        body: dict[Api, TypeAdapter[Any]] = {"chat": _CHAT, "responses": _RESPONSE,
                                             "messages": _MESSAGE}
        body[case.api].validate_json(raw)
        return
    events = list(sse(raw))
    if case.api == "chat":
        assert all(name is None for name, _ in events) and events[-1][1] == "[DONE]"
        for _, data in events[:-1]:
            _CHUNK.validate_json(data)
        return
    for name, data in events:
        if name == "ping":
            assert json.loads(data) == {"type": "ping"}
            continue
        adapter: TypeAdapter[Any] = _RESPONSE_EVENT if case.api == "responses" else _MESSAGE_EVENT
        assert adapter.validate_json(data).type == name
    first, last = events[0][0], events[-1][0]
    assert (first, last) == (("response.created", "response.completed")
                             if case.api == "responses" else ("message_start", "message_stop"))
