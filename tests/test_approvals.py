"""Approvals, grants and burst capacity: a workload asks for a model behind approval or for extra
budget and rates, an admin approves (lowering, never raising), denies or grants directly; a live
grant's tokens carry it, die with it on every replica, and its unspent budget returns."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import httpx
import jwt
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from broker.jobs import end_grants
from tests.conftest import Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import Env, make_env
from tests.support import assert_problem, wait_for
from tests.test_replicas import start_replica

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]


def _url(env: Env) -> str:
    assert env.broker.url is not None, "a live broker"
    return env.broker.url


def _openai(env: Env, token: str) -> openai.OpenAI:
    return env.broker.opened(openai.OpenAI(api_key=token, base_url=_url(env) + "/v1",
                                           max_retries=0))


def _claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _gated_agent(env: Env, **policy: Any) -> dict[str, Any]:
    return env.agent(approval_models=["o1*"], **policy)


def _ask(env: Env, token: str, **body: Any) -> httpx.Response:
    resp: httpx.Response = env.broker.client.post("/v1/approvals", json=body,
                                                  headers=_bearer(token))
    return resp


def _grant(env: Env, workload_id: str, **body: Any) -> dict[str, Any]:
    resp = env.broker.client.post("/v1/admin/grants", json={"workload_id": workload_id, **body},
                                  headers=env.broker.admin())
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


def _token(env: Env, agent: dict[str, Any], **params: Any) -> str:
    return env.broker.token(agent["client_id"], agent["client_secret"], **params)


# --- the whole flow ---------------------------------------------------------------------------


def test_a_workload_asks_an_admin_approves_and_its_new_tokens_call_the_model(env: Env) -> None:
    agent = _gated_agent(env)
    before = _token(env, agent)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        _openai(env, before).chat.completions.create(model="o1-test", messages=PROMPT)
    assert refused.value.code == "approval_required"

    asked = _ask(env, before, model="o1-test", ttl_s=600, reason="evaluation run")
    assert asked.status_code == 201, asked.text
    approval = asked.json()
    assert approval["id"].startswith("ap_") and approval["status"] == "pending"
    own = env.broker.client.get(f"/v1/approvals/{approval['id']}", headers=_bearer(before))
    assert own.json()["status"] == "pending"
    queue = env.broker.client.get("/v1/admin/approvals?status=pending", headers=env.broker.admin())
    assert approval["id"] in [a["id"] for a in queue.json()["data"]]

    approved = env.broker.client.post(f"/v1/admin/approvals/{approval['id']}/approve",
                                      json={"ttl_s": 300}, headers=env.broker.admin())
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "approved"
    grant_id = approved.json()["grant_id"]
    assert grant_id.startswith("gr_")

    after = _token(env, agent)
    claims = _claims(after)
    assert claims["grants"] == [grant_id] and "o1-test" in claims["grant_models"]
    # No longer than the grant: approved for 300 s.
    assert claims["exp"] <= claims["iat"] + 300
    answer = _openai(env, after).chat.completions.create(model="o1-test", messages=PROMPT)
    assert answer.choices[0].message.content
    # A token from before the grant does not carry it.
    with pytest.raises(openai.PermissionDeniedError):
        _openai(env, before).chat.completions.create(model="o1-test", messages=PROMPT)
    assert env.broker.client.get(f"/v1/approvals/{approval['id']}",
                                 headers=_bearer(after)).json()["status"] == "approved"
    actions = [r["action"] for r in env.query("SELECT action FROM audit_event ORDER BY id")]
    assert {"approval.request", "grant.create", "approval.approve"} <= set(actions)


def test_an_approval_may_lower_what_was_asked_but_never_raise_it(env: Env) -> None:
    agent = _gated_agent(env)
    token = _token(env, agent)
    ap = _ask(env, token, model="o1-test", budget_micros=50_000, ttl_s=600).json()
    for raised in ({"ttl_s": 601}, {"budget_micros": 50_001}, {"rpm": 10}):
        resp = env.broker.client.post(f"/v1/admin/approvals/{ap['id']}/approve", json=raised,
                                      headers=env.broker.admin())
        assert_problem(resp, 422, "validation_error")
    resp = env.broker.client.post(f"/v1/admin/approvals/{ap['id']}/approve",
                                  json={"ttl_s": 120, "budget_micros": 20_000},
                                  headers=env.broker.admin())
    assert resp.status_code == 200, resp.text
    grant = env.broker.client.get(f"/v1/admin/grants/{resp.json()['grant_id']}",
                                  headers=env.broker.admin()).json()
    assert grant["budget_micros"] == 20_000 and grant["status"] == "live"


def test_a_denied_request_stays_denied(env: Env) -> None:
    agent = _gated_agent(env)
    token = _token(env, agent)
    ap = _ask(env, token, model="o1-test", ttl_s=600).json()
    denied = env.broker.client.post(f"/v1/admin/approvals/{ap['id']}/deny",
                                    json={"reason": "not this quarter"}, headers=env.broker.admin())
    assert denied.json()["status"] == "denied"
    again = env.broker.client.post(f"/v1/admin/approvals/{ap['id']}/approve", json={},
                                   headers=env.broker.admin())
    assert_problem(again, 409, "conflict")
    with pytest.raises(openai.PermissionDeniedError):
        _openai(env, _token(env, agent)).chat.completions.create(model="o1-test",
                                                                 messages=PROMPT)


# --- burst capacity ---------------------------------------------------------------------------


def test_extra_budget_funds_tokens_the_workload_budget_cannot_and_returns_at_revocation(
        env: Env) -> None:
    # The workload's own day budget holds one slice; the grant's budget funds the next ones.
    agent = env.agent(budget=10_000, budgets=[{"period": "day", "limit_micros": 10_000}])
    first = _token(env, agent)
    assert env.slice_of(first)["parent_jti"] is None
    resp = env.broker.client.post("/v1/token", data={
        "grant_type": "client_credentials", "client_id": agent["client_id"],
        "client_secret": agent["client_secret"]})
    assert resp.status_code == 403 and resp.json()["error"] == "budget_exhausted"

    grant = _grant(env, agent["id"], budget_micros=100_000, ttl_s=600, reason="launch day")
    funded = _token(env, agent)
    assert env.slice_of(funded)["parent_jti"] == grant["id"]
    assert _claims(funded)["grants"] == [grant["id"]]
    _openai(env, funded).chat.completions.create(model="gpt-test", messages=PROMPT)
    cost = env.events()[-1]["cost_micros"]
    assert cost > 0
    shown = env.broker.client.get(f"/v1/admin/grants/{grant['id']}", headers=env.broker.admin())
    assert shown.json()["spent_micros"] == cost

    revoked = env.broker.client.post(f"/v1/admin/grants/{grant['id']}/revoke",
                                     json={"reason": "done"}, headers=env.broker.admin())
    assert revoked.json()["status"] == "revoked"
    with pytest.raises(openai.AuthenticationError):
        _openai(env, funded).chat.completions.create(model="gpt-test", messages=PROMPT)
    # The grant's slice is released and what it did not spend is no longer reserved anywhere.
    env.broker.sweep()
    rows = env.query("SELECT released_at, spent_micros FROM token_slice WHERE jti = :j",
                     j=grant["id"])
    assert rows[0]["released_at"] is not None and rows[0]["spent_micros"] == cost


def test_a_grant_reserves_from_the_tenant_budget_and_expiry_returns_the_rest(
        env: Env) -> None:
    tenant = env.broker.create_tenant(budgets=[{"period": "day", "limit_micros": 1_000_000}])
    agent = env.broker.create_workload(tenant["id"], policy={
        "models": ["gpt-test"], "token_budget_micros": 0,
        "rate": {"rpm": 1000, "tpm": 10**9}})
    too_much = env.broker.client.post("/v1/admin/grants", json={
        "workload_id": agent["id"], "budget_micros": 2_000_000, "ttl_s": 60},
        headers=env.broker.admin())
    assert_problem(too_much, 403, "budget_exhausted")
    grant = _grant(env, agent["id"], budget_micros=600_000, ttl_s=2)
    reserved = env.query("SELECT reserved_micros FROM budget_counter WHERE scope = 'tenant' "
                         "AND scope_id = :t", t=tenant["id"])
    assert reserved == [{"reserved_micros": 600_000}]
    # A second grant cannot take what the first holds.
    assert_problem(env.broker.client.post("/v1/admin/grants", json={
        "workload_id": agent["id"], "budget_micros": 600_000, "ttl_s": 60},
        headers=env.broker.admin()), 403, "budget_exhausted")

    def ended() -> bool:
        end_grants(env.broker.services)
        env.broker.sweep()
        rows = env.query("SELECT ended_at FROM access_grant WHERE id = :g", g=grant["id"])
        return rows[0]["ended_at"] is not None

    wait_for(ended, 10, what="the grant's end")
    assert env.query("SELECT reserved_micros FROM budget_counter WHERE scope = 'tenant' "
                     "AND scope_id = :t", t=tenant["id"]) == [{"reserved_micros": 0}]
    shown = env.broker.client.get(f"/v1/admin/grants/{grant['id']}", headers=env.broker.admin())
    assert shown.json()["status"] == "expired"
    expiries = env.query("SELECT detail FROM audit_event WHERE action = 'grant.expire' "
                         "AND target = :g", g=grant["id"])
    assert len(expiries) == 1


def test_a_grant_raises_the_workload_rates_for_its_life(env: Env) -> None:
    agent = env.agent(rate={"rpm": 2, "tpm": 10**9})
    token = _token(env, agent)
    client = _openai(env, token)
    for _ in range(2):
        client.chat.completions.create(model="gpt-test", messages=PROMPT)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-test", messages=PROMPT)
    _grant(env, agent["id"], rpm=100, ttl_s=600)
    # Tokens issued before the grant are cut off by nothing; the limit is the workload's.
    wait_for(lambda: _calls_pass(client), 10, what="the raised rate")


def _calls_pass(client: openai.OpenAI) -> bool:
    try:
        client.chat.completions.create(model="gpt-test", messages=PROMPT)
    except openai.RateLimitError:
        return False
    return True


def test_a_grant_expiring_mid_stream_ends_that_stream(env: Env) -> None:
    agent = _gated_agent(env)
    _grant(env, agent["id"], model="o1-test", ttl_s=3)
    token = _token(env, agent)
    env.fake.state.faults.chunk_delay_s = 0.2
    env.fake.state.faults.answer_tokens = 200
    started = time.monotonic()
    with httpx.stream("POST", _url(env) + "/v1/chat/completions", timeout=30,
                      headers=_bearer(token),
                      json={"model": "o1-test", "messages": PROMPT, "stream": True}) as resp:
        assert resp.status_code == 200
        text = "".join(resp.iter_text())
    assert time.monotonic() - started < 20
    assert '"error"' in text  # the dialect's error event closed it
    events = env.wait_for_events(1)
    assert events[-1]["status"] == "expired"


# --- several replicas -------------------------------------------------------------------------


def test_a_revoked_grant_is_refused_on_another_replica_within_a_second(
        make_live_broker: Any, pg_url: str, fake: FakeProviderServer) -> None:
    env = make_env(make_live_broker, pg_url, fake)
    agent = _gated_agent(env)
    grant = _grant(env, agent["id"], model="o1-test", ttl_s=600)
    token = _token(env, agent)
    with contextlib.ExitStack() as stack:
        other = start_replica(stack, env.broker.settings)
        body = {"model": "o1-test", "messages": [{"role": "user", "content": "hi"}]}
        assert other.client.post("/v1/chat/completions", json=body,
                                 headers=_bearer(token)).status_code == 200
        resp = env.broker.client.post(f"/v1/admin/grants/{grant['id']}/revoke", json={},
                                      headers=env.broker.admin())
        assert resp.status_code == 200, resp.text
        took = wait_for(lambda: other.client.post(
            "/v1/chat/completions", json=body, headers=_bearer(token)).status_code == 401, 5,
            what="the other replica's refusal")
        print(f"grant revocation reached the other replica in {took:.3f} s")


# --- who may see what -------------------------------------------------------------------------


def _tenant_admin(broker: Broker, tenant_id: str) -> dict[str, str]:
    made = broker.create_workload(tenant_id, kind="admin", roles=["tenant-admin"])
    token = broker.token(made["client_id"], made["client_secret"])
    return _bearer(token)


def test_another_tenants_admin_gets_404_on_approvals_and_grants(env: Env) -> None:
    agent = _gated_agent(env)
    token = _token(env, agent)
    ap = _ask(env, token, model="o1-test", ttl_s=600).json()
    grant = _grant(env, agent["id"], budget_micros=1_000, ttl_s=600)
    stranger = _tenant_admin(env.broker, env.broker.create_tenant()["id"])
    c = env.broker.client
    for resp in (
        c.get(f"/v1/admin/approvals/{ap['id']}", headers=stranger),
        c.post(f"/v1/admin/approvals/{ap['id']}/approve", json={}, headers=stranger),
        c.post(f"/v1/admin/approvals/{ap['id']}/deny", json={}, headers=stranger),
        c.get(f"/v1/admin/grants/{grant['id']}", headers=stranger),
        c.post(f"/v1/admin/grants/{grant['id']}/revoke", json={}, headers=stranger),
        c.post("/v1/admin/grants", json={"workload_id": agent["id"], "budget_micros": 1,
                                         "ttl_s": 60}, headers=stranger),
    ):
        assert_problem(resp, 404, "not_found")
    assert c.get("/v1/admin/approvals", headers=stranger).json()["data"] == []
    assert c.get("/v1/admin/grants", headers=stranger).json()["data"] == []
    # Another workload sees none of this one's requests either.
    other = _token(env, env.agent())
    assert_problem(c.get(f"/v1/approvals/{ap['id']}", headers=_bearer(other)), 404, "not_found")


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    {"budget_micros": 1000, "ttl_s": 60, "colour": "red"},
    {"budget_micros": -1, "ttl_s": 60},
    {"budget_micros": 1000.0, "ttl_s": 60},
    {"budget_micros": 1e6, "ttl_s": 60},
    {"budget_micros": "1000", "ttl_s": 60},
    {"budget_micros": 1000, "ttl_s": 366 * 86_400},
    {"budget_micros": 1000, "ttl_s": 0},
    {"budget_micros": 1000},
    {"ttl_s": 60},
    {"model": "no-such-model", "ttl_s": 60},
    {"model": "gpt-test", "ttl_s": 60},
    {"rpm": 0, "ttl_s": 60},
    {"budget_micros": 1000, "ttl_s": 60, "reason": "bell\x07"},
], ids=["unknown-field", "negative-money", "float-money", "exponent-money", "string-money",
        "ttl-beyond-max", "ttl-zero", "no-ttl", "asks-nothing", "unknown-model",
        "model-not-behind-approval", "zero-rpm", "control-character"])
def test_bad_grants_and_requests_are_422(env: Env, body: dict[str, Any]) -> None:
    agent = _gated_agent(env)
    token = _token(env, agent)
    assert_problem(_ask(env, token, **body), 422, "validation_error")
    resp = env.broker.client.post("/v1/admin/grants", json={"workload_id": agent["id"], **body},
                                  headers=env.broker.admin())
    assert_problem(resp, 422, "validation_error")


def test_requests_need_a_live_broker_token(env: Env) -> None:
    resp = env.broker.client.post("/v1/approvals", json={"ttl_s": 60, "budget_micros": 1})
    assert_problem(resp, 401, "invalid_token")
