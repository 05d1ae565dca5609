"""Server-side tools on the fake provider (`plugins.mock_server_tools`, and the Responses API's web
search in `plugins.mock_responses`), driven by the official SDKs: the blocks and events they
parse, `usage.server_tool_use`, and the results billed as input, as the real providers do.

Token rules as in `plugins.mock_upstream` ("words" billing): the prompt "latest news" is 3 tokens
(the tools' definitions count nothing), the answer 16 words; each search or fetch adds
`faults.search_result_tokens` (100 by default) input tokens.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent, ServerToolUseBlock

from plugins.mock_billing import Bill
from tests.fake_provider import FakeProviderServer, fresh
from tests.sdk_support import Sdks
from tests.support import wait_for

PROMPT = "latest news"  # 3 tokens
SEARCH = {"type": "web_search_20250305", "name": "web_search"}
FETCH = {"type": "web_fetch_20250910", "name": "web_fetch"}


@pytest.fixture
def fake(module_fake: FakeProviderServer) -> FakeProviderServer:
    return fresh(module_fake)


def request(*tools: dict[str, Any], text: str = PROMPT, **extra: Any) -> dict[str, Any]:
    return {"model": "claude-test", "max_tokens": 50, "messages": [{"role": "user", "content": text}],
            "tools": list(tools), **extra}


def create(sdk: Sdks, fake: FakeProviderServer, body: dict[str, Any]) -> Message:
    """The message, also validated strictly (pydantic, not the SDK's lenient parsing)."""
    raw = httpx.post(f"{fake.url}/v1/messages", headers={"x-api-key": "k"}, json=body)
    assert raw.status_code == 200, raw.text
    Message.model_validate(raw.json())
    message: Message = sdk.anthropic(fake.url, "sk-ant-test").messages.create(**body)
    return message


def raw_events(fake: FakeProviderServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The data of each SSE event of a messages stream, each validated strictly."""
    with httpx.stream("POST", f"{fake.url}/v1/messages", headers={"x-api-key": "k"},
                      json={**body, "stream": True}) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    adapter: pydantic.TypeAdapter[RawMessageStreamEvent] = pydantic.TypeAdapter(RawMessageStreamEvent)
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        if event["type"] != "ping":
            adapter.validate_python(event)
        events.append(event)
    return events


def ended_bills(fake: FakeProviderServer, count: int = 1) -> list[Bill]:
    wait_for(lambda: len(fake.state.bills) == count and all(b.ended for b in fake.state.bills),
             what=lambda: f"{count} ended bills (bills: {fake.state.bills})")
    return fake.state.bills


# --- Anthropic: web search --------------------------------------------------------------------


@pytest.mark.parametrize(("searches", "max_uses", "expected"),
                         [(1, None, 1), (3, None, 3), (5, 2, 2), (2, 5, 2), (0, None, 0)])
def test_web_searches_come_before_the_answer_and_their_results_are_input(
    fake: FakeProviderServer, searches: int, max_uses: int | None, expected: int, sdk: Sdks
) -> None:
    fake.state.faults.web_searches = searches
    tool = SEARCH if max_uses is None else {**SEARCH, "max_uses": max_uses}
    message = create(sdk, fake, request(tool))
    assert [block.type for block in message.content] == (
        ["server_tool_use", "web_search_tool_result"] * expected + ["text"])
    uses, results = message.content[:-1:2], message.content[1:-1:2]
    for number, (use, result) in enumerate(zip(uses, results, strict=True), start=1):
        assert use.type == "server_tool_use" and result.type == "web_search_tool_result"
        assert use.id.startswith("srvtoolu_") and result.tool_use_id == use.id
        assert use.name == "web_search"
        assert use.input == {"query": PROMPT if expected == 1 else f"{PROMPT} ({number})"}
        assert isinstance(result.content, list) and len(result.content) == 2
        assert all(r.url.startswith("https://") and r.encrypted_content and r.title and r.page_age
                   for r in result.content)
    assert message.content[-1].type == "text"
    assert message.content[-1].text == " ".join(f"w{i}" for i in range(16))  # the usual answer
    assert message.usage.input_tokens == 3 + 100 * expected
    assert message.usage.output_tokens == 16  # the calls cost no output here
    if expected:
        assert message.usage.server_tool_use is not None
        assert message.usage.server_tool_use.model_dump() == {"web_search_requests": expected,
                                                              "web_fetch_requests": 0}
    else:
        assert message.usage.server_tool_use is None
    bill = Bill("messages", "claude-test", False, prompt_tokens=3 + 100 * expected,
                completion_tokens=16, web_search_calls=expected, complete=True, ended=True)
    assert fake.state.bills == [bill, bill]
    # The provider's invoice for tokens: $1 in, $2 out per million; the search fees are apart.
    assert fake.state.total_billed(1_000_000, 2_000_000) == 2 * (3 + 100 * expected + 32)


def test_web_fetches_read_the_message_urls_in_turn(fake: FakeProviderServer, sdk: Sdks) -> None:
    fake.state.faults.web_fetches = 3
    fake.state.faults.search_result_tokens = 7
    text = "compare https://a.example/one and http://b.example/two?x=1"  # 15 tokens
    message = create(sdk, fake, request(FETCH, text=text))
    fetches = [block for block in message.content if block.type == "server_tool_use"]
    assert [use.input for use in fetches] == [{"url": "https://a.example/one"},
                                              {"url": "http://b.example/two?x=1"},
                                              {"url": "https://a.example/one"}]
    results = [block for block in message.content if block.type == "web_fetch_tool_result"]
    assert [result.tool_use_id for result in results] == [use.id for use in fetches]
    page = results[0].content
    assert page.type == "web_fetch_result" and page.url == "https://a.example/one"
    assert page.content.source.type == "text" and "https://a.example/one" in page.content.source.data
    assert message.usage.input_tokens == 15 + 3 * 7
    assert message.usage.server_tool_use is not None
    assert message.usage.server_tool_use.model_dump() == {"web_search_requests": 0,
                                                          "web_fetch_requests": 3}
    assert (fake.state.bills[0].web_fetch_calls, fake.state.bills[0].prompt_tokens) == (3, 36)


def test_a_fetched_page_costs_at_most_the_tools_max_content_tokens(
    fake: FakeProviderServer, sdk: Sdks
) -> None:
    fake.state.faults.web_fetches = 2
    message = create(sdk, fake, request({**FETCH, "max_content_tokens": 40}, SEARCH))
    assert message.usage.input_tokens == 3 + 100 + 2 * 40
    assert fake.state.bills[0].prompt_tokens == 3 + 100 + 2 * 40


def test_searches_then_fetches_within_max_uses(fake: FakeProviderServer, sdk: Sdks) -> None:
    fake.state.faults.web_searches = 2
    fake.state.faults.web_fetches = 4
    message = create(sdk, fake, request({**FETCH, "max_uses": 1}, SEARCH, text="no link here"))
    assert [(b.name, b.input) for b in message.content if isinstance(b, ServerToolUseBlock)] == [
        ("web_search", {"query": "no link here (1)"}), ("web_search", {"query": "no link here (2)"}),
        ("web_fetch", {"url": "https://example.com/"})]
    assert message.usage.server_tool_use is not None
    assert (message.usage.server_tool_use.web_search_requests,
            message.usage.server_tool_use.web_fetch_requests) == (2, 1)
    bill = fake.state.bills[0]
    assert (bill.web_search_calls, bill.web_fetch_calls, bill.prompt_tokens) == (2, 1, 3 + 300)


@pytest.mark.parametrize("body", [
    pytest.param(request(SEARCH, tool_choice={"type": "none"}), id="tool-choice-none"),
    pytest.param(request({"name": "lookup", "input_schema": {"type": "object"}}), id="client-tool"),
    pytest.param(request(), id="no-tools"),
])
def test_no_server_tool_no_call_and_the_usage_as_before(
    fake: FakeProviderServer, body: dict[str, Any]
) -> None:
    raw = httpx.post(f"{fake.url}/v1/messages", headers={"x-api-key": "k"}, json=body).json()
    assert [block["type"] for block in raw["content"]] == ["text"]
    assert raw["usage"] == {"input_tokens": 3, "output_tokens": 16}
    delta = raw_events(fake, body)[-2]
    assert delta["type"] == "message_delta" and delta["usage"] == {"output_tokens": 16}
    assert all(b.web_search_calls == b.web_fetch_calls == 0 for b in ended_bills(fake, 2))


def test_cache_fields_stay_and_the_results_are_plain_input(fake: FakeProviderServer, sdk: Sdks) -> None:
    cached = {"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}
    body = request(SEARCH, system=[cached])
    usage = create(sdk, fake, body).usage  # the prompt (3 + 2) is all a cache write
    assert (usage.input_tokens, usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (
        100, 5, 0)
    final = raw_events(fake, body)[-2]["usage"]
    assert final == {"input_tokens": 100, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 0,
                     "output_tokens": 16,
                     "server_tool_use": {"web_search_requests": 1, "web_fetch_requests": 0}}
    assert [(b.prompt_tokens, b.cache_write_tokens) for b in ended_bills(fake, 3)] == [(100, 5)] * 3


# --- Anthropic: streams -----------------------------------------------------------------------


def test_a_stream_sends_each_call_as_blocks_then_the_cumulative_usage(
    fake: FakeProviderServer, sdk: Sdks
) -> None:
    fake.state.faults.web_searches = 2
    body = request({**SEARCH, "max_uses": 5}, FETCH, text="see https://a.example/x")  # 6 tokens
    events = raw_events(fake, body)
    shape = [(e["type"], e.get("index"), e.get("content_block", e.get("delta", {})).get("type"))
             for e in events]
    call = [("content_block_start", "server_tool_use"), ("content_block_delta", "input_json_delta"),
            ("content_block_stop", None)]
    expected: list[tuple[str, int | None, str | None]] = [("message_start", None, None)]
    for number, result in enumerate(["web_search_tool_result"] * 2 + ["web_fetch_tool_result"]):
        expected += [(kind, 2 * number, block) for kind, block in call]
        expected += [("content_block_start", 2 * number + 1, result),
                     ("content_block_stop", 2 * number + 1, None)]
    expected += [("content_block_start", 6, "text"), ("ping", None, None)]
    expected += [("content_block_delta", 6, "text_delta")] * 16
    expected += [("content_block_stop", 6, None), ("message_delta", None, None), ("message_stop", None, None)]
    assert shape == expected
    start = events[0]["message"]
    assert start["usage"] == {"input_tokens": 6, "output_tokens": 1}  # the prompt alone
    assert events[1]["content_block"]["input"] == {}  # the input comes as JSON deltas
    assert json.loads(events[2]["delta"]["partial_json"]) == {"query": "see https://a.example/x (1)"}
    assert events[-2]["usage"] == {"input_tokens": 306, "output_tokens": 16, "server_tool_use": {
        "web_search_requests": 2, "web_fetch_requests": 1}}

    with sdk.anthropic(fake.url, "sk-ant-test").messages.stream(**body) as stream:
        final = stream.get_final_message()
    whole = create(sdk, fake, body)
    assert [b.type for b in final.content] == [b.type for b in whole.content]
    assert [b.input for b in final.content if b.type == "server_tool_use"] == [
        b.input for b in whole.content if b.type == "server_tool_use"]
    assert final.usage.model_dump() == whole.usage.model_dump()
    assert final.usage.input_tokens == 306
    streamed = Bill("messages", "claude-test", True, prompt_tokens=306, completion_tokens=16,
                    web_search_calls=2, web_fetch_calls=1, complete=True, ended=True)
    whole_bill = dataclasses.replace(streamed, stream=False)
    assert ended_bills(fake, 4) == [streamed, streamed, whole_bill, whole_bill]  # create() asks twice


@pytest.mark.parametrize(("events", "calls"), [(1, 0), (5, 0), (6, 1), (10, 1), (11, 2)])
def test_a_cut_stream_bills_the_results_it_sent(
    fake: FakeProviderServer, events: int, calls: int
) -> None:
    """message_start, then 5 events a search; a search is billed once its result block stops."""
    fake.state.faults.web_searches = 2
    fake.state.faults.cut_after_chunks = events
    with pytest.raises(httpx.RemoteProtocolError):
        raw_events(fake, request(SEARCH))
    [bill] = ended_bills(fake)
    assert (bill.web_search_calls, bill.prompt_tokens, bill.completion_tokens) == (calls, 3 + 100 * calls, 0)
    assert not bill.complete


# --- OpenAI Responses: web search results are input too ----------------------------------------


def test_responses_bill_each_web_search_result_as_input(fake: FakeProviderServer, sdk: Sdks) -> None:
    fake.state.faults.web_searches = 2
    fake.state.faults.cache_read_tokens = 1_000  # the results are never cache reads
    client = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    response = client.responses.create(model="gpt-test", input=PROMPT, tools=[{"type": "web_search"}])
    assert [item.type for item in response.output] == ["web_search_call"] * 2 + ["message"]
    assert response.usage is not None
    assert response.usage.input_tokens == 3 + 200
    assert response.usage.input_tokens_details.cached_tokens == 3
    assert fake.state.bills == [Bill("responses", "gpt-test", False, prompt_tokens=200, completion_tokens=16,
                                     cache_read_tokens=3, web_search_calls=2, complete=True, ended=True)]
    # A continued conversation carries the whole input, results included.
    fake.state.faults.cache_read_tokens = 0
    follow = client.responses.create(model="gpt-test", input="more", previous_response_id=response.id)
    assert follow.usage is not None and follow.usage.input_tokens == 1 + 203 + 16

    fake.state.faults.search_result_tokens = 0
    plain = client.responses.create(model="gpt-test", input=PROMPT, tools=[{"type": "web_search"}])
    assert plain.usage is not None and plain.usage.input_tokens == 3


@pytest.mark.parametrize(("events", "searches"), [(2, 0), (6, 0), (7, 1), (12, 2), (None, 2)])
def test_a_responses_stream_bills_each_search_once_its_item_is_done(
    fake: FakeProviderServer, events: int | None, searches: int
) -> None:
    """created, in_progress, then per search: added, in_progress, searching, completed, done."""
    fake.state.faults.web_searches = 2
    fake.state.faults.cut_after_chunks = events
    body = {"model": "gpt-test", "input": PROMPT, "tools": [{"type": "web_search"}], "stream": True}
    with httpx.stream("POST", f"{fake.url}/v1/responses", headers={"authorization": "Bearer k"},
                      json=body) as response:
        if events is None:
            text = "".join(response.iter_text())
            final = json.loads(text.strip().split("\n\n")[-1].split("\n")[1].removeprefix("data: "))
            assert final["response"]["usage"]["input_tokens"] == 203
        else:
            with pytest.raises(httpx.RemoteProtocolError):
                "".join(response.iter_text())
    [bill] = ended_bills(fake)
    assert (bill.web_search_calls, bill.prompt_tokens) == (searches, 3 + 100 * searches)
    assert bill.complete == (events is None)
