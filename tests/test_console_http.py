"""The admin console at ``/console/``, over plain HTTP (httpx against a live broker): sign-in and
its lockout, the session cookie and its ends, CSRF, roles and tenants, the actions and their
audit entries, and bad input answered with HTML pages.

What a browser adds (the Content-Security-Policy holding, the pages working by click and
keyboard) is in ``tests/test_console.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterator
from http.cookies import SimpleCookie
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import text
from starlette.requests import Request

from broker.console import sessions
from broker.console.charts import Series, bar_chart
from broker.console.render import CSP, money
from tests.conftest import ADMIN_SECRET, RESPONSES, SECRETS, Broker
from tests.support import assert_oauth_error

CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')
POST_FORM = re.compile(r'<form method="post" action="/console/(?!sign-out)')


# --- a console user: a cookie jar of its own ------------------------------------------------


class ConsoleUser:
    """One browser's worth of console: its own cookies, every answer recorded for the secret
    scan (``tests/test_zz_secret_scan.py``) unless a test says it holds a secret delivered on
    purpose."""

    def __init__(self, broker: Broker, headers: dict[str, str] | None = None) -> None:
        assert broker.url is not None
        self.broker = broker
        self.http = httpx.Client(base_url=broker.url, follow_redirects=False, timeout=30,
                                 headers=headers or {})
        broker.opened(self.http)
        self.csrf = ""

    def request(self, method: str, path: str, *, record: bool = True, **kw: Any) -> httpx.Response:
        resp = self.http.request(method, path, **kw)
        if record:
            RESPONSES.append(str(dict(resp.headers)) + resp.text)
        found = CSRF.search(resp.text)
        if found:
            self.csrf = found.group(1)
        return resp

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, data: dict[str, str] | None = None, *, csrf: str | None = "auto",
             record: bool = True, **kw: Any) -> httpx.Response:
        fields = dict(data or {})
        if csrf == "auto":
            fields["csrf"] = self.csrf
        elif csrf is not None:
            fields["csrf"] = csrf
        return self.request("POST", path, data=fields, record=record, **kw)

    def sign_in(self, client_id: str, secret: str) -> httpx.Response:
        self.get("/console/sign-in")
        return self.post("/console/sign-in", {"client_id": client_id, "client_secret": secret})

    def sign_in_token(self, token: str) -> httpx.Response:
        self.get("/console/sign-in")
        return self.post("/console/sign-in", {"token": token})

    def page(self, path: str) -> str:
        resp = self.get(path)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:500])
        assert resp.headers["content-type"].startswith("text/html")
        return resp.text


def set_cookies(resp: httpx.Response) -> dict[str, Any]:
    """Each Set-Cookie of the answer, parsed: {name: morsel}."""
    out: dict[str, Any] = {}
    for header in resp.headers.get_list("set-cookie"):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        for name, morsel in jar.items():
            out[name] = morsel
    return out


def assert_page(resp: httpx.Response, status: int) -> str:
    """An HTML answer of the console with its security headers, never a stack trace."""
    assert resp.status_code == status, (resp.status_code, resp.text[:800])
    assert resp.headers["content-type"].startswith("text/html"), resp.headers["content-type"]
    assert resp.headers["content-security-policy"] == CSP
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["referrer-policy"] == "no-referrer"
    assert resp.headers["cache-control"] == "no-store"
    assert "Traceback" not in resp.text and "<script>" not in resp.text
    return resp.text


@pytest.fixture
def broker(make_live_broker: Callable[..., Broker], sqlite_url: str) -> Broker:
    return make_live_broker(sqlite_url, auth={"failure_limit": 3, "failure_window_s": 300})


@pytest.fixture
def both_broker(make_live_broker: Callable[..., Broker], db_url: str) -> Broker:
    """The same on each backend (SQLite and PostgreSQL), for the tests whose reads differ."""
    return make_live_broker(db_url)


def signed_in_admin(broker: Broker) -> ConsoleUser:
    user = ConsoleUser(broker)
    assert user.sign_in("admin", ADMIN_SECRET).status_code == 303
    return user


@pytest.fixture
def org(broker: Broker) -> Iterator[ConsoleUser]:
    yield signed_in_admin(broker)


def api_workload(broker: Broker, wid: str) -> dict[str, Any]:
    resp = broker.client.get(f"/v1/admin/workloads/{wid}", headers=broker.admin())
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def audit_rows(broker: Broker, action: str) -> list[dict[str, Any]]:
    with broker.services.db.engine.connect() as conn:
        rows = conn.execute(text("SELECT actor, action, target, tenant_id, detail FROM audit_event "
                                 "WHERE action = :a ORDER BY seq"), {"a": action}).all()
    return [dict(r._mapping) for r in rows]


def admin_of(broker: Broker, tenant_id: str, role: str) -> dict[str, Any]:
    return broker.create_workload(tenant_id, kind="admin", roles=[role])


# --- signing in ------------------------------------------------------------------------------


def test_sign_in_with_client_credentials_opens_a_server_side_session(both_broker: Broker) -> None:
    broker = both_broker
    user = ConsoleUser(broker)
    root = user.get("/console")
    assert root.status_code == 308 and root.headers["location"] == "/console/"
    away = user.get("/console/")
    assert away.status_code == 303 and away.headers["location"] == "/console/sign-in"

    form = user.get("/console/sign-in")
    text_ = assert_page(form, 200)
    assert 'lang="en"' in text_ and 'href="#main"' in text_
    assert '<label for="client_id">' in text_ and '<label for="client_secret">' in text_
    pre = set_cookies(form)["broker_console_pre"]
    assert pre["httponly"] and pre["samesite"].lower() == "strict" and pre["path"] == "/console"

    done = user.post("/console/sign-in", {"client_id": "admin", "client_secret": ADMIN_SECRET})
    assert done.status_code == 303 and done.headers["location"] == "/console/"
    cookie = set_cookies(done)["broker_console"]
    assert cookie["httponly"] is True and cookie["samesite"].lower() == "strict"
    assert cookie["path"] == "/console" and not cookie["secure"]
    assert int(cookie["max-age"]) == broker.settings.console.session_ttl_s
    assert ADMIN_SECRET not in done.text

    # Only a keyed hash of the id is stored, with who signed in and how.
    sid = cookie.value
    with broker.services.db.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text("SELECT * FROM console_session"))]
    assert len(rows) == 1
    row = rows[0]
    expected = hmac.new(broker.services.pepper, b"console-session\x00" + sid.encode(),
                        hashlib.sha256).hexdigest()
    assert row["id_hash"] == expected and sid not in str(rows)
    assert (row["workload_id"], row["tenant_id"], row["roles"], row["method"]) == (
        "wl_admin", "tn_root", "org-admin", "secret")
    assert row["expires_at"] - row["created_at"] == broker.settings.console.session_ttl_s
    [signed] = audit_rows(broker, "console.sign_in")  # on record, like any admin credential
    assert signed["actor"] == "wl_admin" and "secret" in str(signed["detail"])

    page = assert_page(user.get("/console/"), 200)
    assert "Signed in as <strong>wl_admin</strong>" in page and "Spend per day" in page
    assert set_cookies(user.get("/console/")) == {}  # a page view sets no cookie
    # Signed in, the sign-in page sends the browser on (and its form could not be posted: the
    # pre-session cookie went with the sign-in).
    assert user.get("/console/sign-in").headers["location"] == "/console/"
    assert user.post("/console/sign-in", {"client_id": "admin", "client_secret": ADMIN_SECRET}
                     ).status_code == 403

    out = user.post("/console/sign-out")
    assert out.status_code == 303 and out.headers["location"] == "/console/sign-in?notice=signed-out"
    gone = set_cookies(out)["broker_console"]
    assert gone.value == "" and int(gone["max-age"]) == 0
    with broker.services.db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM console_session")).scalar_one() == 0
    # The old id is worth nothing now, even presented again.
    again = httpx.get(f"{broker.url}/console/", cookies={"broker_console": sid})
    assert again.status_code == 303


def test_a_wrong_secret_is_refused_and_failures_lock_out_as_at_the_token_endpoint(
        broker: Broker) -> None:
    agent_admin = admin_of(broker, broker.create_tenant()["id"], "tenant-admin")
    cid, secret = agent_admin["client_id"], agent_admin["client_secret"]
    user = ConsoleUser(broker)
    for i in range(3):  # failure_limit = 3
        wrong = secret[:-2] + f"{i:02d}"
        resp = user.sign_in(cid, wrong)
        text_ = assert_page(resp, 401)
        assert "do not match" in text_ and wrong not in text_ and "broker_console" not in str(
            set_cookies(resp).keys() - {"broker_console_pre"})
    # Locked out now, even with the right secret: here...
    locked = user.sign_in(cid, secret)
    assert "Too many failed sign-ins" in assert_page(locked, 429)
    assert int(locked.headers["retry-after"]) > 0
    # ...and at /v1/token, which counts the same failures (same client, same address).
    resp = broker.client.post("/v1/token", data={"grant_type": "client_credentials",
                                                 "client_id": cid, "client_secret": secret})
    assert_oauth_error(resp, 429, "slow_down")
    # Another client from the same address is not locked out.
    assert ConsoleUser(broker).sign_in("admin", ADMIN_SECRET).status_code == 303


def test_a_workload_that_is_no_admin_cannot_sign_in(broker: Broker) -> None:
    agent = broker.create_workload(broker.create_tenant()["id"])
    user = ConsoleUser(broker)
    assert "no admin role" in assert_page(user.sign_in(agent["client_id"], agent["client_secret"]), 403)
    token = broker.token(agent["client_id"], agent["client_secret"])
    assert "no admin role" in assert_page(user.sign_in_token(token), 403)
    assert "not a valid" in assert_page(user.sign_in_token("not-a-token"), 401)


def test_a_session_from_a_pasted_token_ends_with_the_token(broker: Broker) -> None:
    token = broker.admin_token()
    claims = jwt.decode(token, options={"verify_signature": False})
    user = ConsoleUser(broker)
    done = user.sign_in_token(token)
    assert done.status_code == 303, done.text
    cookie = set_cookies(done)["broker_console"]
    # The session never outlives the token it came from.
    assert 0 < int(cookie["max-age"]) <= claims["exp"] - int(time.time()) + 1
    assert token not in done.text
    page = user.page("/console/")
    assert token not in page
    with broker.services.db.engine.connect() as conn:
        row = conn.execute(text("SELECT method, token_jti, token_exp FROM console_session")).one()
    assert tuple(row) == ("token", claims["jti"], claims["exp"])

    # The token revoked through the API: the session ends at its next request.
    other = broker.admin_token()
    resp = broker.client.post(f"/v1/admin/tokens/{claims['jti']}/revoke",
                              headers={"authorization": f"Bearer {other}"})
    assert resp.status_code == 200, resp.text
    ended = user.get("/console/")
    assert ended.status_code == 303 and ended.headers["location"] == "/console/sign-in?notice=ended"
    assert "Sign in again" in user.page("/console/sign-in?notice=ended")
    with broker.services.db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM console_session")).scalar_one() == 0


def test_a_session_ends_when_its_identity_is_suspended_or_idle(broker: Broker) -> None:
    tenant = broker.create_tenant()
    ta = admin_of(broker, tenant["id"], "tenant-admin")
    user = ConsoleUser(broker)
    assert user.sign_in(ta["client_id"], ta["client_secret"]).status_code == 303
    assert user.get("/console/").status_code == 200
    resp = broker.client.post(f"/v1/admin/workloads/{ta['id']}/suspend", headers=broker.admin())
    assert resp.status_code == 200, resp.text
    assert user.get("/console/tenants").status_code == 303

    # Idle past console.idle_timeout_s: ended too.
    idle = ConsoleUser(broker)
    assert idle.sign_in("admin", ADMIN_SECRET).status_code == 303
    with broker.services.db.engine.begin() as conn:
        conn.execute(text("UPDATE console_session SET last_seen = last_seen - :s"),
                     {"s": broker.settings.console.idle_timeout_s})
    assert idle.get("/console/").headers["location"] == "/console/sign-in?notice=ended"


# --- CSRF, origins and cookies over HTTPS ----------------------------------------------------


def test_a_post_without_the_right_csrf_token_or_from_another_site_changes_nothing(
        broker: Broker, org: ConsoleUser) -> None:
    agent = broker.create_workload(broker.create_tenant()["id"])
    path = f"/console/workloads/{agent['id']}/suspend"
    org.page(f"/console/workloads/{agent['id']}")
    good = org.csrf
    refusals = [
        org.post(path, {"reason": "x"}, csrf=None),
        org.post(path, {"reason": "x"}, csrf="0" * 64),
        org.post(path, {"reason": "x"}, csrf=good[:-1] + ("0" if good[-1] != "0" else "1")),
        org.post(path, {"reason": "x"}, csrf=good, headers={"origin": "http://evil.example"}),
        org.post(path, {"reason": "x"}, csrf=good, headers={"origin": "null"}),
        org.post(path, {"reason": "x"}, csrf=good, headers={"sec-fetch-site": "cross-site"}),
    ]
    for resp in refusals:
        assert "Nothing was changed" in assert_page(resp, 403)
    assert api_workload(broker, agent["id"])["suspended"] is False
    assert audit_rows(broker, "workload.suspend") == []
    # Another user's token is no good either: it is tied to its own session.
    other = ConsoleUser(broker)
    assert other.sign_in("admin", ADMIN_SECRET).status_code == 303
    other.page("/console/")
    assert other.csrf != good
    assert org.post(path, csrf=other.csrf).status_code == 403
    # The sign-in form is protected too: no pre-session cookie, or a wrong token.
    stranger = ConsoleUser(broker)
    assert stranger.post("/console/sign-in", {"client_id": "admin", "client_secret": ADMIN_SECRET},
                         csrf="0" * 64).status_code == 403
    stranger.get("/console/sign-in")
    assert stranger.post("/console/sign-in", {"client_id": "admin", "client_secret": ADMIN_SECRET},
                         csrf="1" * 64).status_code == 403
    # With everything right, as a same-origin browser sends it:
    ok = org.post(path, {"reason": "from the console"}, csrf=good,
                  headers={"origin": broker.url or "", "sec-fetch-site": "same-origin"})
    assert ok.status_code == 303 and ok.headers["location"].endswith("?notice=suspended")
    assert api_workload(broker, agent["id"])["suspended"] is True


def _scope(scheme: str, headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "scheme": scheme, "method": "GET", "path": "/console/",
                    "headers": raw, "query_string": b"", "server": ("broker.test", 443)})


def test_the_cookie_is_secure_and_host_prefixed_when_the_browser_came_over_https(
        broker: Broker) -> None:
    assert sessions.is_https(_scope("https", {}))
    assert sessions.is_https(_scope("http", {"x-forwarded-proto": "https"}))
    assert not sessions.is_https(_scope("http", {}))
    assert not sessions.is_https(_scope("http", {"x-forwarded-proto": "http"}))
    assert sessions.cookie_name(True) == "__Host-broker_console"
    assert sessions.cookie_name(False) == "broker_console"

    # Through a proxy that ended TLS: the cookies are __Host- (so Secure, Path=/, no Domain).
    https = {"x-forwarded-proto": "https"}
    form = httpx.get(f"{broker.url}/console/sign-in", headers=https)
    pre = set_cookies(form)["__Host-broker_console_pre"]
    assert pre["secure"] and pre["httponly"] and pre["path"] == "/" and not pre["domain"]
    token = CSRF.search(form.text)
    assert token is not None
    done = httpx.post(f"{broker.url}/console/sign-in", headers={
        **https, "cookie": f"__Host-broker_console_pre={pre.value}"},
        data={"csrf": token.group(1), "client_id": "admin", "client_secret": ADMIN_SECRET})
    assert done.status_code == 303, done.text
    cookie = set_cookies(done)["__Host-broker_console"]
    assert cookie["secure"] and cookie["httponly"] and cookie["samesite"].lower() == "strict"
    assert cookie["path"] == "/" and int(cookie["max-age"]) > 0
    page = httpx.get(f"{broker.url}/console/", headers={
        **https, "cookie": f"__Host-broker_console={cookie.value}"})
    assert page.status_code == 200
    # The plain cookie name means nothing over HTTPS.
    plain = httpx.get(f"{broker.url}/console/", headers={
        **https, "cookie": f"broker_console={cookie.value}"})
    assert plain.status_code == 303


# --- roles and tenants -----------------------------------------------------------------------


def test_a_tenant_admin_sees_only_its_tenant_and_cannot_act_on_another_even_by_forging(
        broker: Broker) -> None:
    mine, theirs = broker.create_tenant(), broker.create_tenant()
    ta = admin_of(broker, mine["id"], "tenant-admin")
    my_agent = broker.create_workload(mine["id"])
    their_agent = broker.create_workload(theirs["id"])
    their_token = broker.token(their_agent["client_id"], their_agent["client_secret"])
    their_jti = jwt.decode(their_token, options={"verify_signature": False})["jti"]
    user = ConsoleUser(broker)
    assert user.sign_in(ta["client_id"], ta["client_secret"]).status_code == 303

    for path in ("/console/", "/console/tenants", "/console/audit", "/console/alerts",
                 "/console/approvals"):
        page = user.page(path)
        assert theirs["id"] not in page and theirs["name"] not in page
        assert their_agent["id"] not in page
    assert mine["name"] in user.page("/console/tenants")
    assert my_agent["name"] in user.page(f"/console/tenants/{mine['id']}")
    assert_page(user.get(f"/console/tenants/{theirs['id']}"), 404)
    assert_page(user.get(f"/console/workloads/{their_agent['id']}"), 404)

    # A forged POST with a valid token of its own session: not found, nothing changed.
    user.page(f"/console/workloads/{my_agent['id']}")
    for path in (f"/console/workloads/{their_agent['id']}/suspend",
                 f"/console/workloads/{their_agent['id']}/rotate-secret",
                 f"/console/tenants/{theirs['id']}/suspend",
                 f"/console/tokens/{their_jti}/revoke"):
        assert_page(user.post(path, {"reason": "forged"}), 404)
    assert api_workload(broker, their_agent["id"])["suspended"] is False
    assert broker.client.get("/v1/admin/tenants/" + theirs["id"],
                             headers=broker.admin()).json()["suspended"] is False
    assert broker.client.get("/v1/models", headers={"authorization": f"Bearer {their_token}"}
                             ).status_code == 200
    assert audit_rows(broker, "workload.suspend") == audit_rows(broker, "workload.rotate_secret") == []
    # Its own tenant it may not suspend (the domain's rule): no button, and a forged POST is
    # refused.
    page = user.page(f"/console/tenants/{mine['id']}")
    assert f"/console/tenants/{mine['id']}/suspend" not in page
    assert_page(user.post(f"/console/tenants/{mine['id']}/suspend"), 409)
    # Within its tenant it acts.
    ok = user.post(f"/console/workloads/{my_agent['id']}/suspend", {"reason": "mine"})
    assert ok.status_code == 303
    assert api_workload(broker, my_agent["id"])["suspended"] is True


def test_an_auditor_reads_everything_and_can_press_nothing(broker: Broker) -> None:
    tenant = broker.create_tenant()
    agent = broker.create_workload(tenant["id"])
    token = broker.token(agent["client_id"], agent["client_secret"])
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    auditor = admin_of(broker, "tn_root", "auditor")
    user = ConsoleUser(broker)
    assert user.sign_in(auditor["client_id"], auditor["client_secret"]).status_code == 303
    pages = ["/console/", "/console/tenants", f"/console/tenants/{tenant['id']}",
             f"/console/workloads/{agent['id']}", "/console/approvals", "/console/alerts",
             "/console/audit", "/console/providers"]
    for path in pages:
        page = user.page(path)
        assert not POST_FORM.search(page), f"{path} shows a button to an auditor"
        assert "read-only" in page
    assert jti in user.page(f"/console/workloads/{agent['id']}")
    assert tenant["name"] in user.page("/console/tenants")
    for path in (f"/console/workloads/{agent['id']}/suspend",
                 f"/console/workloads/{agent['id']}/rotate-secret",
                 f"/console/tenants/{tenant['id']}/suspend", f"/console/tokens/{jti}/revoke",
                 "/console/alerts/al_x/clear", "/console/approvals/ap_x/approve"):
        assert "read-only" in assert_page(user.post(path, {"reason": "no"}), 403)
    assert api_workload(broker, agent["id"])["suspended"] is False
    assert broker.client.get("/v1/models", headers={"authorization": f"Bearer {token}"}
                             ).status_code == 200


# --- what the buttons do ---------------------------------------------------------------------


def test_console_actions_take_effect_on_the_api_and_are_audited_as_the_api_audits(
        both_broker: Broker, recorded_logs: list[str]) -> None:
    broker = both_broker
    org = signed_in_admin(broker)
    tenant = broker.create_tenant()
    agent = broker.create_workload(tenant["id"])
    twin = broker.create_workload(tenant["id"])
    token = broker.token(agent["client_id"], agent["client_secret"])
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    bearer = {"authorization": f"Bearer {token}"}

    page = org.page(f"/console/workloads/{agent['id']}")
    assert jti in page and f"/console/tokens/{jti}/revoke" in page
    resp = org.post(f"/console/tokens/{jti}/revoke", {"reason": "console revoke"})
    assert resp.status_code == 303
    assert resp.headers["location"] == f"/console/workloads/{agent['id']}?notice=revoked"
    assert broker.client.get("/v1/models", headers=bearer).status_code == 401
    assert jti not in org.page(f"/console/workloads/{agent['id']}?notice=revoked")

    # Suspend by console, and the same by the API on its twin: the same audit entries.
    resp = org.post(f"/console/workloads/{agent['id']}/suspend", {"reason": "same"})
    assert resp.status_code == 303
    api = broker.client.post(f"/v1/admin/workloads/{twin['id']}/suspend",
                             json={"reason": "same"}, headers=broker.admin())
    assert api.status_code == 200
    by_console, by_api = audit_rows(broker, "workload.suspend")
    assert by_console["target"] == agent["id"] and by_api["target"] == twin["id"]
    assert {k: v for k, v in by_console.items() if k != "target"} == {
        k: v for k, v in by_api.items() if k != "target"}
    assert by_console["actor"] == "wl_admin"
    refused = broker.client.post("/v1/token", data={
        "grant_type": "client_credentials", "client_id": agent["client_id"],
        "client_secret": agent["client_secret"]})
    assert_oauth_error(refused, 401, "invalid_client")

    resp = org.post(f"/console/workloads/{agent['id']}/resume")
    assert resp.status_code == 303 and api_workload(broker, agent["id"])["suspended"] is False
    assert [r["target"] for r in audit_rows(broker, "workload.resume")] == [agent["id"]]

    # Rotate: the new secret is shown once, in the answer to the POST, never in an address.
    org.page(f"/console/workloads/{agent['id']}")
    shown = org.post(f"/console/workloads/{agent['id']}/rotate-secret",
                     {"grace_s": "0", "reason": "rotated"}, record=False)
    text_ = assert_page(shown, 200)
    found = re.search(r'value="(bks_[^"]+)"', text_)
    assert found is not None
    new_secret = SECRETS.add(found.group(1))
    assert new_secret != agent["client_secret"]
    assert broker.token(agent["client_id"], new_secret)
    old = broker.client.post("/v1/token", data={
        "grant_type": "client_credentials", "client_id": agent["client_id"],
        "client_secret": agent["client_secret"]})
    assert_oauth_error(old, 401, "invalid_client")
    (rotated,) = audit_rows(broker, "workload.rotate_secret")
    assert rotated["target"] == agent["id"] and new_secret not in str(rotated)
    assert new_secret not in org.page(f"/console/workloads/{agent['id']}")
    assert not any(new_secret in line for line in recorded_logs)


def test_approvals_are_decided_and_alerts_cleared_from_the_console(
        make_live_broker: Callable[..., Broker], sqlite_url: str) -> None:
    from broker.monitoring import alerts

    prices = {"provider": "mock", "input_micros_per_mtok": 1, "output_micros_per_mtok": 1}
    broker = make_live_broker(sqlite_url, providers={"mock": {}},
                              models={"gpt-a": prices, "gpt-b": prices})
    org = ConsoleUser(broker)
    assert org.sign_in("admin", ADMIN_SECRET).status_code == 303
    tenant = broker.create_tenant()
    agent = broker.create_workload(tenant["id"], policy={"approval_models": ["gpt-*"]})
    token = broker.token(agent["client_id"], agent["client_secret"])
    asked = []
    for model in ("gpt-a", "gpt-b"):
        resp = broker.client.post("/v1/approvals", headers={"authorization": f"Bearer {token}"},
                                  json={"model": model, "ttl_s": 600, "reason": f"need {model}"})
        assert resp.status_code == 201, resp.text
        asked.append(resp.json()["id"])
    page = org.page("/console/approvals")
    assert asked[0] in page and "need gpt-b" in page
    # An approval may lower what was asked, never raise it: the domain's 422, as a page.
    raised = org.post(f"/console/approvals/{asked[0]}/approve", {"ttl_s": "6000"})
    assert "never raise" in assert_page(raised, 422)
    assert org.post(f"/console/approvals/{asked[0]}/approve", {"ttl_s": "300"}).status_code == 303
    assert org.post(f"/console/approvals/{asked[1]}/deny", {"reason": "no"}).status_code == 303
    status = {a: broker.client.get(f"/v1/admin/approvals/{a}", headers=broker.admin()).json()
              for a in asked}
    assert status[asked[0]]["status"] == "approved" and status[asked[0]]["grant_id"]
    assert status[asked[1]]["status"] == "denied"
    assert asked[0] in org.page("/console/approvals?status=approved")
    assert [r["target"] for r in audit_rows(broker, "approval.approve")] == [asked[0]]
    assert [r["target"] for r in audit_rows(broker, "approval.deny")] == [asked[1]]

    now = int(time.time())
    alert = broker.services.db.transaction(lambda conn: alerts.create(
        conn, tenant_id=tenant["id"], workload_id=agent["id"], detector="velocity",
        severity="high", action="alert", summary="spend rose fast", evidence={}, now=now))
    assert "spend rose fast" in org.page("/console/alerts")
    assert org.post(f"/console/alerts/{alert.id}/clear", {"reason": "seen"}).status_code == 303
    cleared = broker.client.get(f"/v1/admin/alerts/{alert.id}", headers=broker.admin()).json()
    assert cleared["status"] == "cleared" and cleared["cleared_by"] == "wl_admin"
    assert [r["target"] for r in audit_rows(broker, "alert.clear")] == [alert.id]
    # Clearing again, or deciding a decided request, is answered with a page, not a 500.
    assert_page(org.post(f"/console/approvals/{asked[1]}/approve"), 409)


# --- pages and bad input ---------------------------------------------------------------------


def test_overview_shows_spend_against_every_budget_with_charts(both_broker: Broker) -> None:
    """Spend per day is read from the daily rollups and from the events not rolled up yet:
    each event counted once, whichever it is in."""
    from broker.money.rollups import rollup_once

    broker = both_broker
    org = signed_in_admin(broker)
    tenant = broker.create_tenant(budgets=[{"period": "day", "limit_micros": 5_000_000}])
    agent = broker.create_workload(tenant["id"], policy={
        "models": ["gpt-x"], "token_budget_micros": 400_000,
        "budgets": [{"period": "month", "limit_micros": 2_000_000}]})
    broker.token(agent["client_id"], agent["client_secret"])  # reserves 400,000 from both
    now = int(time.time())
    with broker.services.db.engine.begin() as conn:
        for i, (ts, cost) in enumerate([(now, 250_000), (now - 86_400, 1_500_000)]):
            conn.execute(text(
                "INSERT INTO usage_event (id, request_id, ts, tenant_id, workload_id, jti, model, "
                "provider, prompt_tokens, completion_tokens, cost_micros, status, latency_ms, "
                "stream, estimated) VALUES (:id, 'r', :ts, :t, :w, 'j', 'gpt-x', 'p', 1, 1, :c, "
                "'ok', 1, false, false)"),
                {"id": f"ev{i}", "ts": ts, "t": tenant["id"], "w": agent["id"], "c": cost})
    # Yesterday's event (the oldest) is rolled up; today's is not yet.
    assert broker.services.db.transaction(lambda conn: rollup_once(conn, limit=1)) == 1
    page = org.page("/console/")
    assert f"Tenant: <a href=\"/console/tenants/{tenant['id']}\">{tenant['name']}</a>" in page
    assert "Workload:" in page and agent["name"] in page
    assert page.count('role="img"') >= 3  # the organisation, the tenant, the workload
    assert "$0.40" in page and "$5.00" in page and "$2.00" in page  # reserved and limits
    assert "$1.50" in page and "$0.25" in page and "$1.75" in page  # per day and in total
    assert "daily budget $5.00" in page
    assert "<desc id=" in page and "Spend per day from" in page


def test_the_chart_says_in_words_what_it_draws() -> None:
    day = 1_700_000_000 - 1_700_000_000 % 86_400
    svg = str(bar_chart("c1", "Spend <of> x", Series([(day, 0), (day + 86_400, 1_234_567)],
                                                     daily_limit=2_000_000)))
    assert svg.startswith("<svg") and 'aria-labelledby="c1-t c1-d"' in svg
    assert "Spend &lt;of&gt; x" in svg and "<of>" not in svg
    assert "$1.234567 in total" in svg and "daily budget $2.00" in svg
    assert svg.count("<rect") == 2 and "style=" not in svg
    assert money(0) == "$0.00" and money(-1_500_000) == "-$1.50" and money(1) == "$0.000001"


def test_every_page_renders_and_bad_input_gets_an_html_page_never_a_500(
        broker: Broker, org: ConsoleUser) -> None:
    for path in ("/console/", "/console/tenants", "/console/tenants/tn_root",
                 "/console/workloads/wl_admin", "/console/approvals", "/console/alerts",
                 "/console/audit", "/console/providers", "/console/approvals?status=denied",
                 "/console/alerts?status=all", "/console/audit?action=workload.create"):
        assert_page(org.get(path), 200)
    cases = [
        ("GET", "/console/nothing-here", 404), ("GET", "/console/tenants/tn_none", 404),
        ("GET", "/console/workloads/%00", 404), ("GET", "/console/approvals?status=bogus", 400),
        ("GET", "/console/alerts?status=%00", 400), ("GET", "/console/audit?before=x1", 400),
        ("GET", "/console/tenants?after=..%2Fx", 400), ("GET", "/console/static/..%2Fsessions.py", 404),
        ("GET", "/console/tenants/tn_root/suspend", 405), ("DELETE", "/console/tenants", 405),
    ]
    for method, path, status in cases:
        resp = org.request(method, path)
        assert_page(resp, status)
        if status == 405:
            assert resp.headers["allow"]
    org.page("/console/tenants")
    token = org.csrf
    wl = "/console/workloads/wl_admin"
    posts = [
        (org.request("POST", wl + "/rotate-secret", json={"csrf": token}), 415),
        (org.request("POST", wl + "/suspend", content=b"csrf=" + token.encode() + b"&reason=\xff",
                     headers={"content-type": "application/x-www-form-urlencoded"}), 400),
        (org.post(wl + "/suspend", {"reason": "x" * 600}), 422),
        (org.post(wl + "/suspend", {"reason": "bad\x01"}), 422),
        (org.post(wl + "/rotate-secret", {"grace_s": "-1"}), 422),
        (org.post(wl + "/rotate-secret", {"grace_s": "9" * 30}), 422),
        (org.request("POST", wl + "/suspend", content=b"x" * 70_000,
                     headers={"content-type": "application/x-www-form-urlencoded"}), 413),
        # An admin cannot suspend itself: the domain's 409, as a page.
        (org.post(wl + "/suspend"), 409),
        (org.post("/console/tokens/nope/revoke"), 404),
    ]
    for resp, status in posts:
        assert_page(resp, status)
    static = org.get("/console/static/console.css")
    assert static.status_code == 200 and static.headers["content-type"] == "text/css; charset=utf-8"
    assert org.get("/console/static/console.js").headers["content-type"].startswith(
        "text/javascript")
    assert org.get("/console/static/favicon.svg").headers["content-type"] == "image/svg+xml"
    # The API outside /console is untouched: problem+json, not a page.
    assert broker.client.get("/consoles").headers["content-type"] == "application/problem+json"


def test_the_console_can_be_turned_off(make_live_broker: Callable[..., Broker],
                                       sqlite_url: str) -> None:
    off = make_live_broker(sqlite_url, console={"enabled": False})
    resp = off.client.get("/console/")
    assert resp.status_code == 404
    assert resp.headers["content-type"] == "application/problem+json"


def test_the_providers_page_names_providers_and_models_but_no_key(
        make_live_broker: Callable[..., Broker], sqlite_url: str) -> None:
    key_path = f"prov-{secrets.token_hex(4)}/openai"
    b = make_live_broker(sqlite_url, providers={"openai": {
        "base_url": "https://user:pw@api.example.test/v1", "vault_path": key_path}},
        models={"gpt-z": {"provider": "openai", "input_micros_per_mtok": 150_000,
                          "output_micros_per_mtok": 600_000}})
    user = ConsoleUser(b)
    assert user.sign_in("admin", ADMIN_SECRET).status_code == 303
    page = user.page("/console/providers")
    assert "https://api.example.test/v1" in page and "gpt-z" in page and "$0.15" in page
    assert "user:pw" not in page and key_path not in page
