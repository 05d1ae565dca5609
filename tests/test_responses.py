"""The OpenAI Responses API through the gateway (``POST /v1/responses``), driven by the official
``openai`` SDK: metered like a chat completion, its output limit clamped to the slice, usage from
the response or the stream's terminal event, and conversations continued at the provider only
when the broker can bound what they add.
"""

from __future__ import annotations

from collections.abc import Callable

import openai
import pytest

from tests.conftest import Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import Env, make_env, price
from tests.sdk_support import Sdks


@pytest.fixture
def env_both(make_live_broker: Callable[..., Broker], db_url: str,
             fake: FakeProviderServer) -> Env:
    return make_env(make_live_broker, db_url, fake)


def test_a_response_is_metered_from_its_usage(env_both: Env, sdk: Sdks) -> None:
    env = env_both
    token = env.token()
    raw = sdk.broker_openai(env, token).responses.with_raw_response.create(
        model="gpt-test", input="Summarise ticket 4711.", max_output_tokens=40)
    response = raw.parse()
    assert response.status == "completed" and response.output_text.startswith("w0")
    assert response.usage is not None
    used_in, used_out = response.usage.input_tokens, response.usage.output_tokens
    [event] = env.wait_for_events(1)
    assert (event["prompt_tokens"], event["completion_tokens"]) == (used_in, used_out)
    assert (event["status"], event["estimated"]) == ("ok", 0)
    assert event["cost_micros"] == price(used_in, used_out) == int(raw.headers["x-broker-cost-micros"])
    assert env.slice_of(token)["spent_micros"] == price(used_in, used_out)
    assert env.fake.state.requests[0]["model"] == "mock-gpt"


def test_the_output_limit_is_clamped_to_what_the_slice_pays_for(env_both: Env, sdk: Sdks) -> None:
    env = env_both
    token = env.token(budget=200)  # a few dozen output tokens at these prices
    sdk.broker_openai(env, token).responses.create(model="gpt-test", input="hi",
                                                   max_output_tokens=100_000)
    sent = env.fake.state.requests[0]["max_output_tokens"]
    assert 0 < sent < 100_000
    [event] = env.wait_for_events(1)
    assert event["cost_micros"] <= 200


def test_a_stream_is_metered_from_its_terminal_event(env_both: Env, sdk: Sdks) -> None:
    env = env_both
    token = env.token()
    events = list(sdk.broker_openai(env, token).responses.create(
        model="gpt-test", input="hi", max_output_tokens=40, stream=True))
    assert events[-1].type == "response.completed"
    usage = events[-1].response.usage
    assert usage is not None
    [event] = env.wait_for_events(1)
    assert (event["prompt_tokens"], event["completion_tokens"], event["stream"]) == (
        usage.input_tokens, usage.output_tokens, 1)
    assert event["cost_micros"] == price(usage.input_tokens, usage.output_tokens)


def test_the_sdk_stream_helper_works_unchanged(env_both: Env, sdk: Sdks) -> None:
    env = env_both
    with sdk.broker_openai(env, env.token()).responses.stream(model="gpt-test", input="hi",
                                                               max_output_tokens=40) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text and final.status == "completed"


def test_reasoning_is_charged_as_output(env_both: Env, sdk: Sdks) -> None:
    env = env_both
    response = sdk.broker_openai(env, env.token()).responses.create(
        model="gpt-test", input="hi", max_output_tokens=64, reasoning={"effort": "low"})
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens > 0
    [event] = env.wait_for_events(1)
    assert event["completion_tokens"] == response.usage.output_tokens


def test_a_metered_response_can_be_continued_and_its_stored_context_is_held(
        env_both: Env, sdk: Sdks) -> None:
    env = env_both
    api = sdk.broker_openai(env, env.token())
    first = api.responses.create(model="gpt-test", input="hi", max_output_tokens=40)
    second = api.responses.create(model="gpt-test", input="and then?", max_output_tokens=40,
                                  previous_response_id=first.id)
    assert first.usage is not None and second.usage is not None
    # The provider billed the stored conversation again, and the broker charged it.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    events = env.wait_for_events(2)
    assert events[1]["prompt_tokens"] == second.usage.input_tokens
    assert events[1]["status"] == "ok"


def test_a_conversation_the_broker_did_not_meter_is_refused_before_the_provider(
        env_both: Env, sdk: Sdks) -> None:
    env = env_both
    api = sdk.broker_openai(env, env.token())
    with pytest.raises(openai.BadRequestError) as refused:
        api.responses.create(model="gpt-test", input="hi", previous_response_id="resp_elsewhere")
    assert refused.value.param == "previous_response_id"
    # Another tenant's response is as unknown as one made elsewhere.
    theirs = sdk.broker_openai(env, env.token()).responses.create(model="gpt-test", input="hi",
                                                                  max_output_tokens=20)
    with pytest.raises(openai.BadRequestError):
        api.responses.create(model="gpt-test", input="hi", previous_response_id=theirs.id)
    assert len(env.fake.state.requests) == 1


@pytest.mark.parametrize(("extra", "param"), [
    pytest.param({"conversation": "conv_123"}, "conversation", id="stored-conversation"),
    pytest.param({"prompt": {"id": "pmpt_1"}}, "prompt", id="stored-prompt"),
    pytest.param({"background": True}, "background", id="background-job"),
    pytest.param({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]",
                 id="item-reference"),
    pytest.param({"input": [{"type": "reasoning", "id": "rs_1", "summary": [],
                             "encrypted_content": "gAAAA"}]}, "input[0]", id="reasoning-item"),
    pytest.param({"input": [{"role": "user", "content": "hi"},
                            {"type": "web_search_call", "id": "ws_1", "status": "completed"}]},
                 "input[1]", id="server-tool-item"),
    pytest.param({"max_output_tokens": 0}, "max_output_tokens", id="zero-output-limit"),
    pytest.param({"previous_response_id": 7}, "previous_response_id", id="id-not-a-string"),
])
def test_what_cannot_be_bounded_is_refused_with_a_named_parameter(
        env: Env, extra: dict[str, object], param: str) -> None:
    body: dict[str, object] = {"model": "gpt-test", "input": "hi", **extra}
    resp = env.broker.client.post("/v1/responses", json=body,
                                  headers={"authorization": f"Bearer {env.token()}"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert env.fake.state.requests == []


def test_function_tools_pass_and_the_call_comes_back(env: Env, sdk: Sdks) -> None:
    api = sdk.broker_openai(env, env.token())
    tools = [{"type": "function", "name": "lookup_ticket", "description": "Find a ticket.",
              "parameters": {"type": "object", "properties": {"id": {"type": "string"}},
                             "required": ["id"]}}]
    first = api.responses.create(model="gpt-test", input="ticket?", tools=tools,  # type: ignore[arg-type]
                                 max_output_tokens=64)
    [call] = [item for item in first.output if item.type == "function_call"]
    second = api.responses.create(model="gpt-test", tools=tools, max_output_tokens=64,  # type: ignore[arg-type]
                                  input=[{"type": "function_call", "call_id": call.call_id,
                                          "name": call.name, "arguments": call.arguments},
                                         {"type": "function_call_output", "call_id": call.call_id,
                                          "output": "ticket 4711: printer on fire"}])
    assert "printer on fire" in second.output_text
    assert len(env.wait_for_events(2)) == 2


def test_a_stream_cut_short_is_charged_a_bound_not_nothing(env: Env, sdk: Sdks) -> None:
    env.fake.state.faults.cut_after_chunks = 3
    token = env.token()
    events = list(sdk.broker_openai(env, token).responses.create(model="gpt-test", input="hi",
                                                                 max_output_tokens=40, stream=True))
    # The client is told the answer is incomplete, in the stream's own dialect.
    assert events[-1].type == "error" and events[-1].code == "upstream_error"
    [event] = env.wait_for_events(1)
    assert event["estimated"] == 1 and event["cost_micros"] > 0
