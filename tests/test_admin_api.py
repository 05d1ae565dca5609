"""The admin API: CRUD of tenants and workloads, the bootstrap admin, and the three roles.

Role rules (API.md, "Identities"): ``org-admin`` does everything; ``tenant-admin`` sees only its
own tenant, and any other tenant's object is answered 404, never 403, so ids cannot be probed;
``auditor`` reads every tenant and writes nothing. Non-admin tokens get 403 on every admin route.
The isolation tests walk the app's own routing table, so an admin route added later is covered.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from pydantic import SecretStr
from sqlalchemy import text
from starlette.routing import Route

from broker.devvault import DevVault
from broker.services import Services
from tests.conftest import ADMIN_SECRET, SECRETS, Broker, BrokerFactory, make_settings
from tests.support import assert_oauth_error, assert_problem

PROBLEM = "application/problem+json"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def admin_routes(broker: Broker) -> list[tuple[str, str]]:
    """(method, template) of every admin route of the running app."""
    out = []
    for route in broker.client._inner.app.router.routes:
        assert isinstance(route, Route)
        if route.path.startswith("/v1/admin"):
            out += [(m, route.path) for m in sorted(route.methods or ()) if m != "HEAD"]
    assert len(out) >= 10
    return out


def fill(template: str, ids: dict[str, str]) -> str | None:
    """The template with each path parameter naming the object its collection segment names;
    None when a parameter names something ``ids`` does not hold."""
    missing = False

    def one(match: re.Match[str]) -> str:
        nonlocal missing
        collection = template[: match.start()].rstrip("/").rsplit("/", 1)[-1]
        if collection not in ids:
            missing = True
            return "x"
        return ids[collection]

    url = re.sub(r"\{[^}]+\}", one, template)
    return None if missing else url



def request(broker: Broker, method: str, url: str, token: str | None) -> Any:
    headers = bearer(token) if token is not None else {}
    body = b"{}" if method in ("POST", "PATCH", "PUT") else None
    return broker.client.request(method, url, headers={**headers, "content-type": "application/json"},
                                 content=body)


@dataclass
class Org:
    """Two tenants with an agent each, and admins of every role."""

    broker: Broker
    a: dict[str, Any]
    b: dict[str, Any]
    agent_a: dict[str, Any]
    agent_b: dict[str, Any]
    token_b: str
    tenant_admin: str  # tenant-admin of A
    auditor: str

    @property
    def jti_b(self) -> str:
        return str(jwt.decode(self.token_b, options={"verify_signature": False})["jti"])

    def others(self) -> dict[str, str]:
        """B's objects, by the collection that names them."""
        return {"tenants": self.b["id"], "workloads": self.agent_b["id"], "tokens": self.jti_b}


def make_org(broker: Broker) -> Org:
    a, b = broker.create_tenant(), broker.create_tenant()
    policy = {"models": ["gpt-4o-mini"], "token_budget_micros": 1000}
    agent_a = broker.create_workload(a["id"], policy=policy)
    agent_b = broker.create_workload(b["id"], policy=policy)
    ta = broker.create_workload(a["id"], kind="admin", roles=["tenant-admin"])
    aud = broker.create_workload(a["id"], kind="admin", roles=["auditor"])
    return Org(
        broker, a, b, agent_a, agent_b,
        token_b=broker.token(agent_b["client_id"], agent_b["client_secret"]),
        tenant_admin=broker.token(ta["client_id"], ta["client_secret"]),
        auditor=broker.token(aud["client_id"], aud["client_secret"]),
    )


@pytest.fixture
def org(broker: Broker) -> Org:
    return make_org(broker)


# --- org-admin: CRUD -----------------------------------------------------------------------


def test_org_admin_creates_reads_updates_and_deletes_a_tenant(broker: Broker) -> None:
    c, h = broker.client, broker.admin()
    budgets = [{"period": "day", "limit_micros": 5_000_000}]
    resp = c.post("/v1/admin/tenants", json={"name": "acme", "budgets": budgets}, headers=h)
    assert resp.status_code == 201, resp.text
    tenant = resp.json()
    assert tenant["id"].startswith("tn_") and tenant["name"] == "acme"
    assert tenant["budgets"] == budgets and tenant["suspended"] is False
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", tenant["created_at"])

    assert c.get(f"/v1/admin/tenants/{tenant['id']}", headers=h).json() == tenant
    listed = c.get("/v1/admin/tenants", headers=h).json()
    assert tenant in listed["data"] and listed["next_cursor"] is None

    resp = c.patch(f"/v1/admin/tenants/{tenant['id']}", json={"name": "acme-2"}, headers=h)
    assert resp.status_code == 200 and resp.json()["name"] == "acme-2"
    assert resp.json()["budgets"] == budgets  # a PATCH changes only what it names
    resp = c.patch(f"/v1/admin/tenants/{tenant['id']}", json={"budgets": []}, headers=h)
    assert resp.json()["budgets"] == [] and resp.json()["name"] == "acme-2"

    assert c.delete(f"/v1/admin/tenants/{tenant['id']}", headers=h).status_code == 204
    assert_problem(c.get(f"/v1/admin/tenants/{tenant['id']}", headers=h), 404)
    assert_problem(c.delete(f"/v1/admin/tenants/{tenant['id']}", headers=h), 404)


def test_org_admin_creates_reads_updates_and_deletes_a_workload(broker: Broker) -> None:
    c, h = broker.client, broker.admin()
    tenant = broker.create_tenant()
    policy = {"models": ["gpt-4o-mini", "claude-*"], "approval_models": ["o1*"],
              "token_ttl_s": 300, "token_budget_micros": 1_000_000,
              "budgets": [{"period": "day", "limit_micros": 5_000_000},
                          {"period": "month", "limit_micros": 50_000_000}],
              "rate": {"rpm": 60, "tpm": 200_000},
              "burst": {"window_s": 60, "limit_micros": 500_000}}
    resp = c.post("/v1/admin/workloads", json={"tenant_id": tenant["id"], "name": "bot",
                                               "kind": "agent", "policy": policy}, headers=h)
    assert resp.status_code == 201, resp.text
    assert resp.headers["cache-control"] == "no-store"
    created = resp.json()
    SECRETS.add(created["client_secret"])
    assert created["id"].startswith("wl_") and created["client_id"]
    assert created["client_secret"].startswith("bks_")
    # Unset fields stay unset (the kind's defaults apply); lists default to empty.
    assert created["policy"] == {**policy, "approval_tools": []}
    assert created["kind"] == "agent" and created["roles"] == []

    got = c.get(f"/v1/admin/workloads/{created['id']}", headers=h).json()
    assert "client_secret" not in got and "secret_hash" not in got
    assert created["client_secret"] not in json.dumps(got)
    assert got == {k: v for k, v in created.items() if k != "client_secret"}

    listed = c.get(f"/v1/admin/workloads?tenant_id={tenant['id']}", headers=h).json()
    assert [w["id"] for w in listed["data"]] == [created["id"]]
    assert created["client_secret"] not in json.dumps(listed)

    resp = c.patch(f"/v1/admin/workloads/{created['id']}",
                   json={"policy": {"models": ["gpt-4o-mini"]}}, headers=h)
    assert resp.status_code == 200, resp.text
    assert resp.json()["policy"] == {"models": ["gpt-4o-mini"], "approval_models": [],
                                     "budgets": [], "approval_tools": []}
    assert resp.json()["name"] == "bot"

    assert c.delete(f"/v1/admin/workloads/{created['id']}", headers=h).status_code == 204
    assert_problem(c.get(f"/v1/admin/workloads/{created['id']}", headers=h), 404)
    # A deleted workload's secret no longer gets a token.
    resp = c.post("/v1/token", data={"grant_type": "client_credentials",
                                     "client_id": created["client_id"],
                                     "client_secret": created["client_secret"]})
    assert resp.status_code == 401


def test_deleting_a_tenant_with_workloads_conflicts(broker: Broker) -> None:
    tenant = broker.create_tenant()
    agent = broker.create_workload(tenant["id"])
    body = assert_problem(broker.client.delete(f"/v1/admin/tenants/{tenant['id']}",
                                        headers=broker.admin()), 409)
    assert "workloads" in body["detail"]
    assert broker.client.delete(f"/v1/admin/workloads/{agent['id']}",
                                headers=broker.admin()).status_code == 204
    assert broker.client.delete(f"/v1/admin/tenants/{tenant['id']}",
                                headers=broker.admin()).status_code == 204


def test_names_are_unique_where_the_spec_scopes_them(broker: Broker) -> None:
    c, h = broker.client, broker.admin()
    a = broker.create_tenant("same")
    assert_problem(c.post("/v1/admin/tenants", json={"name": "same"}, headers=h), 409)
    b = broker.create_tenant()
    assert_problem(c.patch(f"/v1/admin/tenants/{b['id']}", json={"name": "same"}, headers=h), 409)
    broker.create_workload(a["id"], name="bot")
    assert_problem(c.post("/v1/admin/workloads", json={"tenant_id": a["id"], "name": "bot",
                                                "kind": "agent"}, headers=h), 409)
    broker.create_workload(b["id"], name="bot")  # another tenant may reuse the name


def test_an_admin_cannot_delete_itself(broker: Broker) -> None:
    assert_problem(broker.client.delete("/v1/admin/workloads/wl_admin", headers=broker.admin()), 409)


def test_creating_a_workload_in_an_unknown_tenant_is_not_found(broker: Broker) -> None:
    resp = broker.client.post("/v1/admin/workloads", headers=broker.admin(), json={
        "tenant_id": "tn_nothing", "name": "bot", "kind": "agent"})
    assert_problem(resp, 404)


# --- the bootstrap admin -------------------------------------------------------------------


def _admins(svc: Services) -> list[Any]:
    with svc.db.engine.connect() as conn:
        return list(conn.execute(text("SELECT id, client_id FROM workload WHERE kind = 'admin'")))


def test_bootstrap_admin_is_created_once_and_never_replaced(
    make_broker: BrokerFactory, db_url: str, vault: DevVault
) -> None:
    # Without the variable nothing is created.
    quiet = make_settings(db_url, vault).model_copy(update={"bootstrap_admin_secret": None})
    svc = Services.build(quiet)
    assert _admins(svc) == []
    svc.close()

    broker = make_broker(db_url)
    settings = broker.settings
    claims = jwt.decode(broker.admin_token(), options={"verify_signature": False})
    assert claims["sub"] == "wl_admin" and claims["kind"] == "admin"
    assert claims["roles"] == ["org-admin"]
    assert [tuple(r) for r in _admins(broker.services)] == [("wl_admin", "admin")]
    with broker.services.db.engine.connect() as conn:
        stored = conn.execute(text("SELECT secret_hash FROM workload WHERE id = 'wl_admin'")
                              ).scalar_one()
    assert ADMIN_SECRET not in stored

    # A restart with another secret neither adds an admin nor replaces the first one's secret.
    other = "bootstrap-" + secrets.token_urlsafe(32)
    SECRETS.add(other)
    again = Services.build(settings.model_copy(update={"bootstrap_admin_secret": SecretStr(other)}))
    again.close()
    assert len(_admins(broker.services)) == 1
    resp = broker.client.post("/v1/token", data={"grant_type": "client_credentials",
                                                 "client_id": "admin", "client_secret": other})
    assert_oauth_error(resp, 401, "invalid_client")
    assert broker.admin_token()


# --- tenant-admin --------------------------------------------------------------------------


def test_tenant_admin_gets_404_for_every_object_of_another_tenant(org: Org) -> None:
    broker, others = org.broker, org.others()
    before = {
        "tenant": broker.client.get(f"/v1/admin/tenants/{org.b['id']}", headers=broker.admin()).json(),
        "workload": broker.client.get(f"/v1/admin/workloads/{org.agent_b['id']}",
                                      headers=broker.admin()).json(),
    }
    tried = 0
    for method, template in admin_routes(broker):
        if "{" not in template:
            continue
        url = fill(template, others)
        if url is None:
            continue  # names nothing a tenant owns (a provider, a key)
        resp = request(broker, method, url, org.tenant_admin)
        assert_problem(resp, 404)
        # The same answer as for an id that does not exist at all: nothing is learned.
        unknown = re.sub(r"/(tn|wl)_[0-9a-f]+", r"/\1_0000000000000000", url).replace(
            org.jti_b, "nonexistentjti")
        assert request(broker, method, unknown, org.tenant_admin).json()["detail"] == \
            resp.json()["detail"], (method, template)
        tried += 1
    assert tried >= 5

    # Naming B in a body or a filter is not found either, and nothing of B changed.
    resp = broker.client.post("/v1/admin/workloads", headers=bearer(org.tenant_admin), json={
        "tenant_id": org.b["id"], "name": "intruder", "kind": "agent"})
    assert_problem(resp, 404)
    resp = broker.client.get(f"/v1/admin/workloads?tenant_id={org.b['id']}",
                             headers=bearer(org.tenant_admin))
    assert resp.status_code == 200 and resp.json()["data"] == []
    for name, url in (("tenant", f"/v1/admin/tenants/{org.b['id']}"),
                      ("workload", f"/v1/admin/workloads/{org.agent_b['id']}")):
        assert broker.client.get(url, headers=broker.admin()).json() == before[name]
    resp = broker.client.post("/v1/introspect", data={"token": org.token_b}, headers=broker.admin())
    assert resp.json()["active"] is True


def test_tenant_admin_lists_hold_only_its_tenant(org: Org) -> None:
    broker = org.broker
    listed = 0
    for method, template in admin_routes(broker):
        if method != "GET" or "{" in template:
            continue
        # The usage export names its format (the only one is csv): without it, a 400.
        url = template + ("?format=csv" if template.endswith("/usage/export") else "")
        resp = broker.client.get(url, headers=bearer(org.tenant_admin))
        if resp.status_code == 403:
            continue  # an org-only list (none may leak by answering 200 with B in it)
        assert resp.status_code == 200, (template, resp.text)
        raw = resp.text
        for secret_id in (org.b["id"], org.agent_b["id"]):
            assert secret_id not in raw, (template, secret_id)
        listed += 1
    assert listed >= 2
    tenants = broker.client.get("/v1/admin/tenants", headers=bearer(org.tenant_admin)).json()
    assert [t["id"] for t in tenants["data"]] == [org.a["id"]]
    workloads = broker.client.get("/v1/admin/workloads", headers=bearer(org.tenant_admin)).json()
    assert {w["tenant_id"] for w in workloads["data"]} == {org.a["id"]}
    assert org.agent_a["id"] in {w["id"] for w in workloads["data"]}


def test_tenant_admin_manages_workloads_of_its_own_tenant(org: Org) -> None:
    c, h = org.broker.client, bearer(org.tenant_admin)
    resp = c.post("/v1/admin/workloads", headers=h, json={
        "tenant_id": org.a["id"], "name": "helper", "kind": "service"})
    assert resp.status_code == 201, resp.text
    SECRETS.add(resp.json()["client_secret"])
    wid = resp.json()["id"]
    assert resp.json()["tenant_id"] == org.a["id"] and resp.json()["kind"] == "service"
    renamed = c.patch(f"/v1/admin/workloads/{wid}", json={"name": "helper-2"}, headers=h)
    assert renamed.status_code == 200 and renamed.json()["name"] == "helper-2", renamed.text
    own = c.get(f"/v1/admin/tenants/{org.a['id']}", headers=h)
    assert own.status_code == 200 and own.json()["id"] == org.a["id"], own.text
    gone = c.delete(f"/v1/admin/workloads/{wid}", headers=h)
    assert gone.status_code == 204 and gone.content == b""
    assert_problem(c.get(f"/v1/admin/workloads/{wid}", headers=h), 404)


def test_tenant_admin_cannot_touch_tenants_themselves(org: Org) -> None:
    c, h = org.broker.client, bearer(org.tenant_admin)
    assert_problem(c.post("/v1/admin/tenants", json={"name": "mine"}, headers=h), 403)
    assert_problem(c.patch(f"/v1/admin/tenants/{org.a['id']}", json={"name": "renamed"}, headers=h), 403)
    assert_problem(c.delete(f"/v1/admin/tenants/{org.a['id']}", headers=h), 403)


@pytest.mark.parametrize("roles", [["org-admin"], ["auditor"], ["tenant-admin", "auditor"],
                                   ["tenant-admin", "org-admin"]])
def test_tenant_admin_cannot_grant_wider_roles(org: Org, roles: list[str]) -> None:
    c, h = org.broker.client, bearer(org.tenant_admin)
    resp = c.post("/v1/admin/workloads", headers=h, json={
        "tenant_id": org.a["id"], "name": f"boss-{secrets.token_hex(3)}", "kind": "admin",
        "roles": roles})
    assert_problem(resp, 403)
    created = c.post("/v1/admin/workloads", headers=h, json={
        "tenant_id": org.a["id"], "name": f"peer-{secrets.token_hex(3)}", "kind": "admin",
        "roles": ["tenant-admin"]})
    assert created.status_code == 201, created.text
    SECRETS.add(created.json()["client_secret"])
    assert_problem(c.patch(f"/v1/admin/workloads/{created.json()['id']}", json={"roles": roles},
                    headers=h), 403)
    assert c.get(f"/v1/admin/workloads/{created.json()['id']}", headers=h).json()["roles"] == \
        ["tenant-admin"]


# --- auditor -------------------------------------------------------------------------------


def test_auditor_reads_every_tenant_and_writes_nothing(org: Org) -> None:
    broker, h = org.broker, bearer(org.auditor)
    tenants = broker.client.get("/v1/admin/tenants", headers=h).json()
    assert {org.a["id"], org.b["id"]} <= {t["id"] for t in tenants["data"]}
    assert broker.client.get(f"/v1/admin/tenants/{org.b['id']}", headers=h).status_code == 200
    assert broker.client.get(f"/v1/admin/workloads/{org.agent_b['id']}",
                             headers=h).status_code == 200
    workloads = broker.client.get("/v1/admin/workloads", headers=h).json()
    assert org.agent_b["id"] in {w["id"] for w in workloads["data"]}

    snapshot = broker.client.get("/v1/admin/workloads?limit=1000", headers=broker.admin()).json()
    writes = 0
    for method, template in admin_routes(broker):
        if method == "GET":
            continue
        url = fill(template, org.others()) or template.replace("{", "").replace("}", "")
        assert_problem(request(broker, method, url, org.auditor), 403)
        writes += 1
    assert writes >= 6
    assert_problem(broker.client.post("/v1/admin/tenants", json={"name": "x"}, headers=h), 403)
    assert broker.client.get("/v1/admin/workloads?limit=1000",
                             headers=broker.admin()).json() == snapshot


# --- non-admin tokens ----------------------------------------------------------------------


def test_non_admin_tokens_are_refused_on_every_admin_route(org: Org) -> None:
    broker = org.broker
    tokens = {"agent": broker.token(org.agent_a["client_id"], org.agent_a["client_secret"])}
    for kind in ("service", "interactive"):
        w = broker.create_workload(org.a["id"], kind=kind)
        tokens[kind] = broker.token(w["client_id"], w["client_secret"])
    for method, template in admin_routes(broker):
        url = fill(template, {"tenants": org.a["id"], "workloads": org.agent_a["id"],
                              "tokens": "x"}) or template
        for kind, token in tokens.items():
            assert_problem(request(broker, method, url, token), 403)
        # No token, an empty one, garbage, another scheme: 401 with a challenge.
        for headers in ({}, {"authorization": "Bearer "}, {"authorization": "Bearer abc.def.ghi"},
                        {"authorization": f"Basic {ADMIN_SECRET}"},
                        {"authorization": broker.cached_admin_token()}):
            resp = broker.client.request(method, url, headers=headers)
            assert_problem(resp, 401)
            assert resp.headers["www-authenticate"].lower().startswith("bearer")


# --- pagination ----------------------------------------------------------------------------


def _walk(broker: Broker, url: str, limit: int) -> list[str]:
    ids: list[str] = []
    cursor: str | None = None
    for _ in range(100):
        sep = "&" if "?" in url else "?"
        page_url = f"{url}{sep}limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        page = broker.client.get(page_url, headers=broker.admin()).json()
        assert len(page["data"]) <= limit
        ids += [item["id"] for item in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids
    raise AssertionError("paging never ended")


def test_pages_have_no_gaps_or_duplicates(broker: Broker) -> None:
    tenants = [broker.create_tenant()["id"] for _ in range(7)]
    for _ in range(5):
        broker.create_workload(tenants[0])
    for url, expected in (("/v1/admin/tenants", 8), ("/v1/admin/workloads", 6),
                          (f"/v1/admin/workloads?tenant_id={tenants[0]}", 5)):
        everything = _walk(broker, url, 1000)
        assert len(everything) == expected, (url, everything)  # the root tenant and admin too
        for limit in (1, 2, 3, expected, expected + 1):
            walked = _walk(broker, url, limit)
            assert walked == everything, (url, limit)
            assert len(set(walked)) == len(walked)
    assert set(tenants) <= set(_walk(broker, "/v1/admin/tenants", 2))
    default = broker.client.get("/v1/admin/tenants", headers=broker.admin()).json()
    assert len(default["data"]) == 8 and default["next_cursor"] is None


def test_a_page_boundary_survives_deletion_of_the_cursor_item(broker: Broker) -> None:
    for _ in range(4):
        broker.create_tenant()
    h = broker.admin()
    first = broker.client.get("/v1/admin/tenants?limit=2", headers=h).json()
    cursor = first["next_cursor"]
    assert broker.client.delete(f"/v1/admin/tenants/{cursor}", headers=h).status_code in (204, 409)
    rest = _walk(broker, f"/v1/admin/tenants?cursor={cursor}", 2)
    assert not set(rest) & {t["id"] for t in first["data"]}
    assert len(rest) == 3


# --- strict validation ---------------------------------------------------------------------

WORKLOAD_422 = [
    pytest.param({"policy": {"modles": ["gpt-4o"]}}, "policy.modles", id="unknown-policy-field"),
    pytest.param({"policy": {"rate": {"rps": 5}}}, "policy.rate.rps", id="unknown-rate-field"),
    pytest.param({"policy": {"token_budget_micros": 1.5}}, "token_budget_micros", id="float-money"),
    pytest.param({"policy": {"token_budget_micros": -1}}, "token_budget_micros", id="negative"),
    pytest.param({"policy": {"token_ttl_s": 901}}, "token_ttl_s", id="ttl-above-900"),
    pytest.param({"policy": {"token_ttl_s": 0}}, "token_ttl_s", id="ttl-zero"),
    pytest.param({"policy": {"models": ["gpt 4o"]}}, "models", id="model-with-space"),
    pytest.param({"policy": {"models": [""]}}, "models", id="empty-model"),
    pytest.param({"policy": {"budgets": [{"period": "week", "limit_micros": 1}]}}, "period",
                 id="unknown-period"),
    pytest.param({"policy": {"burst": {"limit_micros": 1}}}, "window_s", id="burst-without-window"),
    pytest.param({"kind": "robot"}, "kind", id="unknown-kind"),
    pytest.param({"roles": ["tenant-admin"]}, "roles", id="roles-on-an-agent"),
    pytest.param({"kind": "admin"}, "role", id="admin-without-roles"),
    pytest.param({"kind": "admin", "roles": ["superuser"]}, "roles", id="unknown-role"),
    pytest.param({"tenant_id": None}, "tenant_id", id="no-tenant"),
    pytest.param({"secret_hash": "00"}, "secret_hash", id="setting-the-hash"),
    pytest.param({"client_secret": "bks_mine"}, "client_secret", id="choosing-the-secret"),
    pytest.param({"id": "wl_mine"}, "id", id="choosing-the-id"),
]


@pytest.mark.parametrize(("change", "named"), WORKLOAD_422)
def test_workload_bodies_are_strict(broker: Broker, change: dict[str, Any], named: str) -> None:
    tenant = broker.create_tenant()
    body = {"tenant_id": tenant["id"], "name": "bot", "kind": "agent", **change}
    body = {k: v for k, v in body.items() if v is not None}
    resp = broker.client.post("/v1/admin/workloads", json=body, headers=broker.admin())
    assert named in assert_problem(resp, 422)["detail"]


PATCH_422 = [
    pytest.param({"tenant_id": "tn_other"}, "tenant_id", id="moving-to-another-tenant"),
    pytest.param({"kind": "admin"}, "kind", id="changing-the-kind"),
    pytest.param({"client_id": "mine"}, "client_id", id="choosing-the-client-id"),
    pytest.param({"policy": {"approval_models": "o1"}}, "approval_models", id="string-for-list"),
    pytest.param({"roles": ["auditor"]}, "roles", id="roles-on-an-agent"),
]


@pytest.mark.parametrize(("change", "named"), PATCH_422)
def test_workload_patches_are_strict(broker: Broker, change: dict[str, Any], named: str) -> None:
    agent = broker.create_workload(broker.create_tenant()["id"])
    resp = broker.client.patch(f"/v1/admin/workloads/{agent['id']}", json=change,
                               headers=broker.admin())
    assert named in assert_problem(resp, 422)["detail"]
    after = broker.client.get(f"/v1/admin/workloads/{agent['id']}", headers=broker.admin()).json()
    assert after == {k: v for k, v in agent.items() if k != "client_secret"}


TENANT_422 = [
    pytest.param({"name": "t", "budget": []}, "budget", id="unknown-field"),
    pytest.param({"name": "t", "budgets": [{"period": "day", "limit_micros": 1e6}]},
                 "limit_micros", id="float-money"),
    pytest.param({"name": "t", "budgets": [{"period": "day", "limit_micros": 10**30}]},
                 "limit_micros", id="enormous-money"),
    pytest.param({"name": "t", "budgets": [{"period": "day"}]}, "limit_micros", id="no-limit"),
    pytest.param({"name": "t", "budgets": [{"period": "day", "limit_micros": 1, "x": 1}]},
                 "budgets.0.x", id="unknown-budget-field"),
    pytest.param({"name": "t", "suspended": True}, "suspended", id="read-only-field"),
    pytest.param({}, "name", id="no-name"),
]


@pytest.mark.parametrize(("body", "named"), TENANT_422)
def test_tenant_bodies_are_strict(broker: Broker, body: dict[str, Any], named: str) -> None:
    resp = broker.client.post("/v1/admin/tenants", json=body, headers=broker.admin())
    assert named in assert_problem(resp, 422)["detail"]
