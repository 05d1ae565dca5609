"""The OpenAI Agents SDK runs an agent through the broker unchanged: its default model speaks
the Responses API, and the broker meters every turn of the agent's loop against one slice."""

from __future__ import annotations

import asyncio

from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

from tests.gateway_support import Env, price

# The SDK would otherwise export traces to OpenAI, which no test may reach.
set_tracing_disabled(True)


@function_tool
def lookup_ticket(ticket_id: str) -> str:
    """Look a support ticket up by its id."""
    return f"ticket {ticket_id}: the printer on floor 3 is on fire"


def test_an_agent_with_a_function_tool_runs_through_the_broker(env: Env) -> None:
    token = env.token()

    async def run() -> str:
        client = AsyncOpenAI(base_url=f"{env.broker.url}/v1", api_key=token, max_retries=0)
        try:
            agent = Agent(
                name="triage", instructions="Answer from the ticket system.",
                tools=[lookup_ticket],
                model=OpenAIResponsesModel(model="gpt-test", openai_client=client))
            result = await Runner.run(agent, "What is wrong in ticket 4711?")
            return str(result.final_output)
        finally:
            await client.close()

    answer = asyncio.run(run())
    assert "printer on floor 3 is on fire" in answer
    # Two turns: the model asked for the tool, then answered with its result; each was metered.
    sent = [r for r in env.fake.state.requests if "input" in r]
    assert len(sent) == 2
    assert any(item.get("type") == "function_call_output" for item in sent[1]["input"])
    events = env.wait_for_events(2)
    assert [e["status"] for e in events] == ["ok", "ok"]
    assert all(e["cost_micros"] == price(e["prompt_tokens"], e["completion_tokens"])
               for e in events)
    assert env.slice_of(token)["spent_micros"] == sum(e["cost_micros"] for e in events)
