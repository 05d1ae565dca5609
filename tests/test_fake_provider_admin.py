"""The fake providers' admin APIs and token exchanges are as strict as the real ones: a plugin
that passes against them sends what the providers document, and a test that asks the fake which
keys are live (``MockState.live_admin_keys``) learns whether a rotation left one behind.

Shapes and names: :mod:`plugins.mock_provider_admin`, :mod:`plugins.mock_federation`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from plugins import mock_provider_admin
from plugins.mock_federation import (
    FEDERATION_BETA,
    JWT_BEARER,
    OAUTH_BETA,
    TOKEN_EXCHANGE,
    AnthropicFederationRule,
    OpenAIIdentityProvider,
)
from plugins.mock_provider_admin import OPENAI_PROJECT, AdminFault
from tests.fake_issuer import FakeIssuer, SigningKey, new_key
from tests.fake_provider import FakeProviderServer

PROJECT = f"/v1/organization/projects/{OPENAI_PROJECT}"
AUDIENCE = "https://provider.example/federation"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {**CHAT, "max_tokens": 1}


# --- clients ------------------------------------------------------------------------------------


@pytest.fixture
def http(fake: FakeProviderServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url) as client:
        yield client


def openai_admin(fake: FakeProviderServer, key: str | None = None) -> dict[str, str]:
    return {"authorization": f"Bearer {key or fake.state.admin_key}"}


def anthropic_admin(fake: FakeProviderServer, key: str | None = None) -> dict[str, str]:
    return {"x-api-key": key or fake.state.admin_key, "anthropic-version": "2023-06-01"}


def create_account(http: httpx.Client, fake: FakeProviderServer, name: str = "rotation-1") -> Any:
    resp = http.post(f"{PROJECT}/service_accounts", headers=openai_admin(fake), json={"name": name})
    assert resp.status_code == 200, resp.text
    return resp.json()


def create_router_key(http: httpx.Client, fake: FakeProviderServer, name: str = "rotation-1") -> Any:
    resp = http.post("/api/v1/keys", headers=openai_admin(fake), json={"name": name})
    assert resp.status_code == 201, resp.text
    return resp.json()


def models_status(http: httpx.Client, key: str, path: str = "/v1/models") -> int:
    return http.get(path, headers={"authorization": f"Bearer {key}"}).status_code


def messages_status(http: httpx.Client, headers: dict[str, str]) -> int:
    return http.post("/v1/messages", headers=headers, json=MESSAGE).status_code


def openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    return dict(error)


def anthropic_error(resp: httpx.Response, status: int, kind: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["type"] == "error" and resp.json()["error"]["type"] == kind


def router_error(resp: httpx.Response, status: int) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == status


# --- OpenAI: service accounts, keys, spend limit ----------------------------------------------


def test_a_service_account_comes_with_its_one_key_which_the_model_routes_then_accept(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    account = create_account(http, fake)
    key = account["api_key"]
    assert account["object"] == "organization.project.service_account"
    assert account["id"].startswith("svc_acct_") and account["name"] == "rotation-1"
    assert account["role"] == "member" and isinstance(account["created_at"], int)
    assert key["object"] == "organization.project.service_account.api_key"
    assert key["id"].startswith("key_") and key["value"].startswith("sk-svcacct-")
    assert fake.state.live_admin_keys() == {key["id"]: key["value"]}
    assert models_status(http, key["value"]) == 200
    # From the first key made, only made keys are accepted.
    assert models_status(http, "sk-anything") == 401


def test_create_service_account_only_makes_an_account_without_a_key(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    resp = http.post(f"{PROJECT}/service_accounts", headers=openai_admin(fake),
                     json={"name": "bare", "create_service_account_only": True})
    assert resp.json()["api_key"] is None and resp.json()["role"] == "none"
    assert fake.state.live_admin_keys() == {}


@pytest.mark.parametrize(("method", "path"), [
    ("POST", f"{PROJECT}/service_accounts"), ("GET", f"{PROJECT}/service_accounts"),
    ("DELETE", f"{PROJECT}/service_accounts/svc_acct_x"), ("GET", f"{PROJECT}/api_keys"),
    ("GET", f"{PROJECT}/api_keys/key_x"), ("DELETE", f"{PROJECT}/api_keys/key_x"),
    ("GET", f"{PROJECT}/spend_limit"), ("POST", f"{PROJECT}/spend_limit"),
    ("DELETE", f"{PROJECT}/spend_limit"),
])
def test_openai_admin_calls_need_the_admin_key_as_a_bearer_token(
    fake: FakeProviderServer, http: httpx.Client, method: str, path: str
) -> None:
    made = create_account(http, fake)["api_key"]["value"]
    for headers in ({}, openai_admin(fake, "sk-wrong"), openai_admin(fake, made),
                    {"x-api-key": fake.state.admin_key}):
        resp = http.request(method, path, headers=headers, json={})
        assert openai_error(resp, 401)["code"] == "invalid_api_key"
    assert fake.state.admin_log == ["openai.create_service_account"]


def test_an_unknown_openai_project_is_404(fake: FakeProviderServer, http: httpx.Client) -> None:
    resp = http.post("/v1/organization/projects/proj_other/service_accounts",
                     headers=openai_admin(fake), json={"name": "x"})
    openai_error(resp, 404)
    assert fake.state.service_accounts == {}


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"name": ""}', b'{"name": 7}', b"{}"])
def test_a_service_account_needs_a_json_object_with_a_name(
    fake: FakeProviderServer, http: httpx.Client, content: bytes
) -> None:
    resp = http.post(f"{PROJECT}/service_accounts", headers=openai_admin(fake), content=content)
    openai_error(resp, 400)
    assert fake.state.service_accounts == {}


def test_service_accounts_are_listed_in_pages_by_the_last_id(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    ids = [create_account(http, fake, f"sa-{i}")["id"] for i in range(5)]
    url, headers = f"{PROJECT}/service_accounts", openai_admin(fake)
    first = http.get(url, headers=headers, params={"limit": 2}).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [a["id"] for a in first["data"]] == ids[:2]
    assert (first["first_id"], first["last_id"]) == (ids[0], ids[1])
    last = http.get(url, headers=headers, params={"limit": 2, "after": ids[3]}).json()
    assert [a["id"] for a in last["data"]] == ids[4:] and last["has_more"] is False
    assert set(last["data"][0]) == {"object", "id", "name", "role", "created_at"}
    assert len(http.get(url, headers=headers).json()["data"]) == 5  # 20 by default
    for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"after": "svc_acct_gone"}):
        openai_error(http.get(url, headers=headers, params=params), 400)


def test_deleting_a_service_account_deletes_its_key(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    account = create_account(http, fake)
    url = f"{PROJECT}/service_accounts/{account['id']}"
    resp = http.delete(url, headers=openai_admin(fake))
    assert resp.json() == {"object": "organization.project.service_account.deleted",
                           "id": account["id"], "deleted": True}
    assert fake.state.live_admin_keys() == {}
    assert models_status(http, account["api_key"]["value"]) == 401
    assert http.get(f"{PROJECT}/api_keys", headers=openai_admin(fake)).json()["data"] == []
    openai_error(http.delete(url, headers=openai_admin(fake)), 404)


def test_a_service_accounts_key_is_deleted_only_with_its_account_but_a_users_key_alone(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    account = create_account(http, fake)
    key_id, value = account["api_key"]["id"], account["api_key"]["value"]
    openai_error(http.delete(f"{PROJECT}/api_keys/{key_id}", headers=openai_admin(fake)), 400)
    assert models_status(http, value) == 200

    user_key_id = fake.state.add_openai_user_key("sk-proj-operator-0000")
    found = http.get(f"{PROJECT}/api_keys/{user_key_id}", headers=openai_admin(fake)).json()
    assert found["owner"]["type"] == "user" and found["redacted_value"] == "sk-pro...0000"
    resp = http.delete(f"{PROJECT}/api_keys/{user_key_id}", headers=openai_admin(fake))
    assert resp.json()["deleted"] is True
    assert models_status(http, "sk-proj-operator-0000") == 401
    openai_error(http.delete(f"{PROJECT}/api_keys/{user_key_id}", headers=openai_admin(fake)), 404)


def test_project_api_keys_name_their_owner(fake: FakeProviderServer, http: httpx.Client) -> None:
    account = create_account(http, fake)
    listed = http.get(f"{PROJECT}/api_keys", headers=openai_admin(fake)).json()
    (key,) = listed["data"]
    assert key["object"] == "organization.project.api_key"
    assert key["id"] == account["api_key"]["id"] and "value" not in key
    assert key["owner"]["type"] == "service_account"
    assert key["owner"]["service_account"]["id"] == account["id"]
    assert account["api_key"]["value"] not in json.dumps(listed)


def test_the_project_spend_limit_is_held_in_whole_us_cents(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    url, headers = f"{PROJECT}/spend_limit", openai_admin(fake)
    openai_error(http.get(url, headers=headers), 404)
    for body in ({"currency": "EUR", "interval": "month", "threshold_amount": 5},
                 {"currency": "USD", "interval": "day", "threshold_amount": 5},
                 {"currency": "USD", "interval": "month", "threshold_amount": 5.5},
                 {"currency": "USD", "interval": "month", "threshold_amount": True},
                 {"currency": "USD", "interval": "month", "threshold_amount": -1}):
        openai_error(http.post(url, headers=headers, json=body), 400)
    set_to = http.post(url, headers=headers,
                       json={"currency": "USD", "interval": "month", "threshold_amount": 1234})
    expected = {"object": "project.spend_limit", "currency": "USD", "interval": "month",
                "threshold_amount": 1234, "enforcement": {"status": "inactive"}}
    assert set_to.json() == expected and http.get(url, headers=headers).json() == expected
    assert fake.state.spend_limits == {OPENAI_PROJECT: 1234}
    assert http.delete(url, headers=headers).json() == {"object": "project.spend_limit.deleted",
                                                        "deleted": True}
    openai_error(http.get(url, headers=headers), 404)


# --- OpenRouter: the management API --------------------------------------------------------------


def test_openrouter_keys_are_made_disabled_and_deleted_through_the_management_key(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    made = create_router_key(http, fake)
    data, key = made["data"], made["key"]
    assert key.startswith("sk-or-v1-") and len(data["hash"]) == 64
    assert (data["name"], data["disabled"], data["limit"]) == ("rotation-1", False, None)
    assert key not in json.dumps(data)
    assert fake.state.live_admin_keys() == {data["hash"]: key}
    assert http.post("/api/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                     json=CHAT).status_code == 200
    assert models_status(http, key, "/api/v1/key") == 200
    # The management key is no model key.
    assert models_status(http, fake.state.admin_key, "/api/v1/models") == 401

    url, headers = f"/api/v1/keys/{data['hash']}", openai_admin(fake)
    assert http.patch(url, headers=headers, json={"disabled": True}).json()["data"]["disabled"]
    assert models_status(http, key, "/api/v1/models") == 401
    router_error(http.get("/api/v1/key", headers={"authorization": f"Bearer {key}"}), 401)
    assert http.get("/api/v1/keys", headers=headers).json()["data"] == []
    listed = http.get("/api/v1/keys", headers=headers, params={"include_disabled": "true"})
    assert [k["hash"] for k in listed.json()["data"]] == [data["hash"]]
    assert fake.state.live_admin_keys() == {data["hash"]: key}  # disabled is not deleted
    http.patch(url, headers=headers, json={"disabled": False})
    assert models_status(http, key, "/api/v1/models") == 200

    assert http.delete(url, headers=headers).json() == {"deleted": True}
    assert fake.state.live_admin_keys() == {}
    assert models_status(http, key, "/api/v1/models") == 401
    router_error(http.delete(url, headers=headers), 404)


def test_openrouter_refuses_a_wrong_management_key_and_a_bad_body(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    for headers in ({}, openai_admin(fake, "sk-or-v1-wrong")):
        router_error(http.post("/api/v1/keys", headers=headers, json={"name": "x"}), 401)
        router_error(http.get("/api/v1/keys", headers=headers), 401)
        router_error(http.delete("/api/v1/keys/abc", headers=headers), 401)
    for content in (b"nope", b'"name"', b'{"name": ""}', b'{"name": "x", "limit": "10"}'):
        router_error(http.post("/api/v1/keys", headers=openai_admin(fake), content=content), 400)
    made = create_router_key(http, fake)["data"]["hash"]
    router_error(http.patch(f"/api/v1/keys/{made}", headers=openai_admin(fake),
                            json={"disabled": "yes"}), 400)
    assert list(fake.state.router_keys) == [made]


def test_openrouter_lists_keys_in_pages_by_offset(
    fake: FakeProviderServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mock_provider_admin, "ROUTER_PAGE", 2)
    hashes = [create_router_key(http, fake, f"k{i}")["data"]["hash"] for i in range(3)]
    headers = openai_admin(fake)
    pages = [[k["hash"] for k in http.get("/api/v1/keys", headers=headers,
                                          params={"offset": offset}).json()["data"]]
             for offset in (0, 2, 4)]
    assert pages == [hashes[:2], hashes[2:], []]
    for params in ({"offset": "-1"}, {"offset": "x"}, {"include_disabled": "1"}):
        router_error(http.get("/api/v1/keys", headers=headers, params=params), 400)


# --- Anthropic: key status --------------------------------------------------------------------


def test_anthropic_keys_have_the_documented_shape(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    key = "sk-ant-api03-" + "R2D" + "x" * 80 + "igAA"
    key_id = fake.state.add_anthropic_key(key, expires_at=2_000_000_000, name="prod")
    found = http.get(f"/v1/organizations/api_keys/{key_id}", headers=anthropic_admin(fake)).json()
    assert found == {
        "id": key_id, "type": "api_key", "name": "prod", "workspace_id": "wrkspc_mock",
        "created_at": "2023-11-14T22:13:20Z", "created_by": {"id": "user_mock", "type": "user"},
        "partial_key_hint": "sk-ant-api03-R2D...igAA", "status": "active",
        "expires_at": "2033-05-18T03:33:20Z",
    }
    assert messages_status(http, {"x-api-key": key}) == 200
    assert messages_status(http, {"x-api-key": "sk-ant-api03-other"}) == 401


def test_an_anthropic_key_expires_by_the_fakes_clock(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    key_id = fake.state.add_anthropic_key("sk-ant-api03-expiring-key-0000", expires_at=5_000.0)
    fake.state.clock = 4_999.0
    assert messages_status(http, {"x-api-key": "sk-ant-api03-expiring-key-0000"}) == 200
    fake.state.clock = 5_000.0
    assert messages_status(http, {"x-api-key": "sk-ant-api03-expiring-key-0000"}) == 401
    url = "/v1/organizations/api_keys"
    assert http.get(f"{url}/{key_id}", headers=anthropic_admin(fake)).json()["status"] == "expired"
    expired = http.get(url, headers=anthropic_admin(fake), params={"status": "expired"}).json()
    assert [k["id"] for k in expired["data"]] == [key_id]


def test_anthropic_status_changes_are_enforced_and_archiving_is_final(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    key = "sk-ant-api03-status-key-000000"
    url = f"/v1/organizations/api_keys/{fake.state.add_anthropic_key(key)}"

    def update(body: dict[str, Any]) -> httpx.Response:
        return http.post(url, headers=anthropic_admin(fake), json=body)

    assert update({"status": "inactive"}).json()["status"] == "inactive"
    assert messages_status(http, {"x-api-key": key}) == 401
    assert update({"status": "active", "name": "renamed"}).json()["name"] == "renamed"
    assert messages_status(http, {"x-api-key": key}) == 200
    for body in ({"status": "expired"}, {"status": "deleted"}, {"name": ""}, {"name": "x" * 501}):
        anthropic_error(update(body), 400, "invalid_request_error")
    anthropic_error(http.post(url, headers=anthropic_admin(fake), content=b"{"), 400,
                    "invalid_request_error")
    assert update({"status": "archived"}).json()["status"] == "archived"
    assert messages_status(http, {"x-api-key": key}) == 401
    anthropic_error(update({"status": "active"}), 400, "invalid_request_error")
    anthropic_error(http.get("/v1/organizations/api_keys/apikey_none",
                             headers=anthropic_admin(fake)), 404, "not_found_error")


def test_anthropic_admin_calls_need_the_admin_key_and_a_version(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    url = "/v1/organizations/api_keys"
    for headers in ({}, anthropic_admin(fake, "sk-ant-admin01-wrong"),
                    {"authorization": f"Bearer {fake.state.admin_key}",
                     "anthropic-version": "2023-06-01"}):
        anthropic_error(http.get(url, headers=headers), 401, "authentication_error")
    anthropic_error(http.get(url, headers={"x-api-key": fake.state.admin_key}), 400,
                    "invalid_request_error")


def test_anthropic_keys_are_listed_in_pages_by_the_last_id(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    ids = [fake.state.add_anthropic_key(f"sk-ant-api03-key-{i}-00000000") for i in range(3)]
    url, headers = "/v1/organizations/api_keys", anthropic_admin(fake)
    first = http.get(url, headers=headers, params={"limit": 2}).json()
    assert [k["id"] for k in first["data"]] == ids[:2] and first["has_more"] is True
    rest = http.get(url, headers=headers, params={"limit": 2, "after_id": first["last_id"]}).json()
    assert [k["id"] for k in rest["data"]] == ids[2:] and rest["has_more"] is False
    for params in ({"limit": 0}, {"limit": 1001}, {"status": "deleted"}, {"after_id": "apikey_x"}):
        anthropic_error(http.get(url, headers=headers, params=params), 400, "invalid_request_error")


# --- faults -------------------------------------------------------------------------------------


def test_a_fault_answers_its_status_as_many_times_as_asked(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    fake.state.admin_faults["openai.create_service_account"] = AdminFault(500, times=2)
    url, body = f"{PROJECT}/service_accounts", {"name": "x"}
    for _ in range(2):
        assert openai_error(http.post(url, headers=openai_admin(fake), json=body), 500)[
            "type"] == "server_error"
    assert fake.state.service_accounts == {}
    create_account(http, fake, "x")
    assert fake.state.admin_faults == {}
    assert fake.state.admin_log == ["openai.create_service_account"] * 3


def test_a_fault_after_the_operation_loses_the_answer_but_not_the_key(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    fake.state.admin_faults["openrouter.create_key"] = AdminFault(502, after=True)
    resp = http.post("/api/v1/keys", headers=openai_admin(fake), json={"name": "lost"})
    router_error(resp, 502)
    ((key_hash, key),) = fake.state.live_admin_keys().items()
    assert key not in resp.text and fake.state.router_keys[key_hash].name == "lost"
    assert models_status(http, key, "/api/v1/models") == 200


def _fault_call(fake: FakeProviderServer, http: httpx.Client, op: str) -> httpx.Response:
    account = f"{PROJECT}/service_accounts/svc_acct_x"
    calls: dict[str, tuple[str, str, dict[str, str], Any]] = {
        "openai.create_service_account": ("POST", f"{PROJECT}/service_accounts",
                                          openai_admin(fake), {"name": "x"}),
        "openai.list_service_accounts": ("GET", f"{PROJECT}/service_accounts",
                                         openai_admin(fake), None),
        "openai.delete_service_account": ("DELETE", account, openai_admin(fake), None),
        "openai.list_api_keys": ("GET", f"{PROJECT}/api_keys", openai_admin(fake), None),
        "openai.get_api_key": ("GET", f"{PROJECT}/api_keys/key_x", openai_admin(fake), None),
        "openai.delete_api_key": ("DELETE", f"{PROJECT}/api_keys/key_x", openai_admin(fake), None),
        "openai.spend_limit": ("GET", f"{PROJECT}/spend_limit", openai_admin(fake), None),
        "openrouter.create_key": ("POST", "/api/v1/keys", openai_admin(fake), {"name": "x"}),
        "openrouter.list_keys": ("GET", "/api/v1/keys", openai_admin(fake), None),
        "openrouter.update_key": ("PATCH", "/api/v1/keys/h", openai_admin(fake), {}),
        "openrouter.delete_key": ("DELETE", "/api/v1/keys/h", openai_admin(fake), None),
        "anthropic.list_keys": ("GET", "/v1/organizations/api_keys", anthropic_admin(fake), None),
        "anthropic.get_key": ("GET", "/v1/organizations/api_keys/k", anthropic_admin(fake), None),
        "anthropic.update_key": ("POST", "/v1/organizations/api_keys/k", anthropic_admin(fake),
                                 {}),
        "check": ("GET", "/v1/models", {"authorization": "Bearer sk-any"}, None),
    }
    method, url, headers, body = calls[op]
    return http.request(method, url, headers=headers, json=body)


@pytest.mark.parametrize("op", [
    "openai.create_service_account", "openai.list_service_accounts",
    "openai.delete_service_account", "openai.list_api_keys", "openai.get_api_key",
    "openai.delete_api_key", "openai.spend_limit", "openrouter.create_key",
    "openrouter.list_keys", "openrouter.update_key", "openrouter.delete_key",
    "anthropic.list_keys", "anthropic.get_key", "anthropic.update_key", "check",
])
def test_each_documented_fault_reaches_its_operation(
    fake: FakeProviderServer, http: httpx.Client, op: str
) -> None:
    fake.state.admin_faults[op] = AdminFault(503)
    resp = _fault_call(fake, http, op)
    assert resp.status_code == 503 and "Injected fault" in resp.text
    assert fake.state.admin_faults == {} and fake.state.admin_log == [op]
    assert _fault_call(fake, http, op).status_code != 503


def test_the_openrouter_key_check_has_the_check_fault(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    key = create_router_key(http, fake)["key"]
    fake.state.admin_faults["check"] = AdminFault(500)
    router_error(http.get("/api/v1/key", headers={"authorization": f"Bearer {key}"}), 500)
    assert models_status(http, key, "/api/v1/key") == 200


def test_reset_forgets_calls_and_faults_but_keeps_keys_and_registrations(
    fake: FakeProviderServer, http: httpx.Client
) -> None:
    account = create_account(http, fake)
    fake.state.admin_faults["check"] = AdminFault(500)
    fake.state.openai_idp = OpenAIIdentityProvider("idp_1", "https://i", AUDIENCE, {}, "svc_1")
    fake.state.exchanges.append("openai")
    fake.reset()
    assert fake.state.admin_faults == {} and fake.state.admin_log == []
    assert fake.state.exchanges == []
    assert fake.state.openai_idp is not None
    assert fake.state.live_admin_keys() == {account["api_key"]["id"]: account["api_key"]["value"]}


# --- token exchanges ------------------------------------------------------------------------------


def claims(issuer: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": issuer, "aud": AUDIENCE, "sub": "provider:p", "iat": now, "exp": now + 120,
            "jti": str(uuid.uuid4())}
    return {**base, **overrides}


def sign(key: SigningKey, payload: dict[str, Any], alg: str = "RS256",
         kid: str | None = None) -> str:
    return jwt.encode(payload, key.private, algorithm=alg,
                      headers={"kid": kid or key.kid})


def unsigned(payload: dict[str, Any], header: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return jwt.utils.base64url_encode(json.dumps(value).encode()).decode()
    return f"{part(header)}.{part(payload)}."


def hmac_forgery(key: SigningKey, payload: dict[str, Any]) -> str:
    """HS256 "signed" with the public key as the secret: algorithm confusion."""
    header = json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode()
    body = json.dumps(payload).encode()
    signing = jwt.utils.base64url_encode(header) + b"." + jwt.utils.base64url_encode(body)
    mac = hmac.new(key.public_pem(), signing, hashlib.sha256).digest()
    return (signing + b"." + jwt.utils.base64url_encode(mac)).decode()


OPENAI_ISSUER = "https://broker.example"
SAML = "urn:ietf:params:oauth:token-type:saml2"


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return new_key("RSA", "broker-1")


@pytest.fixture
def idp(fake: FakeProviderServer, signer: SigningKey) -> OpenAIIdentityProvider:
    registered = OpenAIIdentityProvider("idp_broker", OPENAI_ISSUER, AUDIENCE,
                                        {"keys": [signer.jwk()]}, "svc_acct_fed")
    fake.state.openai_idp = registered
    return registered


def openai_exchange(http: httpx.Client, assertion: str, **overrides: Any) -> httpx.Response:
    body = {"grant_type": TOKEN_EXCHANGE, "subject_token": assertion,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "identity_provider_id": "idp_broker", "service_account_id": "svc_acct_fed",
            **overrides}
    return http.post("/oauth/token", json={k: v for k, v in body.items() if v is not None})


def test_an_openai_exchange_answers_a_bearer_token_good_until_it_expires(
    fake: FakeProviderServer, http: httpx.Client, idp: OpenAIIdentityProvider, signer: SigningKey
) -> None:
    fake.state.clock = 1_000.0
    resp = openai_exchange(http, sign(signer, claims(OPENAI_ISSUER)))
    answer = resp.json()
    assert resp.status_code == 200, resp.text
    assert set(answer) == {"access_token", "issued_token_type", "token_type", "expires_in"}
    assert answer["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert (answer["token_type"], answer["expires_in"]) == ("Bearer", 600)
    token = answer["access_token"]
    assert fake.state.exchanges == ["openai"] and fake.state.token_expiry[token] == 1_600.0
    assert models_status(http, token) == 200
    # An OpenAI token is no Anthropic credential.
    assert messages_status(http, {"authorization": f"Bearer {token}",
                                  "anthropic-beta": OAUTH_BETA}) == 401
    fake.state.clock = 1_600.0
    assert models_status(http, token) == 401


def test_the_issued_tokens_life_is_configurable(
    fake: FakeProviderServer, http: httpx.Client, idp: OpenAIIdentityProvider, signer: SigningKey
) -> None:
    fake.state.token_ttl_s = 90
    assert openai_exchange(http, sign(signer, claims(OPENAI_ISSUER))).json()["expires_in"] == 90


OPENAI_REFUSALS: dict[str, tuple[int, str, dict[str, Any], str | None, str]] = {
    # name: (status, error, request overrides, the assertion's kind, what the refusal says)
    "grant type": (400, "unsupported_grant_type", {"grant_type": JWT_BEARER}, None, "grant_type"),
    "subject token type": (400, "invalid_request", {"subject_token_type": SAML}, None,
                           "subject_token_type"),
    "no subject token": (400, "invalid_request", {"subject_token": ""}, None,
                         "subject_token is required"),
    "no identity provider id": (400, "invalid_request", {"identity_provider_id": None}, None,
                                "identity_provider_id is required"),
    "identity provider": (400, "invalid_grant", {"identity_provider_id": "idp_other"}, None,
                          "identity_provider_id does not match"),
    "service account": (400, "invalid_grant", {"service_account_id": "svc_acct_other"}, None,
                        "service_account_id does not match"),
    "audience": (400, "invalid_grant", {}, "aud", "aud is not"),
    "issuer": (400, "invalid_grant", {}, "iss", "iss is not"),
    "expired": (400, "invalid_grant", {}, "expired", "has expired"),
    "not yet valid": (400, "invalid_grant", {}, "future", "not valid yet"),
    "issued in the future": (400, "invalid_grant", {}, "iat", "not valid yet"),
    "lives too long": (400, "invalid_grant", {}, "long", "longer than 300 s"),
    "no sub": (400, "invalid_grant", {}, "no-sub", "MissingRequiredClaimError"),
    "alg none": (400, "invalid_grant", {}, "none", "'none' is not accepted"),
    "hmac": (400, "invalid_grant", {}, "hmac", "'HS256' is not accepted"),
    "another key": (400, "invalid_grant", {}, "forged", "signature does not verify"),
    "unknown kid": (400, "invalid_grant", {}, "kid", "has the assertion's kid"),
    "no kid": (400, "invalid_grant", {}, "no-kid", "names no kid"),
    "not a jwt": (400, "invalid_grant", {}, "garbage", "not a JWT"),
}


def bad_assertion(kind: str | None, signer: SigningKey, issuer: str) -> str:
    now = int(time.time())
    good = claims(issuer)
    if kind is None:
        return sign(signer, good)
    signed_variants = {
        "aud": claims(issuer, aud="https://other.example"),
        "iss": claims("https://evil.example"),
        "expired": claims(issuer, iat=now - 200, exp=now - 10),
        "future": claims(issuer, nbf=now + 60),
        "iat": claims(issuer, iat=now + 60, exp=now + 120),
        "long": claims(issuer, exp=now + 301),
        "no-sub": {k: v for k, v in good.items() if k != "sub"},
    }
    if kind in signed_variants:
        return sign(signer, signed_variants[kind])
    if kind == "none":
        return unsigned(good, {"alg": "none", "typ": "JWT", "kid": signer.kid})
    if kind == "hmac":
        return hmac_forgery(signer, good)
    if kind == "forged":
        return sign(new_key("RSA", signer.kid), good)
    if kind == "kid":
        return sign(signer, good, kid="unknown-kid")
    if kind == "no-kid":
        return jwt.encode(good, signer.private, algorithm="RS256")
    return "not-a-jwt"


@pytest.mark.parametrize("case", list(OPENAI_REFUSALS))
def test_an_openai_exchange_refuses(
    fake: FakeProviderServer, http: httpx.Client, idp: OpenAIIdentityProvider, signer: SigningKey,
    case: str,
) -> None:
    status, error, overrides, kind, why = OPENAI_REFUSALS[case]
    resp = openai_exchange(http, bad_assertion(kind, signer, OPENAI_ISSUER), **overrides)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == error and why in resp.json()["error_description"]
    assert fake.state.exchanges == [] and len(fake.state.exchange_refusals) == 1
    assert fake.state.valid_keys is None  # no token made


def test_an_openai_exchange_refuses_a_subject_other_than_the_registered_one(
    fake: FakeProviderServer, http: httpx.Client, idp: OpenAIIdentityProvider, signer: SigningKey
) -> None:
    idp.subject = "provider:openai"
    refused = openai_exchange(http, sign(signer, claims(OPENAI_ISSUER, sub="provider:other")))
    assert refused.json()["error"] == "invalid_grant"
    accepted = openai_exchange(http, sign(signer, claims(OPENAI_ISSUER, sub="provider:openai")))
    assert accepted.status_code == 200


def test_an_openai_exchange_without_a_registered_provider_or_a_json_body_is_refused(
    fake: FakeProviderServer, http: httpx.Client, signer: SigningKey
) -> None:
    assert openai_exchange(http, sign(signer, claims(OPENAI_ISSUER))).json()["error"] == \
        "invalid_grant"
    form = http.post("/oauth/token", data={"grant_type": TOKEN_EXCHANGE})
    assert (form.status_code, form.json()["error"]) == (400, "invalid_request")


def test_an_exchange_fault_before_issues_nothing_and_after_loses_the_token(
    fake: FakeProviderServer, http: httpx.Client, idp: OpenAIIdentityProvider, signer: SigningKey
) -> None:
    fake.state.admin_faults["openai.token"] = AdminFault(503)
    resp = openai_exchange(http, sign(signer, claims(OPENAI_ISSUER)))
    assert (resp.status_code, resp.json()["error"]) == (503, "temporarily_unavailable")
    assert fake.state.exchanges == []
    fake.state.admin_faults["openai.token"] = AdminFault(500, after=True)
    assert openai_exchange(http, sign(signer, claims(OPENAI_ISSUER))).status_code == 500
    assert fake.state.exchanges == ["openai"] and len(fake.state.federated_tokens) == 1
    assert fake.state.admin_log == ["openai.token", "openai.token"]


# --- Anthropic's exchange, with the issuer's keys found by discovery ---------------------------


@pytest.fixture
def rule(fake: FakeProviderServer, fake_issuer: FakeIssuer) -> AnthropicFederationRule:
    registered = AnthropicFederationRule("fdrl_1", "org_1", fake_issuer.issuer_url("broker"),
                                         AUDIENCE, service_account_id="svac_1")
    fake.state.anthropic_rule = registered
    return registered


def anthropic_assertion(fake_issuer: FakeIssuer, alg: str = "ES256", **overrides: Any) -> str:
    payload = claims(fake_issuer.issuer_url("broker"), **overrides)
    return fake_issuer.sign(json.dumps(payload), alg=alg)


def anthropic_exchange(http: httpx.Client, assertion: str, beta: str | None = None,
                       **overrides: Any) -> httpx.Response:
    body = {"grant_type": JWT_BEARER, "assertion": assertion, "federation_rule_id": "fdrl_1",
            "organization_id": "org_1", **overrides}
    headers = {"anthropic-beta": beta if beta is not None else f"{OAUTH_BETA},{FEDERATION_BETA}"}
    return http.post("/v1/oauth/token", headers=headers,
                     json={k: v for k, v in body.items() if v is not None})


def test_an_anthropic_exchange_answers_a_token_for_the_messages_api_as_a_bearer_with_the_beta(
    fake: FakeProviderServer, http: httpx.Client, fake_issuer: FakeIssuer,
    rule: AnthropicFederationRule,
) -> None:
    resp = anthropic_exchange(http, anthropic_assertion(fake_issuer), service_account_id="svac_1")
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert set(answer) == {"access_token", "token_type", "expires_in"}
    token = answer["access_token"]
    assert fake.state.exchanges == ["anthropic"] and fake_issuer.fetches == 1
    assert messages_status(http, {"authorization": f"Bearer {token}",
                                  "anthropic-beta": f"files-api-2025-04-14, {OAUTH_BETA}"}) == 200
    assert messages_status(http, {"authorization": f"Bearer {token}"}) == 401
    assert messages_status(http, {"x-api-key": token, "anthropic-beta": OAUTH_BETA}) == 401
    assert models_status(http, token) == 401  # no OpenAI credential


ANTHROPIC_REFUSALS: dict[str, tuple[int, str, dict[str, Any]]] = {
    # name: (status, error, overrides of the request (beta) or the assertion (claims, alg))
    "no federation beta": (400, "invalid_request", {"beta": OAUTH_BETA}),
    "grant type": (400, "unsupported_grant_type", {"grant_type": TOKEN_EXCHANGE}),
    "no rule id": (400, "invalid_request", {"federation_rule_id": None}),
    "rule": (401, "invalid_grant", {"federation_rule_id": "fdrl_other"}),
    "organization": (401, "invalid_grant", {"organization_id": "org_other"}),
    "service account": (401, "invalid_grant", {"service_account_id": "svac_other"}),
    "workspace": (401, "invalid_grant", {"workspace_id": "wrkspc_other"}),
    "audience": (401, "invalid_grant", {"claims": {"aud": "https://other.example"}}),
    "issuer": (401, "invalid_grant", {"claims": {"iss": "https://evil.example"}}),
    "expired": (401, "invalid_grant", {"claims": {"iat": -200, "exp": -10}}),
    "lives too long": (401, "invalid_grant", {"claims": {"exp": 400}}),
    "symmetric alg": (401, "invalid_grant", {"alg": "HS256"}),
    "too big": (400, "invalid_request", {"claims": {"pad": "x" * 17_000}}),
}


@pytest.mark.parametrize("case", list(ANTHROPIC_REFUSALS))
def test_an_anthropic_exchange_refuses(
    fake: FakeProviderServer, http: httpx.Client, fake_issuer: FakeIssuer,
    rule: AnthropicFederationRule, case: str,
) -> None:
    status, error, overrides = ANTHROPIC_REFUSALS[case]
    request = {k: v for k, v in overrides.items() if k not in ("claims", "alg")}
    now = int(time.time())
    extra = {k: now + v if k in ("iat", "exp") else v
             for k, v in overrides.get("claims", {}).items()}
    if overrides.get("alg") == "HS256":
        assertion = jwt.encode(claims(rule.issuer), "a-shared-secret-of-32-bytes-or-more!",
                               algorithm="HS256", headers={"kid": "ec-1"})
    else:
        assertion = anthropic_assertion(fake_issuer, **extra)
    resp = anthropic_exchange(http, assertion, **request)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == error
    assert fake.state.exchanges == [] and fake.state.valid_keys is None


def test_an_anthropic_exchange_refuses_a_key_outside_the_discovered_jwks(
    fake: FakeProviderServer, http: httpx.Client, fake_issuer: FakeIssuer,
    rule: AnthropicFederationRule,
) -> None:
    outsider = new_key("EC", "ec-1")  # the JWKS's kid, not its key
    assertion = fake_issuer.sign(json.dumps(claims(rule.issuer)), alg="ES256", key=outsider)
    assert anthropic_exchange(http, assertion).json()["error"] == "invalid_grant"
    assert fake.state.exchange_refusals == ["the assertion's signature does not verify"]


def test_an_anthropic_exchange_refuses_when_the_issuers_keys_cannot_be_had(
    fake: FakeProviderServer, http: httpx.Client, fake_issuer: FakeIssuer,
    rule: AnthropicFederationRule,
) -> None:
    fake_issuer.state.mode = "down"
    assert anthropic_exchange(http, anthropic_assertion(fake_issuer)).status_code == 401
    fake_issuer.state.mode = "ok"
    # A discovery document that names another issuer is not this issuer's.
    rule.issuer = fake_issuer.url + "/broker/"
    refused = anthropic_exchange(http, anthropic_assertion(fake_issuer, iss=rule.issuer))
    assert refused.status_code == 401
    assert fake.state.exchange_refusals[-1] == "the issuer's discovery document does not name it"
    # An issuer off the loopback must be https.
    rule.issuer = "http://issuer.example"
    assert anthropic_exchange(http, anthropic_assertion(fake_issuer)).status_code == 401
    assert fake.state.exchange_refusals[-1] == "the issuer must be https"
