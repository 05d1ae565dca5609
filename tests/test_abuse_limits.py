"""Limits no tenant can turn against another, and roles that hold: each test is named for a
finding of the attack on the landed code that it closes (roles, client addresses, issuance
floods, connection starvation, the smaller points). The server edge (slowloris, connection
floods) is specified in ``test_server_edge.py``, names in ``test_names.py``."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_SECRET, SECRETS, Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import Env, make_env
from tests.support import assert_problem, wait_for

PROMPT = [{"role": "user", "content": "hi"}]


def _token_form(workload: dict[str, Any], **extra: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "client_id": workload["client_id"],
            "client_secret": workload["client_secret"], **extra}


# --- finding 4: a tenant-admin cannot neutralise an identity above it ------------------------


def test_a_tenant_admin_cannot_patch_an_org_admin_or_auditor_of_its_tenant(broker: Broker) -> None:
    tenant = broker.create_tenant()
    ta = broker.create_workload(tenant["id"], kind="admin", roles=["tenant-admin"])
    headers = {"authorization": f"Bearer {broker.token(ta['client_id'], ta['client_secret'])}"}
    for roles in (["org-admin"], ["auditor"]):
        above = broker.create_workload(tenant["id"], kind="admin", roles=roles)
        changes: tuple[dict[str, Any], ...] = (
            {"roles": ["tenant-admin"]}, {"name": "renamed"}, {"policy": {}})
        for body in changes:
            resp = broker.client.patch(f"/v1/admin/workloads/{above['id']}", json=body,
                                       headers=headers)
            assert resp.status_code == 403, (roles, body, resp.text)
            assert resp.headers["content-type"].startswith("application/problem+json")
        # ...so it cannot then rotate its secret or suspend it either.
        for action in ("rotate-secret", "suspend"):
            resp = broker.client.post(f"/v1/admin/workloads/{above['id']}/{action}",
                                      headers=headers)
            assert resp.status_code == 403
        assert broker.client.get(f"/v1/admin/workloads/{above['id']}",
                                 headers=broker.admin()).json()["roles"] == roles


def test_a_tenant_admin_of_the_root_tenant_cannot_lock_out_the_bootstrap_admin(
        broker: Broker) -> None:
    ta = broker.create_workload("tn_root", kind="admin", roles=["tenant-admin"])
    headers = {"authorization": f"Bearer {broker.token(ta['client_id'], ta['client_secret'])}"}
    resp = broker.client.patch("/v1/admin/workloads/wl_admin", json={"roles": ["tenant-admin"]},
                               headers=headers)
    assert_problem(resp, 403, "forbidden")
    admin = broker.client.get("/v1/admin/workloads/wl_admin", headers=broker.admin()).json()
    assert admin["roles"] == ["org-admin"]
    assert broker.token("admin", ADMIN_SECRET)


# --- finding 5: a change of roles or policy reaches live tokens ------------------------------


def test_a_demoted_org_admin_loses_its_powers_at_once(broker: Broker) -> None:
    ops = broker.create_workload("tn_root", kind="admin", roles=["org-admin"])
    earlier = broker.token(ops["client_id"], ops["client_secret"])
    mine = {"authorization": f"Bearer {earlier}"}
    created = broker.client.post("/v1/admin/tenants", json={"name": f"t-{secrets.token_hex(3)}"},
                                 headers=mine)
    assert created.status_code == 201 and created.json()["id"].startswith("tn_"), created.text
    resp = broker.client.patch(f"/v1/admin/workloads/{ops['id']}",
                               json={"roles": ["tenant-admin"]}, headers=broker.admin())
    assert resp.status_code == 200 and resp.json()["roles"] == ["tenant-admin"], resp.text
    # The token issued before the change is dead: not a tenant-admin's, not an org-admin's.
    assert_problem(broker.client.post("/v1/admin/tenants", headers=mine,
                                      json={"name": f"t-{secrets.token_hex(3)}"}),
                   401, "invalid_token")
    assert_problem(broker.client.post("/v1/admin/workloads/wl_admin/rotate-secret",
                                      headers=mine), 401, "invalid_token")
    # A token issued after the change carries the new role, and lives.
    after = broker.token(ops["client_id"], ops["client_secret"])
    assert_problem(broker.client.post("/v1/admin/tenants", json={"name": f"t-{secrets.token_hex(3)}"},
                                      headers={"authorization": f"Bearer {after}"}), 403, "forbidden")


def test_a_policy_change_ends_live_tokens_and_returns_their_slices(broker: Broker) -> None:
    tenant = broker.create_tenant(budgets=[{"period": "total", "limit_micros": 10_000}])
    agent = broker.create_workload(tenant["id"], policy={"models": ["m"],
                                                         "token_budget_micros": 4_000})
    token = broker.token(agent["client_id"], agent["client_secret"])
    resp = broker.client.patch(f"/v1/admin/workloads/{agent['id']}", headers=broker.admin(),
                               json={"policy": {"models": ["m"], "token_budget_micros": 1_000}})
    assert resp.status_code == 200
    introspected = broker.client.post("/v1/introspect", data={"token": token},
                                      headers=broker.admin()).json()
    assert introspected == {"active": False}
    with broker.services.db.engine.connect() as conn:
        from sqlalchemy import text

        reserved = conn.execute(text(
            "SELECT reserved_micros FROM budget_counter WHERE scope = 'tenant'")).scalar_one()
    assert reserved == 0
    # A name change alone is no new identity: tokens live on.
    fresh = broker.token(agent["client_id"], agent["client_secret"])
    assert broker.client.patch(f"/v1/admin/workloads/{agent['id']}", headers=broker.admin(),
                               json={"name": "renamed"}).status_code == 200
    assert broker.client.post("/v1/introspect", data={"token": fresh},
                              headers=broker.admin()).json()["active"] is True


# --- finding 6: X-Forwarded-For is believed only from trusted proxies ------------------------


def test_forwarded_for_from_an_untrusted_peer_cannot_dodge_slow_down(
        make_live_broker: Callable[..., Broker], sqlite_url: str) -> None:
    broker = make_live_broker(sqlite_url)
    tenant = broker.create_tenant()
    agent = broker.create_workload(tenant["id"], policy={"models": ["m"]})
    codes = []
    for i in range(14):
        resp = broker.client.post("/v1/token", data=_token_form(agent, client_secret="wrong"),
                                  headers={"x-forwarded-for": f"198.51.100.{i}"})
        codes.append(resp.status_code)
    assert codes[:10] == [401] * 10 and set(codes[10:]) == {429}


def test_forwarded_for_from_a_trusted_proxy_names_the_client_and_must_be_an_ip(
        make_live_broker: Callable[..., Broker], sqlite_url: str,
        fake: FakeProviderServer) -> None:
    env = make_env(make_live_broker, sqlite_url, fake,
                   adjust=lambda s: s.setdefault("server", {}).update(
                       trusted_proxies=["127.0.0.0/8"]))
    token = env.token()
    assert env.broker.url
    url = env.broker.url + "/v1/chat/completions"
    body = {"model": "gpt-test", "messages": PROMPT, "max_tokens": 2}
    auth = {"authorization": f"Bearer {token}"}
    ok = httpx.post(url, json=body, headers={**auth, "x-forwarded-for": "203.0.113.9, 127.0.0.1"})
    assert ok.status_code == 200
    assert env.events()[0]["client_ip"] == "203.0.113.9"
    for hostile in ("<script>alert(1)</script>", "203.0.113.9, not-an-ip", "1.2.3.4.5"):
        resp = httpx.post(url, json=body, headers={**auth, "x-forwarded-for": hostile})
        assert resp.status_code == 400, hostile
        assert resp.json()["error"]["code"] == "invalid_request"
    assert len(env.events()) == 1


def test_without_trusted_proxies_the_usage_record_keeps_the_peer_address(
        make_live_broker: Callable[..., Broker], sqlite_url: str,
        fake: FakeProviderServer) -> None:
    env = make_env(make_live_broker, sqlite_url, fake)
    token = env.token()
    assert env.broker.url
    resp = httpx.post(env.broker.url + "/v1/chat/completions",
                      json={"model": "gpt-test", "messages": PROMPT, "max_tokens": 2},
                      headers={"authorization": f"Bearer {token}",
                               "x-forwarded-for": "<script>alert(1)</script>"})
    assert resp.status_code == 200
    assert env.events()[0]["client_ip"] == "127.0.0.1"


# --- finding 7: issuance cannot pin the budgets of others ------------------------------------


def test_issuance_is_rate_limited_per_client(make_broker: Callable[..., Broker],
                                             sqlite_url: str) -> None:
    broker = make_broker(sqlite_url, auth={"issuance_rpm": 5})
    tenant = broker.create_tenant()
    agent = broker.create_workload(tenant["id"], policy={"models": ["m"],
                                                         "token_budget_micros": 1})
    codes = [broker.client.post("/v1/token", data=_token_form(agent)).status_code
             for _ in range(7)]
    assert codes == [200] * 5 + [429] * 2
    refused = broker.client.post("/v1/token", data=_token_form(agent))
    assert refused.json()["error"] == "slow_down" and int(refused.headers["retry-after"]) >= 1
    # Another client is not affected.
    other = broker.create_workload(tenant["id"], policy={"models": ["m"]})
    assert broker.client.post("/v1/token", data=_token_form(other)).status_code == 200


def test_a_workload_cannot_hold_more_live_tokens_than_its_policy_and_others_keep_their_budget(
        make_broker: Callable[..., Broker], sqlite_url: str) -> None:
    slice_micros = 100_000
    broker = make_broker(sqlite_url, org={"budgets": [
        {"period": "month", "limit_micros": 5 * slice_micros}]})
    flooder_tenant, victim_tenant = broker.create_tenant(), broker.create_tenant()
    flooder = broker.create_workload(flooder_tenant["id"], policy={
        "models": ["m"], "token_budget_micros": slice_micros, "max_live_tokens": 3})
    codes = [broker.client.post("/v1/token", data=_token_form(flooder)).status_code
             for _ in range(10)]
    assert codes == [200] * 3 + [429] * 7
    victim = broker.create_workload(victim_tenant["id"], policy={
        "models": ["m"], "token_budget_micros": slice_micros})
    assert broker.client.post("/v1/token", data=_token_form(victim)).status_code == 200
    # Agents get a cap by default, without any policy saying so.
    default = broker.create_workload(flooder_tenant["id"], policy={"models": ["m"],
                                                                   "token_budget_micros": 0})
    assert {broker.client.post("/v1/token", data=_token_form(default)).status_code
            for _ in range(21)} == {200, 429}


def test_released_slices_are_pruned_after_the_retention(
        make_broker: Callable[..., Broker], sqlite_url: str) -> None:
    broker = make_broker(sqlite_url, sweeper={"interval_s": 60, "slice_retention_s": 10})
    tenant = broker.create_tenant()
    agent = broker.create_workload(tenant["id"], policy={"models": ["m"], "token_ttl_s": 1,
                                                         "token_budget_micros": 10})
    for _ in range(3):
        broker.token(agent["client_id"], agent["client_secret"])
    now = int(time.time())

    def count() -> int:
        with broker.services.db.engine.connect() as conn:
            from sqlalchemy import text

            return int(conn.execute(text("SELECT count(*) FROM token_slice WHERE workload_id = :w"),
                                    {"w": agent["id"]}).scalar_one())

    broker.sweep(now=now + 5)  # expired: released, kept for the retention
    assert count() == 3
    broker.sweep(now=now + 5 + 11)
    assert count() == 0
    # The live-token counter came back down with the releases.
    assert broker.client.post("/v1/token", data=_token_form(agent)).status_code == 200


# --- finding 8: one tenant or provider cannot starve the others ------------------------------


def _hold_streams(url: str, token: str, model: str, n: int) -> list[threading.Thread]:
    """``n`` slow streams held open in threads (they end when the fake's answer does)."""

    def run() -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                          json={"model": model, "messages": PROMPT, "stream": True},
                          headers={"authorization": f"Bearer {token}"}) as resp:
            for _ in resp.iter_lines():
                pass

    threads = [threading.Thread(target=run, daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    return threads


def _wait_running(env: Env, n: int) -> None:
    wait_for(lambda: len(env.fake.state.requests) >= n,
             what=lambda: f"{n} streams at the provider (seen: {len(env.fake.state.requests)})")


def test_a_tenant_beyond_its_concurrency_cap_waits_and_another_tenant_is_served(
        make_live_broker: Callable[..., Broker], sqlite_url: str,
        fake: FakeProviderServer) -> None:
    env = make_env(make_live_broker, sqlite_url, fake,
                   adjust=lambda s: s["gateway"].update(tenant_max_concurrent=2))
    fake.state.faults.chunk_delay_s = 0.2  # each stream lasts about three seconds
    greedy, other = env.token(), env.token()
    assert env.broker.url
    threads = _hold_streams(env.broker.url, greedy, "gpt-test", 2)
    _wait_running(env, 2)
    body = {"model": "gpt-test", "messages": PROMPT, "max_tokens": 2}
    refused = httpx.post(env.broker.url + "/v1/chat/completions", json=body,
                         headers={"authorization": f"Bearer {greedy}"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    served = httpx.post(env.broker.url + "/v1/chat/completions", json=body,
                        headers={"authorization": f"Bearer {other}"})
    assert served.status_code == 200
    for thread in threads:
        thread.join(30)


def test_a_workload_beyond_its_max_concurrent_gets_429(
        make_live_broker: Callable[..., Broker], sqlite_url: str,
        fake: FakeProviderServer) -> None:
    env = make_env(make_live_broker, sqlite_url, fake)
    fake.state.faults.chunk_delay_s = 0.2
    token = env.token(max_concurrent=1)
    assert env.broker.url
    threads = _hold_streams(env.broker.url, token, "gpt-test", 1)
    _wait_running(env, 1)
    resp = httpx.post(env.broker.url + "/v1/chat/completions", timeout=30,
                      json={"model": "gpt-test", "messages": PROMPT, "max_tokens": 2},
                      headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 429 and "retry-after" in resp.headers
    for thread in threads:
        thread.join(30)


def test_one_provider_pool_held_full_does_not_starve_another_provider(
        make_live_broker: Callable[..., Broker], sqlite_url: str,
        fake: FakeProviderServer) -> None:
    env = make_env(make_live_broker, sqlite_url, fake,
                   adjust=lambda s: s["providers"]["fake-openai"].update(max_connections=2))
    fake.state.faults.chunk_delay_s = 0.2
    token = env.token()
    assert env.broker.url
    threads = _hold_streams(env.broker.url, token, "gpt-test", 2)
    _wait_running(env, 2)
    # fake-compat is another provider (on the same upstream host): its own pool is free.
    started = time.monotonic()
    resp = httpx.post(env.broker.url + "/v1/chat/completions", timeout=30,
                      json={"model": "compat-test", "messages": PROMPT, "max_tokens": 2},
                      headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200
    assert time.monotonic() - started < 2.5  # served before the held streams end
    for thread in threads:
        thread.join(30)


# --- finding 12: the smaller points ----------------------------------------------------------


def test_metrics_need_the_metrics_token_when_one_is_set(make_broker: Callable[..., Broker],
                                                         sqlite_url: str) -> None:
    metrics_token = SECRETS.add("mt-" + secrets.token_urlsafe(24))
    broker = make_broker(sqlite_url, metrics={"token": metrics_token})
    for headers in ({}, {"authorization": "Bearer wrong"},
                    {"authorization": f"Bearer {broker.cached_admin_token()}"}):
        resp = broker.client.get("/metrics", headers=headers)
        assert resp.status_code == 401
        assert resp.headers["content-type"].startswith("application/problem+json")
    resp = broker.client.get("/metrics", headers={"authorization": f"Bearer {metrics_token}"})
    assert resp.status_code == 200 and "broker_http_requests_total" in resp.text


@pytest.mark.parametrize("name", ["resource", "audience"])
def test_a_token_for_another_resource_is_refused_with_invalid_target(broker: Broker,
                                                                     name: str) -> None:
    tenant = broker.create_tenant()
    agent = broker.create_workload(tenant["id"], policy={"models": ["m"]})
    other = broker.client.post("/v1/token", data=_token_form(agent, **{
        name: "https://api.other.example"}))
    assert other.status_code == 400 and other.json()["error"] == "invalid_target"
    for own in (broker.settings.issuer.audience, broker.settings.issuer.url):
        assert broker.client.post("/v1/token", data=_token_form(agent, **{
            name: own})).status_code == 200


def test_rotate_secret_with_no_grace_ends_the_old_secret_at_once(broker: Broker) -> None:
    tenant = broker.create_tenant()
    agent = broker.create_workload(tenant["id"], policy={"models": ["m"]})
    resp = broker.client.post(f"/v1/admin/workloads/{agent['id']}/rotate-secret",
                              json={"grace_s": 0, "reason": "leaked"}, headers=broker.admin())
    assert resp.status_code == 200, resp.text
    new = SECRETS.add(resp.json()["client_secret"])
    old = broker.client.post("/v1/token", data=_token_form(agent))
    assert old.status_code == 401 and old.json()["error"] == "invalid_client"
    assert broker.client.post("/v1/token", data=_token_form(
        agent, client_secret=new)).status_code == 200
    bad = broker.client.post(f"/v1/admin/workloads/{agent['id']}/rotate-secret",
                             json={"grace_s": -1}, headers=broker.admin())
    assert "grace_s" in assert_problem(bad, 422, "validation_error")["detail"]
