"""Tools through the gateway: every tool a request offers is checked against the workload's
policy on every route that carries tools; server-side tools are priced per call, held at their
worst case with the cap the broker sets on the request, settled from what the provider reports
and counted in the usage event; a call the provider reports of a tool the request did not offer
is charged, alerted, and suspends the workload.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import Env, make_env, price
from tests.sdk_support import Sdks

SEARCH_MICROS = 10_000  # $10 per 1,000 calls
FETCH_RESULT_TOKENS = 3_000


def _tools(sections: dict[str, dict[str, Any]]) -> None:
    sections["tools"] = {
        "web_search": {"micros_per_call": SEARCH_MICROS, "default_max_calls": 3,
                       "result_tokens_per_call": 2_000},
        "web_fetch": {"micros_per_call": 0, "default_max_calls": 2,
                      "result_tokens_per_call": FETCH_RESULT_TOKENS},
    }


@pytest.fixture
def tool_env(make_live_broker: Callable[..., Broker], sqlite_url: str,
             fake: FakeProviderServer) -> Env:
    return make_env(make_live_broker, sqlite_url, fake, adjust=_tools)


FUNCTION_CHAT = {"type": "function", "function": {"name": "lookup", "parameters": {}}}
FUNCTION_RESPONSES = {"type": "function", "name": "lookup", "parameters": {}}
FUNCTION_MESSAGES = {"name": "lookup", "input_schema": {"type": "object"}}
SEARCH_RESPONSES = {"type": "web_search"}
SEARCH_MESSAGES = {"type": "web_search_20250305", "name": "web_search"}
BASH_MESSAGES = {"type": "bash_20250124", "name": "bash"}

CHAT = ("/v1/chat/completions", {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
RESPONSES = ("/v1/responses", {"model": "gpt-test", "input": "hi"})
MESSAGES = ("/v1/messages", {"model": "claude-test", "max_tokens": 50,
                             "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize(("route", "tool", "policy", "code"), [
    pytest.param(CHAT, FUNCTION_CHAT, {"tools": []}, "tool_not_allowed", id="chat-function"),
    pytest.param(RESPONSES, FUNCTION_RESPONSES, {"tools": []}, "tool_not_allowed",
                 id="responses-function"),
    pytest.param(RESPONSES, SEARCH_RESPONSES, {}, "tool_not_allowed", id="responses-search"),
    pytest.param(RESPONSES, SEARCH_RESPONSES, {"approval_tools": ["web_search"]},
                 "approval_required", id="responses-search-needs-approval"),
    pytest.param(MESSAGES, FUNCTION_MESSAGES, {"tools": []}, "permission_error",
                 id="messages-function"),
    pytest.param(MESSAGES, SEARCH_MESSAGES, {}, "permission_error", id="messages-search"),
    pytest.param(MESSAGES, SEARCH_MESSAGES, {"approval_tools": ["web_search"]},
                 "permission_error", id="messages-search-needs-approval"),
    pytest.param(MESSAGES, BASH_MESSAGES, {}, "permission_error", id="messages-client-bash"),
])
def test_a_tool_outside_the_policy_is_refused_before_any_money_moves(
        tool_env: Env, route: tuple[str, dict[str, Any]], tool: dict[str, Any],
        policy: dict[str, Any], code: str) -> None:
    env = tool_env
    path, body = route
    token = env.token(**policy)
    resp = env.broker.client.post(path, json={**body, "tools": [tool]},
                                  headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 403, resp.text
    error = resp.json()["error"]
    assert (error["type"] if path == "/v1/messages" else error["code"]) == code
    assert env.fake.state.requests == []
    assert env.query("SELECT * FROM hold") == [] and env.events() == []
    assert env.slice_of(token)["spent_micros"] == 0


def test_a_tool_the_policy_allows_passes_on_every_route(tool_env: Env) -> None:
    env = tool_env
    token = env.token(tools=["function", "bash"])
    for (path, body), tool in ((CHAT, FUNCTION_CHAT), (RESPONSES, FUNCTION_RESPONSES),
                               (MESSAGES, FUNCTION_MESSAGES), (MESSAGES, BASH_MESSAGES)):
        resp = env.broker.client.post(path, json={**body, "tools": [tool]},
                                      headers={"authorization": f"Bearer {token}"})
        assert resp.status_code == 200, (path, resp.text)


def test_a_server_side_tool_without_a_price_cannot_be_bounded(
        make_live_broker: Callable[..., Broker], sqlite_url: str,
        fake: FakeProviderServer) -> None:
    env = make_env(make_live_broker, sqlite_url, fake)  # no [tools] table
    token = env.token(tools=["function", "web_search"])
    resp = env.broker.client.post(RESPONSES[0], json={**RESPONSES[1], "tools": [SEARCH_RESPONSES]},
                                  headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "tools[0]"
    assert "tools.web_search.micros_per_call" in resp.json()["error"]["message"]
    assert env.fake.state.requests == []


def test_web_search_on_responses_is_capped_held_and_charged_per_call(tool_env: Env, sdk: Sdks) -> None:
    env = tool_env
    env.fake.state.faults.web_searches = 2
    token = env.token(tools=["function", "web_search"])
    raw = sdk.broker_openai(env, token).responses.with_raw_response.create(
        model="gpt-test", input="news?", tools=[{"type": "web_search"}], max_output_tokens=40)
    response = raw.parse()
    assert [i.type for i in response.output].count("web_search_call") == 2
    # The client set no cap: the broker set tools.web_search.default_max_calls.
    assert env.fake.state.requests[0]["max_tool_calls"] == 3
    assert response.usage is not None
    [event] = env.wait_for_events(1)
    expected = price(response.usage.input_tokens, response.usage.output_tokens) + 2 * SEARCH_MICROS
    assert event["cost_micros"] == expected == int(raw.headers["x-broker-cost-micros"])
    assert json.loads(event["tool_calls"]) == {"web_search": 2}
    shown = env.broker.client.get("/v1/admin/usage/events", headers=env.broker.admin()).json()
    assert shown["data"][0]["tool_calls"] == {"web_search": 2}


def test_a_cap_the_client_set_is_kept_and_bounds_the_hold(tool_env: Env, sdk: Sdks) -> None:
    env = tool_env
    env.fake.state.faults.web_searches = 5
    token = env.token(tools=["function", "web_search"])
    response = sdk.broker_openai(env, token).responses.create(
        model="gpt-test", input="news?", tools=[{"type": "web_search"}], max_tool_calls=1,
        max_output_tokens=40)
    assert [i.type for i in response.output].count("web_search_call") == 1
    assert env.fake.state.requests[0]["max_tool_calls"] == 1
    [event] = env.wait_for_events(1)
    assert json.loads(event["tool_calls"]) == {"web_search": 1}


def test_a_streamed_response_charges_the_searches_of_its_terminal_event(tool_env: Env, sdk: Sdks) -> None:
    env = tool_env
    env.fake.state.faults.web_searches = 2
    token = env.token(tools=["function", "web_search"])
    events = list(sdk.broker_openai(env, token).responses.create(
        model="gpt-test", input="news?", tools=[{"type": "web_search"}], max_output_tokens=40,
        stream=True))
    usage = events[-1].response.usage  # type: ignore[union-attr]
    assert usage is not None
    [event] = env.wait_for_events(1)
    assert event["cost_micros"] == price(usage.input_tokens, usage.output_tokens) + 2 * SEARCH_MICROS
    assert json.loads(event["tool_calls"]) == {"web_search": 2}


def test_a_slice_that_cannot_pay_the_worst_searches_is_refused(tool_env: Env) -> None:
    env = tool_env
    token = env.token(budget=3 * SEARCH_MICROS - 1, tools=["function", "web_search"])
    resp = env.broker.client.post(RESPONSES[0], json={**RESPONSES[1], "tools": [SEARCH_RESPONSES]},
                                  headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 429, resp.text
    assert resp.json()["error"]["code"] == "insufficient_quota"
    assert env.fake.state.requests == []


def test_anthropic_web_search_gets_max_uses_and_is_charged_per_request(tool_env: Env, sdk: Sdks) -> None:
    env = tool_env
    env.fake.state.faults.web_searches = 2
    token = env.token(tools=["function", "web_search"])
    raw = sdk.broker_anthropic(env, token).messages.with_raw_response.create(
        model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "news?"}],
        tools=[{"type": "web_search_20250305", "name": "web_search"}])
    message = raw.parse()
    assert env.fake.state.requests[0]["tools"][0]["max_uses"] == 3
    assert message.usage.server_tool_use is not None
    assert message.usage.server_tool_use.web_search_requests == 2
    [event] = env.wait_for_events(1)
    expected = price(message.usage.input_tokens, message.usage.output_tokens) + 2 * SEARCH_MICROS
    assert event["cost_micros"] == expected == int(raw.headers["x-broker-cost-micros"])
    assert json.loads(event["tool_calls"]) == {"web_search": 2}


def test_a_conversation_goes_on_with_its_search_results_held_at_the_ceiling(
        tool_env: Env, sdk: Sdks) -> None:
    env = tool_env
    token = env.token(tools=["function", "web_search"])
    api = sdk.broker_anthropic(env, token)
    first = api.messages.create(
        model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "news?"}],
        tools=[{"type": "web_search_20250305", "name": "web_search"}])
    history = [{"role": "user", "content": "news?"},
               {"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                 for b in first.content]},
               {"role": "user", "content": "and the day before?"}]
    second = api.messages.create(model="claude-test", max_tokens=50, messages=history)  # type: ignore[arg-type]
    assert second.content
    assert len(env.wait_for_events(2)) == 2


def test_anthropic_web_search_in_a_stream_is_charged_from_the_final_delta(tool_env: Env, sdk: Sdks) -> None:
    env = tool_env
    env.fake.state.faults.web_searches = 1
    token = env.token(tools=["function", "web_search"])
    with sdk.broker_anthropic(env, token).messages.stream(
            model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "news?"}],
            tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]) as stream:
        final = stream.get_final_message()
    assert env.fake.state.requests[0]["tools"][0]["max_uses"] == 2
    [event] = env.wait_for_events(1)
    assert event["cost_micros"] == price(final.usage.input_tokens,
                                         final.usage.output_tokens) + SEARCH_MICROS
    assert json.loads(event["tool_calls"]) == {"web_search": 1}


def test_web_fetch_results_are_cut_to_the_ceiling_the_hold_counts(tool_env: Env) -> None:
    env = tool_env
    token = env.token(tools=["function", "web_fetch"])
    resp = env.broker.client.post(MESSAGES[0], json={
        **MESSAGES[1], "tools": [{"type": "web_fetch_20250910", "name": "web_fetch",
                                  "max_content_tokens": 100_000}]},
        headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text
    sent = env.fake.state.requests[0]["tools"][0]
    assert (sent["max_uses"], sent["max_content_tokens"]) == (2, FETCH_RESULT_TOKENS)


def test_a_grant_of_a_tool_behind_approval_lets_tokens_use_it(tool_env: Env) -> None:
    env = tool_env
    agent = env.agent(approval_tools=["web_search"])
    refused = env.broker.client.post("/v1/admin/grants", headers=env.broker.admin(), json={
        "workload_id": agent["id"], "tool": "web_fetch", "ttl_s": 600})
    assert refused.status_code == 422, refused.text
    granted = env.broker.client.post("/v1/admin/grants", headers=env.broker.admin(), json={
        "workload_id": agent["id"], "tool": "web_search", "ttl_s": 600})
    assert granted.status_code == 201, granted.text
    assert granted.json()["tool"] == "web_search"
    token = env.broker.token(agent["client_id"], agent["client_secret"])
    resp = env.broker.client.post(RESPONSES[0], json={**RESPONSES[1], "tools": [SEARCH_RESPONSES]},
                                  headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text


def test_a_tool_call_the_request_did_not_offer_is_charged_alerted_and_suspends(
        tool_env: Env, sdk: Sdks) -> None:
    env = tool_env
    env.fake.state.faults.unoffered_tool_calls = 1  # the provider misbehaves
    agent = env.agent(tools=["function", "web_search"])
    token = env.broker.token(agent["client_id"], agent["client_secret"])
    raw = sdk.broker_openai(env, token).responses.with_raw_response.create(
        model="gpt-test", input="hi", max_output_tokens=40)
    usage = raw.parse().usage
    assert usage is not None
    [event] = env.wait_for_events(1)
    # Charged at the dearest configured price, since the request offered no such tool.
    assert event["cost_micros"] == price(usage.input_tokens, usage.output_tokens) + SEARCH_MICROS
    [alert] = env.query("SELECT * FROM alert")
    assert (alert["detector"], alert["severity"], alert["action"]) == (
        "unauthorised_tool", "critical", "suspend")
    assert "should never happen" in alert["summary"]
    again = env.broker.client.post(RESPONSES[0], json=RESPONSES[1],
                                   headers={"authorization": f"Bearer {token}"})
    assert again.status_code == 401
    refused = env.broker.client.post("/v1/token", data={
        "grant_type": "client_credentials", "client_id": agent["client_id"],
        "client_secret": agent["client_secret"]})
    assert refused.status_code in (400, 401)


def test_the_policy_schema_refuses_a_malformed_tool_name(tool_env: Env) -> None:
    env = tool_env
    tenant = env.broker.create_tenant()
    resp: httpx.Response = env.broker.client.post(
        "/v1/admin/workloads", headers=env.broker.admin(),
        json={"tenant_id": tenant["id"], "name": "bad-tools", "kind": "agent",
              "policy": {"tools": ["Web Search"]}})
    assert resp.status_code == 422, resp.text
