"""The fake provider's Responses API and Anthropic token counting (`plugins.mock_responses`): the
official SDKs, pointed straight at the fake, must accept everything it says.

Token rules as in the module's doc. By default ("words" billing) input = sum of ceil(len/4) over
instructions, input texts and function tools' name/description/compact parameters (at least 1);
output = one token per word "w0 w1 ..." (16 unless the limit cuts), plus 8 reasoning tokens for
a reasoning request.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import httpx2
import openai
import pydantic
import pytest
from openai.types.responses import (
    FunctionToolParam,
    Response,
    ResponseFunctionToolCall,
    ResponseStreamEvent,
)

from plugins.mock_billing import Bill, count_tokens, tokenizer_tokens
from plugins.mock_responses import responses_texts
from tests.fake_provider import FakeProviderServer, fresh
from tests.sdk_support import Sdks
from tests.support import wait_for

SIXTEEN_WORDS = " ".join(f"w{i}" for i in range(16))
WEATHER: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "metric": {"type": "boolean"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "note": {"type": "string"},
        },
        "required": ["city", "days", "metric", "unit"],
        "additionalProperties": False,
    },
    "strict": False,
}
WEATHER_ARGUMENTS = {"city": "mock", "days": 1, "metric": True, "unit": "celsius"}


@pytest.fixture
def fake(module_fake: FakeProviderServer) -> FakeProviderServer:
    return fresh(module_fake)


def post(fake: FakeProviderServer, body: dict[str, Any], path: str = "/v1/responses") -> httpx.Response:
    return httpx.post(f"{fake.url}{path}", headers={"authorization": "Bearer k"}, json=body)


def raw_events(fake: FakeProviderServer, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each SSE event of a stream read to its end; every event must have
    both lines (so a `data: [DONE]`, which the Responses API never sends, fails it)."""
    with httpx.stream("POST", f"{fake.url}/v1/responses", headers={"authorization": "Bearer k"},
                      json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        events.append((name[7:], json.loads(data[6:])))
    return events


def ended_bills(fake: FakeProviderServer, count: int = 1) -> list[Bill]:
    wait_for(lambda: len(fake.state.bills) == count and all(b.ended for b in fake.state.bills),
             what=lambda: f"{count} ended bills (bills: {fake.state.bills})")
    return fake.state.bills


# --- non-stream -------------------------------------------------------------------------------


def test_a_response_parses_and_counts_tokens_by_the_documented_rule(
    fake: FakeProviderServer, sdk: Sdks,
) -> None:
    response = sdk.openai(f"{fake.url}/v1", "sk-openai-test").responses.create(
        model="gpt-test",
        instructions="abcde",  # 2 tokens
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "hello world!"},  # 3
                                         {"type": "input_image", "image_url": "data:,x",
                                          "detail": "auto"}]},
            {"role": "assistant", "content": "abcd"},  # 1
        ],
        metadata={"k": "v"},
        temperature=0.5,
    )
    assert isinstance(response, Response)
    assert response.id.startswith("resp_") and response.object == "response"
    assert (response.status, response.model, response.error) == ("completed", "gpt-test", None)
    assert response.output_text == SIXTEEN_WORDS
    assert [item.type for item in response.output] == ["message"]
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (6, 16)
    assert response.usage.total_tokens == 22
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert (response.instructions, response.metadata, response.temperature) == (
        "abcde", {"k": "v"}, 0.5)
    assert response.previous_response_id is None
    assert (response.model_extra or {}).get("store") is True  # a field the SDK does not model
    assert fake.state.received_keys == ["sk-openai-test"]
    assert fake.state.bills == [Bill("responses", "gpt-test", False, prompt_tokens=6,
                                     completion_tokens=16, complete=True, ended=True)]


def test_function_tool_definitions_count_as_input(fake: FakeProviderServer) -> None:
    body: dict[str, Any] = {"model": "m", "input": "hi", "tools": [WEATHER], "tool_choice": "none"}
    parameters = json.dumps(WEATHER["parameters"], separators=(",", ":"))
    assert responses_texts(body) == ["hi", "get_weather", "The weather in a city", parameters]
    usage = post(fake, body).json()["usage"]
    assert usage["input_tokens"] == count_tokens(responses_texts(body)) == 1 + 3 + 6 + (
        -(-len(parameters) // 4))


def test_tokenizer_billing_counts_every_string_of_the_body(fake: FakeProviderServer) -> None:
    fake.state.billing = "tokenizer"
    body = {"model": "gpt-test", "input": "字字 hello", "instructions": "be brief",
            "tools": [WEATHER], "tool_choice": "none", "max_output_tokens": 4}
    response = post(fake, body).json()
    assert response["usage"]["input_tokens"] == tokenizer_tokens(body)
    assert response["output"][0]["content"][0]["text"] == "w0 w1 w2 w3"
    assert response["usage"]["output_tokens"] == 3  # 11 characters


@pytest.mark.parametrize(
    ("model", "reasoning", "limit", "reasoning_tokens", "words"),
    [
        pytest.param("gpt-test", None, 20, 0, 16, id="above-the-answer"),
        pytest.param("gpt-test", None, 16, 0, 16, id="at-the-answer"),
        pytest.param("gpt-test", None, 5, 0, 5, id="cut"),
        pytest.param("gpt-test", {"effort": "low"}, 30, 8, 16, id="reasoning-fits"),
        pytest.param("o3", None, 10, 8, 2, id="reasoning-takes-its-share"),
        pytest.param("o3", None, 8, 8, 0, id="reasoning-takes-all"),
        pytest.param("o3", None, 3, 3, 0, id="reasoning-cut"),
    ],
)
def test_max_output_tokens_bounds_the_output(
    fake: FakeProviderServer, model: str, reasoning: dict[str, Any] | None, limit: int,
    reasoning_tokens: int, words: int, sdk: Sdks,
) -> None:
    body: dict[str, Any] = {"model": model, "input": "hi", "max_output_tokens": limit}
    if reasoning is not None:
        body["reasoning"] = reasoning
    response = sdk.openai(f"{fake.url}/v1", "sk-openai-test").responses.create(**body)
    assert response.usage is not None
    assert response.usage.output_tokens == reasoning_tokens + words <= limit
    assert response.usage.output_tokens_details.reasoning_tokens == reasoning_tokens
    assert response.output_text == " ".join(f"w{i}" for i in range(words))
    cut = reasoning_tokens + words < 16 + (8 if reasoning_tokens else 0)
    assert response.status == ("incomplete" if cut else "completed")
    if cut:
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
    types = [item.type for item in response.output]
    assert types == ["reasoning"] * bool(reasoning_tokens) + ["message"] * bool(words)
    [bill] = fake.state.bills
    assert (bill.completion_tokens, bill.reasoning_tokens) == (reasoning_tokens + words,
                                                               reasoning_tokens)


def test_the_tokenizer_answer_never_exceeds_max_output_tokens(fake: FakeProviderServer) -> None:
    fake.state.billing = "tokenizer"
    fake.state.faults.answer_tokens = 500
    body = {"model": "o1", "input": "hi", "max_output_tokens": 300}
    usage = post(fake, body).json()["usage"]
    assert usage["output_tokens"] <= 300
    assert usage["output_tokens_details"]["reasoning_tokens"] == 8


def test_reasoning_is_off_for_effort_none_and_configurable(
    fake: FakeProviderServer, sdk: Sdks
) -> None:
    client = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    response = client.responses.create(model="gpt-test", input="hi", reasoning={"effort": "none"})
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens == 0
    fake.state.faults.reasoning_tokens = 30
    response = client.responses.create(model="o4-mini", input="hi",
                                       include=["reasoning.encrypted_content"], store=False)
    assert response.usage is not None and response.usage.output_tokens == 46
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content


def test_cache_reads_are_reported_inside_the_input(fake: FakeProviderServer, sdk: Sdks) -> None:
    fake.state.faults.cache_read_tokens = 3
    response = sdk.openai(f"{fake.url}/v1", "sk-openai-test").responses.create(
        model="gpt-test", input="x" * 20, max_output_tokens=1)
    assert response.usage is not None
    assert response.usage.input_tokens == 5  # the total, as OpenAI reports it
    assert response.usage.input_tokens_details.cached_tokens == 3
    [bill] = fake.state.bills
    assert (bill.prompt_tokens, bill.cache_read_tokens, bill.completion_tokens) == (2, 3, 1)
    assert fake.state.total_billed(1_000_000, 2_000_000, cache_read=100_000) == 2 + 1 + 2


def test_omit_usage_drops_the_usage(fake: FakeProviderServer, sdk: Sdks) -> None:
    fake.state.faults.omit_usage = True
    client = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    assert client.responses.create(model="m", input="hi").usage is None
    events = raw_events(fake, {"model": "m", "input": "hi"})
    assert all(data.get("response", {}).get("usage") is None for _, data in events)
    assert ended_bills(fake, 2)[1].completion_tokens == 16  # billed all the same


def test_refusals_are_in_the_openai_format_and_bill_nothing(
    fake: FakeProviderServer, sdk: Sdks
) -> None:
    assert httpx.post(f"{fake.url}/v1/responses", json={"model": "m", "input": "x"}).status_code == 401
    assert post(fake, {"input": "hi"}).status_code == 400
    bad_limit = post(fake, {"model": "m", "input": "hi", "max_output_tokens": 0})
    assert bad_limit.status_code == 400
    assert set(bad_limit.json()["error"]) == {"message", "type", "code", "param"}
    fake.state.faults.status = 500
    with pytest.raises(openai.InternalServerError):
        sdk.openai(f"{fake.url}/v1", "sk-openai-test").responses.create(model="m", input="hi")
    assert fake.state.bills == []


# --- previous_response_id ---------------------------------------------------------------------


def test_previous_response_id_bills_the_stored_conversation_again(
    fake: FakeProviderServer, sdk: Sdks
) -> None:
    client = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    first = client.responses.create(model="gpt-test", input="abcdefgh", max_output_tokens=4)
    assert first.usage is not None and (first.usage.input_tokens, first.usage.output_tokens) == (2, 4)
    second = client.responses.create(model="gpt-test", input="abcd", max_output_tokens=3,
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.usage is not None and second.usage.input_tokens == 1 + 2 + 4
    third = client.responses.create(model="gpt-test", input="abcd", previous_response_id=second.id)
    assert third.usage is not None and third.usage.input_tokens == 1 + 7 + 3  # the chain adds up
    assert [b.prompt_tokens for b in fake.state.bills] == [2, 7, 11]


def test_an_unknown_or_unstored_previous_response_is_a_404(
    fake: FakeProviderServer, sdk: Sdks
) -> None:
    client = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="m", input="hi", previous_response_id="resp_nope")
    assert caught.value.body == {
        "message": "Previous response with id 'resp_nope' not found.",
        "type": "invalid_request_error",
        "param": "previous_response_id",
        "code": "previous_response_not_found",
    }
    unstored = client.responses.create(model="m", input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="m", input="hi", previous_response_id=unstored.id)
    assert len(fake.state.bills) == 1


# --- function tools ---------------------------------------------------------------------------


def test_a_function_tool_is_called_then_its_output_comes_back(
    fake: FakeProviderServer, sdk: Sdks
) -> None:
    client = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    other: FunctionToolParam = {"type": "function", "name": "other", "parameters": None,
                                "strict": False}
    call_response = client.responses.create(model="gpt-test", input="weather in Paris?",
                                            tools=[WEATHER, other])
    [call] = call_response.output
    assert isinstance(call, ResponseFunctionToolCall)
    assert (call.name, call.status) == ("get_weather", "completed")
    assert call.id is not None and call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == WEATHER_ARGUMENTS
    assert call_response.usage is not None
    assert call_response.usage.output_tokens == -(-len(call.arguments) // 4)
    assert call_response.tools[0].type == "function"

    answer = client.responses.create(
        model="gpt-test",
        previous_response_id=call_response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": "Sunny, 21 degrees"}],
        tools=[WEATHER],
    )
    assert answer.output_text == "Sunny, 21 degrees"
    assert answer.usage is not None and answer.usage.output_tokens == 3  # one per word

    # The whole history instead of a stored response: the last run of outputs is answered.
    history = client.responses.create(
        model="gpt-test",
        input=[{"role": "user", "content": "weather?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name,
                "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "Rain"}],
        tools=[WEATHER],
    )
    assert history.output_text == "Rain"


def test_tool_choice_picks_the_function_or_none(fake: FakeProviderServer, sdk: Sdks) -> None:
    client = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    other: FunctionToolParam = {"type": "function", "name": "other", "strict": True,
                                "parameters": {"type": "object", "properties": {}}}
    named = client.responses.create(model="m", input="hi", tools=[WEATHER, other],
                                    tool_choice={"type": "function", "name": "other"})
    assert [(o.type, getattr(o, "name", None), getattr(o, "arguments", None))
            for o in named.output] == [("function_call", "other", "{}")]
    none = client.responses.create(model="m", input="hi", tools=[WEATHER], tool_choice="none")
    assert none.output_text == SIXTEEN_WORDS


def test_a_streamed_function_call_accumulates_its_arguments(
    fake: FakeProviderServer, sdk: Sdks
) -> None:
    client = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    with client.responses.stream(model="gpt-test", input="hi", tools=[WEATHER]) as s:
        types = [event.type for event in s]
        final = s.get_final_response()
    deltas = types.count("response.function_call_arguments.delta")
    assert types == [
        "response.created", "response.in_progress", "response.output_item.added",
        *["response.function_call_arguments.delta"] * deltas,
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    [call] = final.output
    assert call.type == "function_call" and json.loads(call.arguments) == WEATHER_ARGUMENTS
    assert deltas == -(-len(call.arguments) // 4)
    assert final.usage is not None and final.usage.output_tokens == deltas
    assert ended_bills(fake)[0].completion_tokens == deltas


def test_a_json_schema_text_format_parses(fake: FakeProviderServer, sdk: Sdks) -> None:
    class Answer(pydantic.BaseModel):
        city: str
        days: int

    client = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    parsed = client.responses.parse(model="gpt-test", input="hi", text_format=Answer)
    assert parsed.output_parsed == Answer(city="mock", days=1)


# --- web search -------------------------------------------------------------------------------


@pytest.mark.parametrize(("searches", "max_tool_calls", "expected"),
                         [(1, None, 1), (3, None, 3), (3, 2, 2), (2, 0, 0)])
def test_web_search_adds_its_calls(
    fake: FakeProviderServer, searches: int, max_tool_calls: int | None, expected: int, sdk: Sdks
) -> None:
    fake.state.faults.web_searches = searches
    body: dict[str, Any] = {"model": "gpt-test", "input": "latest news", "tools": [
        {"type": "web_search_preview"}]}
    if max_tool_calls is not None:
        body["max_tool_calls"] = max_tool_calls
    response = sdk.openai(f"{fake.url}/v1", "sk-openai-test").responses.create(**body)
    calls = [o for o in response.output if o.type == "web_search_call"]
    assert len(calls) == expected
    assert all(c.status == "completed" and c.id.startswith("ws_") for c in calls)
    assert all(c.action.type == "search" and "latest news" in (c.action.query or "")
               for c in calls)
    assert response.output[-1].type == "message" and response.output_text == SIXTEEN_WORDS
    assert fake.state.bills[0].web_search_calls == expected


def test_a_streamed_web_search_sends_its_events(fake: FakeProviderServer) -> None:
    events = raw_events(fake, {"model": "gpt-test", "input": "q", "tools": [{"type": "web_search"}]})
    names = [name for name, _ in events]
    assert names[:8] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.web_search_call.in_progress", "response.web_search_call.searching",
        "response.web_search_call.completed", "response.output_item.done",
        "response.output_item.added",
    ]
    assert ended_bills(fake)[0].web_search_calls == 1


# --- streams ----------------------------------------------------------------------------------


def test_a_text_stream_follows_the_responses_event_sequence(fake: FakeProviderServer) -> None:
    body = {"model": "o3", "input": "abcde", "max_output_tokens": 11}
    events = raw_events(fake, body)
    names = [name for name, _ in events]
    assert names == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.output_item.done",  # reasoning
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete",  # the limit cut the answer
    ]
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert [d["delta"] for n, d in events if n == "response.output_text.delta"] == ["w0", " w1", " w2"]
    assert events[0][1]["response"]["status"] == "in_progress"
    final = events[-1][1]["response"]
    assert final["usage"]["output_tokens"] == 11
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 8
    assert ended_bills(fake) == [Bill("responses", "o3", True, prompt_tokens=2, completion_tokens=11,
                                      reasoning_tokens=8, complete=True, ended=True)]


def test_the_sdk_stream_helper_and_create_stream_parse(fake: FakeProviderServer, sdk: Sdks) -> None:
    client = sdk.openai(f"{fake.url}/v1", "sk-openai-test")
    with client.responses.stream(model="gpt-test", input="hi", max_output_tokens=20) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == SIXTEEN_WORDS
    assert final.status == "completed"
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (1, 16)

    events = list(client.responses.create(model="gpt-test", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is not None
    assert events[-1].response.usage.total_tokens == 17
    stored = client.responses.create(model="m", input="hi", previous_response_id=final.id)
    assert stored.usage is not None and stored.usage.input_tokens == 1 + 17


def test_omit_final_usage_drops_the_completed_usage(fake: FakeProviderServer) -> None:
    fake.state.faults.omit_final_usage = True
    events = raw_events(fake, {"model": "m", "input": "hi"})
    assert events[-1][0] == "response.completed" and events[-1][1]["response"]["usage"] is None
    assert post(fake, {"model": "m", "input": "hi"}).json()["usage"] is not None  # streams only


def test_a_cut_stream_ends_before_the_usage(fake: FakeProviderServer, sdk: Sdks) -> None:
    fake.state.faults.cut_after_chunks = 6  # created, in_progress, item, part, two deltas
    received: list[str] = []
    with (
        pytest.raises((openai.APIConnectionError, httpx2.RemoteProtocolError)),
        sdk.openai(f"{fake.url}/v1", "sk-openai-test").responses.stream(
            model="gpt-test", input="hi") as stream,
    ):
        received.extend(event.type for event in stream)
    assert "response.completed" not in received
    [bill] = ended_bills(fake)
    assert (bill.completion_tokens, bill.complete) == (2, False)
    assert fake.state.responses == {}  # never stored: it did not complete

    with pytest.raises(httpx.RemoteProtocolError):
        raw_events(fake, {"model": "gpt-test", "input": "hi"})


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"model": "gpt-test", "input": "hi"}, id="text"),
        pytest.param({"model": "o3", "input": "hi", "max_output_tokens": 9,
                      "include": ["reasoning.encrypted_content"]}, id="reasoning-incomplete"),
        pytest.param({"model": "o3", "input": "hi", "tools": [WEATHER, {"type": "web_search"}],
                      "reasoning": {"effort": "high", "summary": "auto"}}, id="tools"),
        pytest.param({"model": "m", "input": [{"type": "function_call_output", "call_id": "c",
                                               "output": [{"type": "input_text", "text": "ok"}]}],
                      "tools": [WEATHER], "tool_choice": "required", "text": {
                          "format": {"type": "text"}, "verbosity": "low"}}, id="tool-output"),
    ],
)
def test_every_answer_validates_strictly_against_the_sdk_models(
    fake: FakeProviderServer, body: dict[str, Any]
) -> None:
    """Stricter than the SDK's own lenient parsing: pydantic validation of every shape."""
    response = post(fake, body)
    assert response.status_code == 200, response.text
    Response.model_validate(response.json())
    adapter: pydantic.TypeAdapter[ResponseStreamEvent] = pydantic.TypeAdapter(ResponseStreamEvent)
    for _, data in raw_events(fake, body):
        adapter.validate_python(data)


# --- Anthropic count_tokens -------------------------------------------------------------------


@pytest.mark.parametrize("billing", ["words", "tokenizer"])
def test_count_tokens_matches_what_messages_bills_and_is_free(
    fake: FakeProviderServer, billing: Any, sdk: Sdks
) -> None:
    fake.state.billing = billing
    client = sdk.anthropic(fake.url, "sk-ant-test")
    kwargs: dict[str, Any] = {
        "model": "claude-test",
        "system": "be brief and exact",
        "messages": [{"role": "user", "content": "hello 字字"}],
        "tools": [{"name": "t", "input_schema": {"type": "object", "properties": {}}}],
    }
    counted = client.messages.count_tokens(**kwargs)
    assert fake.state.bills == []
    message = client.messages.create(max_tokens=5, **kwargs)
    assert counted.input_tokens == message.usage.input_tokens > 1
    assert fake.state.received_keys == ["sk-ant-test", "sk-ant-test"]


def test_count_tokens_refuses_like_messages(fake: FakeProviderServer) -> None:
    url = f"{fake.url}/v1/messages/count_tokens"
    assert httpx.post(url, json={"model": "m", "messages": []}).status_code == 401
    response = httpx.post(url, headers={"x-api-key": "k"}, json={"model": "m"})
    assert response.status_code == 400
    assert response.json()["type"] == "error"
