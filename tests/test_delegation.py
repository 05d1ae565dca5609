"""Delegation to sub-agents: a child token is an attenuation of its parent, never more.

Its models are a subset of the parent's, its slice is carved out of what remains of the
parent's, it expires no later than the parent, and it dies with any token above it, on every
replica. What it leaves unspent goes back into the parent's slice.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Any

import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.money import ledger
from broker.money.ledger import BudgetRef
from broker.storage.db import Database
from tests.conftest import SECRETS, Broker
from tests.gateway_support import Env, make_env
from tests.support import assert_oauth_error, wait_for
from tests.test_replicas import start_replica

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


def delegate(broker: Broker, parent: str, **params: Any) -> httpx.Response:
    resp: httpx.Response = broker.client.post("/v1/token", data={
        "grant_type": EXCHANGE, "subject_token": parent, "subject_token_type": ACCESS,
        **{k: str(v) for k, v in params.items()}})
    return resp


def child_of(broker: Broker, parent: str, **params: Any) -> str:
    resp = delegate(broker, parent, **params)
    assert resp.status_code == 200, resp.text
    return SECRETS.add(resp.json()["access_token"])


def claims(token: str) -> dict[str, Any]:
    out: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return out


def remaining(broker: Broker, token: str) -> int | None:
    body = broker.client.post("/v1/introspect", data={"token": token},
                              headers=broker.admin()).json()
    return body.get("budget_remaining_micros") if body["active"] else None


def chat(env: Env, token: str) -> httpx.Response:
    resp: httpx.Response = env.broker.client.post(
        "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {token}"})
    return resp


@pytest.fixture
def parent_env(env: Env) -> tuple[Env, dict[str, Any], str]:
    agent = env.agent(budget=1_000_000, models=["gpt-test", "claude-test"])
    return env, agent, env.broker.token(agent["client_id"], agent["client_secret"])


# --- what a child is -------------------------------------------------------------------------


def test_a_child_is_carved_out_of_its_parent_and_names_it(
        parent_env: tuple[Env, dict[str, Any], str]) -> None:
    env, agent, parent = parent_env
    child = child_of(env.broker, parent, scope="gpt-test", budget_micros=300_000, ttl_s=60)
    got, top = claims(child), claims(parent)
    assert got["sub"] == top["sub"] == agent["id"]
    assert got["models"] == ["gpt-test"]
    assert got["budget_micros"] == 300_000
    assert got["act"] == {"sub": top["sub"], "jti": top["jti"]}
    assert got["delegation_depth"] == 1
    assert got["exp"] <= top["exp"]
    # The parent's remaining dropped by the child's whole slice, at once.
    assert remaining(env.broker, parent) == 700_000
    assert remaining(env.broker, child) == 300_000


def test_a_child_spends_through_the_gateway_and_the_spend_climbs_to_the_root(
        parent_env: tuple[Env, dict[str, Any], str]) -> None:
    env, _agent, parent = parent_env
    child = child_of(env.broker, parent, budget_micros=300_000)
    grandchild = child_of(env.broker, child, budget_micros=100_000)
    assert claims(grandchild)["act"]["act"] == {"sub": claims(parent)["sub"],
                                                "jti": claims(parent)["jti"]}
    resp = chat(env, grandchild)
    assert resp.status_code == 200, resp.text
    (event,) = env.wait_for_events(1)
    cost = int(event["cost_micros"])
    assert cost > 0
    assert env.slice_of(grandchild)["spent_micros"] == cost
    assert env.slice_of(child)["spent_micros"] == cost
    assert env.slice_of(parent)["spent_micros"] == cost
    assert remaining(env.broker, parent) == 700_000


def test_without_an_amount_a_child_gets_half_of_what_remains(
        parent_env: tuple[Env, dict[str, Any], str]) -> None:
    env, _agent, parent = parent_env
    assert claims(child_of(env.broker, parent))["budget_micros"] == 500_000
    assert remaining(env.broker, parent) == 500_000


def test_a_child_never_outlives_its_parent(env: Env) -> None:
    agent = env.agent(token_ttl_s=60)
    parent = env.broker.token(agent["client_id"], agent["client_secret"])
    child = child_of(env.broker, parent, ttl_s=900, budget_micros=1)
    assert claims(child)["exp"] <= claims(parent)["exp"]


@pytest.mark.parametrize(("params", "status", "error"), [
    pytest.param({"scope": "gpt-test embed-test"}, 400, "invalid_scope", id="wider-models"),
    pytest.param({"scope": "*"}, 400, "invalid_scope", id="wildcard-wider-than-parent"),
    pytest.param({"budget_micros": 1_000_001}, 403, "budget_exhausted", id="more-than-remains"),
    pytest.param({"subject_token_type": "urn:x:unknown"}, 400, "invalid_request", id="unknown-type"),
    pytest.param({"subject_token": "not.a.token"}, 401, "invalid_client", id="garbage-parent"),
    pytest.param({"subject_token": "x" * 9000}, 401, "invalid_client", id="oversized-parent"),
    pytest.param({"actor_token_type": ACCESS}, 400, "invalid_request", id="actor-type-alone"),
    pytest.param({"client_secret": "s"}, 400, "invalid_request", id="secret-with-exchange"),
])
def test_refused_delegations(parent_env: tuple[Env, dict[str, Any], str],
                             params: dict[str, Any], status: int, error: str) -> None:
    env, _agent, parent = parent_env
    assert_oauth_error(delegate(env.broker, parent, **params), status, error)
    assert remaining(env.broker, parent) == 1_000_000


def test_the_depth_is_bounded(parent_env: tuple[Env, dict[str, Any], str]) -> None:
    env, _agent, token = parent_env
    for depth in range(1, env.broker.settings.tokens.max_delegation_depth + 1):
        token = child_of(env.broker, token, budget_micros=1000)
        assert claims(token)["delegation_depth"] == depth
    assert_oauth_error(delegate(env.broker, token, budget_micros=1), 400, "invalid_request")


def test_an_admin_token_cannot_be_delegated(env: Env) -> None:
    assert_oauth_error(delegate(env.broker, env.broker.admin_token()), 400, "invalid_request")


def test_another_workload_of_the_tenant_can_act_for_the_child(env: Env) -> None:
    tenant = env.broker.create_tenant()
    policy = {"models": ["gpt-test"], "token_budget_micros": 500_000,
              "rate": {"rpm": 10_000, "tpm": 10**9}}
    lead = env.broker.create_workload(tenant["id"], policy=policy)
    helper = env.broker.create_workload(tenant["id"], policy=policy)
    parent = env.broker.token(lead["client_id"], lead["client_secret"])
    actor = env.broker.token(helper["client_id"], helper["client_secret"])
    child = child_of(env.broker, parent, actor_token=actor, actor_token_type=ACCESS,
                     budget_micros=100_000)
    assert claims(child)["sub"] == helper["id"]
    assert claims(child)["act"]["sub"] == lead["id"]
    assert remaining(env.broker, parent) == 400_000
    # Suspending the delegating workload ends the child, though it is the helper's.
    resp = env.broker.client.post(f"/v1/admin/workloads/{lead['id']}/suspend",
                                  headers=env.broker.admin())
    assert resp.status_code == 200, resp.text
    assert chat(env, child).status_code == 401
    assert chat(env, actor).status_code == 200


def test_another_tenants_token_cannot_act(env: Env) -> None:
    mine, theirs = env.agent(), env.agent()
    parent = env.broker.token(mine["client_id"], mine["client_secret"])
    actor = env.broker.token(theirs["client_id"], theirs["client_secret"])
    assert_oauth_error(delegate(env.broker, parent, actor_token=actor, actor_token_type=ACCESS),
                       400, "invalid_request")


def test_a_child_carries_and_dies_with_its_parents_grants(env: Env) -> None:
    agent = env.agent(approval_models=["o1*"])
    grant = env.broker.client.post("/v1/admin/grants", headers=env.broker.admin(), json={
        "workload_id": agent["id"], "model": "o1-test", "ttl_s": 600, "reason": "eval"})
    assert grant.status_code == 201, grant.text
    parent = env.broker.token(agent["client_id"], agent["client_secret"])
    child = child_of(env.broker, parent, scope="gpt-test o1-test", budget_micros=1000)
    got = claims(child)
    assert got["grants"] == [grant.json()["id"]] and got["grant_models"] == ["o1-test"]
    assert got["grant_exp"] == claims(parent)["grant_exp"]
    narrower = claims(child_of(env.broker, parent, scope="gpt-test", budget_micros=1000))
    assert narrower["grant_models"] == []
    revoked = env.broker.client.post(f"/v1/admin/grants/{grant.json()['id']}/revoke",
                                     headers=env.broker.admin(), json={"reason": "done"})
    assert revoked.status_code == 200, revoked.text
    assert chat(env, child).status_code == 401


def test_an_actor_cannot_widen_beyond_its_own_policy(env: Env) -> None:
    tenant = env.broker.create_tenant()
    lead = env.broker.create_workload(tenant["id"], policy={
        "models": ["gpt-test", "claude-test"], "token_budget_micros": 500_000})
    helper = env.broker.create_workload(tenant["id"], policy={
        "models": ["gpt-test"], "token_budget_micros": 500_000})
    parent = env.broker.token(lead["client_id"], lead["client_secret"])
    actor = env.broker.token(helper["client_id"], helper["client_secret"])
    assert_oauth_error(delegate(env.broker, parent, actor_token=actor, actor_token_type=ACCESS,
                                scope="claude-test"), 400, "invalid_scope")


def test_delegations_count_toward_the_workloads_issuance_rate(
        make_live_broker: Any, sqlite_url: str, fake: Any) -> None:
    env = make_env(make_live_broker, sqlite_url, fake,
                   adjust=lambda sections: sections.setdefault("auth", {}).update(issuance_rpm=3))
    agent = env.agent()
    parent = env.broker.token(agent["client_id"], agent["client_secret"])
    answers = [delegate(env.broker, parent, budget_micros=1).status_code for _ in range(4)]
    assert answers[:2] == [200, 200] and answers[-1] == 429


def test_delegation_can_be_turned_off(make_live_broker: Any, sqlite_url: str, fake: Any) -> None:
    env = make_env(make_live_broker, sqlite_url, fake,
                   adjust=lambda sections: sections.setdefault("tokens", {}).update(
                       max_delegation_depth=0))
    agent = env.agent()
    parent = env.broker.token(agent["client_id"], agent["client_secret"])
    assert_oauth_error(delegate(env.broker, parent), 400, "invalid_request")


def test_concurrent_delegations_never_carve_more_than_the_parent_holds(both: Env) -> None:
    agent = both.agent(budget=1_000_000)
    parent = both.broker.token(agent["client_id"], agent["client_secret"])
    url = both.broker.url
    assert url is not None

    async def race() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            answers = await asyncio.gather(*(client.post("/v1/token", data={
                "grant_type": EXCHANGE, "subject_token": parent, "subject_token_type": ACCESS,
                "budget_micros": "100000"}) for _ in range(30)))
        for answer in answers:
            if answer.status_code == 200:
                SECRETS.add(answer.json()["access_token"])
        return [a.status_code for a in answers]

    statuses = asyncio.run(race())
    assert statuses.count(200) == 10
    assert set(statuses) == {200, 403}
    assert remaining(both.broker, parent) == 0
    children = both.query("SELECT SUM(budget_micros) AS total FROM token_slice WHERE parent_jti = :p",
                          p=claims(parent)["jti"])
    assert children[0]["total"] == 1_000_000


# --- revocation and the return of money ------------------------------------------------------


def test_revoking_the_parent_ends_every_descendant_and_returns_their_money(env: Env) -> None:
    agent = env.agent(budget=1_000_000, budgets=[{"period": "day", "limit_micros": 5_000_000}])
    parent = env.broker.token(agent["client_id"], agent["client_secret"])
    child = child_of(env.broker, parent, budget_micros=400_000)
    grandchild = child_of(env.broker, child, budget_micros=100_000)
    resp = env.broker.client.post(f"/v1/admin/tokens/{claims(parent)['jti']}/revoke",
                                  headers=env.broker.admin())
    assert resp.status_code == 200, resp.text
    assert chat(env, child).status_code == 401
    assert chat(env, grandchild).status_code == 401
    assert remaining(env.broker, grandchild) is None
    # Every slice of the tree is revoked and released; the workload's budgets hold nothing.
    for token in (parent, child, grandchild):
        row = env.slice_of(token)
        assert row["revoked_at"] is not None and row["released_at"] is not None
    held = env.query("SELECT reserved_micros FROM budget_counter WHERE scope_id = :w", w=agent["id"])
    assert len(held) == 1 and held[0]["reserved_micros"] == 0
    assert_oauth_error(delegate(env.broker, child), 401, "invalid_client")


def test_a_revoked_childs_unspent_part_returns_to_its_living_parent(
        parent_env: tuple[Env, dict[str, Any], str]) -> None:
    env, _agent, parent = parent_env
    child = child_of(env.broker, parent, budget_micros=400_000)
    assert chat(env, child).status_code == 200
    (event,) = env.wait_for_events(1)
    cost = int(event["cost_micros"])
    resp = env.broker.client.post(f"/v1/admin/tokens/{claims(child)['jti']}/revoke",
                                  headers=env.broker.admin())
    assert resp.status_code == 200, resp.text
    assert remaining(env.broker, parent) == 1_000_000 - cost
    assert chat(env, parent).status_code == 200


def test_an_expired_childs_unspent_part_returns_to_its_parent(env: Env) -> None:
    agent = env.agent(budget=1_000_000)
    parent = env.broker.token(agent["client_id"], agent["client_secret"])
    child_of(env.broker, parent, budget_micros=250_000, ttl_s=1)
    assert remaining(env.broker, parent) == 750_000
    # The sweeper releases the expired child (interval 0.2 s in tests) into the parent.
    wait_for(lambda: remaining(env.broker, parent) == 1_000_000, 10,
             what="the expired child's slice back in its parent")


def test_parent_revocation_reaches_a_child_on_another_replica(
        make_live_broker: Any, pg_url: str, fake: Any) -> None:
    env = make_env(make_live_broker, pg_url, fake)
    agent = env.agent()
    parent = env.broker.token(agent["client_id"], agent["client_secret"])
    with contextlib.ExitStack() as stack:
        other = start_replica(stack, env.broker.settings)
        child = child_of(other, parent, budget_micros=100_000)
        headers = {"authorization": f"Bearer {child}"}
        assert other.client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
        resp = env.broker.client.post(f"/v1/admin/tokens/{claims(parent)['jti']}/revoke",
                                      headers=env.broker.admin())
        assert resp.status_code == 200, resp.text
        wait_for(lambda: other.client.post("/v1/chat/completions", json=CHAT,
                                           headers=headers).status_code == 401, 5,
                 what="the child refused on the other replica")


# --- the property: no tree spends more than its root -----------------------------------------


@st.composite
def trees(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]], list[tuple[str, int, int]]]:
    """A root budget; children as (parent index, amount); then steps: ("spend", node, cost)
    or ("release", node, 0), in any order."""
    root = draw(st.integers(1, 10_000))
    nodes: list[tuple[int, int]] = []
    for _ in range(draw(st.integers(0, 8))):
        parent = draw(st.integers(0, len(nodes)))  # 0 is the root; i + 1 is nodes[i]
        nodes.append((parent, draw(st.integers(0, 5_000))))
    steps = draw(st.lists(st.tuples(st.sampled_from(["spend", "release"]),
                                    st.integers(0, len(nodes)), st.integers(0, 3_000)),
                          max_size=30))
    return root, nodes, steps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=trees())
def test_no_tree_of_delegations_spends_more_than_its_root_and_the_ledger_balances(
        db: Database, case: tuple[int, list[tuple[int, int]], list[tuple[str, int, int]]]) -> None:
    root_budget, nodes, steps = case
    now = int(time.time())
    tag = secrets.token_hex(4)
    workload = f"wl_{tag}"
    budgets = [BudgetRef("workload", workload, "total", 10**9)]
    jtis = [f"root-{tag}"]
    charged = 0

    def setup(conn: Any) -> None:
        ledger.reserve_slice(conn, jti=jtis[0], workload_id=workload, tenant_id="tn", amount=root_budget,
                             budgets=budgets, issued_at=now, expires_at=now + 300, max_live=None,
                             retry_after_s=1)
        for index, (parent, amount) in enumerate(nodes):
            jti = f"n{index}-{tag}"
            carved = ledger.reserve_child_slice(
                conn, jti=jti, parent=jtis[parent], workload_id=workload, tenant_id="tn",
                amount=amount, issued_at=now, expires_at=now + 300, max_live=None, retry_after_s=1)
            jtis.append(jti if carved else "")

    db.transaction(setup)
    for n, (action, node, cost) in enumerate(steps):
        jti = jtis[node]
        if not jti:
            continue

        def step(conn: Any, jti: str = jti, action: str = action, cost: int = cost, n: int = n) -> int:
            if action == "release":
                ledger.revoke_descendants(conn, [jti], now)
                ledger.release_slice(conn, jti, now)
                return 0
            hold = f"h{n}-{tag}"
            try:
                ledger.place_hold(conn, hold_id=hold, jti=jti, amount=cost, now=now)
            except Exception:
                return 0
            done = ledger.settle_hold(conn, hold_id=hold, cost=cost, event=_event(hold, jti, cost, now))
            return cost if done is not None else 0

        charged += db.transaction(step)

    def totals(conn: Any) -> tuple[int, int, int]:
        row = conn.exec_driver_sql(
            "SELECT reserved_micros, spent_micros FROM budget_counter WHERE scope_id = ?"
            if conn.dialect.name == "sqlite" else
            "SELECT reserved_micros, spent_micros FROM budget_counter WHERE scope_id = %s",
            (workload,)).one()
        spent_root = conn.exec_driver_sql(
            "SELECT spent_micros FROM token_slice WHERE jti = ?" if conn.dialect.name == "sqlite"
            else "SELECT spent_micros FROM token_slice WHERE jti = %s", (jtis[0],)).one()[0]
        return int(row[0]), int(row[1]), int(spent_root)

    reserved, spent, root_spent = db.transaction(totals)
    assert root_spent == charged <= root_budget
    # A live root's budget is reserved whole; its spending reaches the counter at its release.
    root_released = any(action == "release" and node == 0 for action, node, _ in steps)
    assert (reserved, spent) == ((0, root_spent) if root_released else (root_budget, 0))
    # Release everything, deepest first: every micro-dollar not spent comes back.

    def release_all(conn: Any) -> None:
        ledger.revoke_descendants(conn, [jtis[0]], now)
        ledger.release_slice(conn, jtis[0], now)

    db.transaction(release_all)
    reserved, spent, _ = db.transaction(totals)
    assert reserved == 0 and spent == charged


def _event(hold: str, jti: str, cost: int, now: int) -> dict[str, Any]:
    return {"id": hold, "request_id": hold, "ts": now, "tenant_id": "tn", "workload_id": "wl",
            "jti": jti, "model": "m", "provider": "p", "cost_micros": cost, "status": "ok"}
