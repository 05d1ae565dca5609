"""Hostile input on every route: a 4xx in the route's error dialect, never a 500.

The routes come from the running app (``app.router.routes``), so a route added later is attacked
too; which routes take a body comes from the app's own ``/openapi.json``. Each row of the table is
one attack; it is sent to every route it applies to, on SQLite and on PostgreSQL.

The expected dialects are the spec's (API.md, "Errors speak the convention of the caller"):
OAuth routes answer ``{"error", "error_description"}``, admin and identity routes answer
``application/problem+json`` with ``type, title, status, detail``, gateway routes answer the
OpenAI or Anthropic error object.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.routing import Route
from starlette.testclient import TestClient

from broker.api.app import create_app
from broker.devvault import DevVault
from broker.services import Services
from broker.storage.db import make_engine, migrate
from tests.conftest import (
    PG_ADMIN_URL,
    RESPONSES,
    Broker,
    _LoggingClient,
    _pg_admin,
    make_settings,
)

# --- the spec's dialects -------------------------------------------------------------------

OAUTH_PATHS = {"/v1/token", "/v1/introspect"}
OPENAI_PREFIXES = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/models",
                   "/v1/files", "/v1/batches")
ANTHROPIC_PREFIXES = ("/v1/messages",)
# RFC 6749 §5.2 / RFC 6750 §3.1 codes and the spec's own additions for the OAuth routes.
OAUTH_CODES = {
    "invalid_request", "invalid_client", "invalid_grant", "unauthorized_client",
    "unsupported_grant_type", "invalid_scope", "invalid_token", "slow_down", "budget_exhausted",
    "payload_too_large", "method_not_allowed", "not_found",
}


def dialect(path: str) -> str:
    if path in OAUTH_PATHS:
        return "oauth"
    if path.startswith(OPENAI_PREFIXES):
        return "openai"
    if path.startswith(ANTHROPIC_PREFIXES):
        return "anthropic"
    return "problem"


def assert_error_shape(resp: Any, dialect_name: str) -> None:
    """The body is the spec's error object for the dialect, and the request id is there."""
    assert resp.headers.get("x-request-id"), "every response carries x-request-id"
    media = resp.headers.get("content-type", "").split(";")[0].strip()
    if resp.request.method == "HEAD":
        return
    body = resp.json()
    if dialect_name == "oauth":
        assert media == "application/json", media
        assert set(body) == {"error", "error_description"}, body
        assert body["error"] in OAUTH_CODES, body
        assert re.fullmatch(r"[\x20\x21\x23-\x5b\x5d-\x7e]+", body["error_description"]), body
    elif dialect_name == "problem":
        assert media == "application/problem+json", media
        assert {"type", "title", "status", "detail"} <= set(body), body
        assert body["status"] == resp.status_code, body
        assert all(isinstance(body[k], str) for k in ("type", "title", "detail")), body
    elif dialect_name == "openai":
        assert media == "application/json", media
        assert set(body) == {"error"} and {"message", "type", "code", "param"} <= set(body["error"])
    else:
        assert media == "application/json", media
        assert body["type"] == "error" and {"type", "message"} <= set(body["error"]), body


def assert_refused(resp: Any, dialect_name: str, expected: set[int] | None, what: str) -> None:
    assert resp.status_code < 500, f"{what}: {resp.status_code} {resp.text[:300]}"
    assert 400 <= resp.status_code < 500, f"{what}: {resp.status_code} {resp.text[:300]}"
    if expected is not None:
        assert resp.status_code in expected, f"{what}: {resp.status_code} {resp.text[:300]}"
    assert_error_shape(resp, dialect_name)


# --- the world each attack runs in ---------------------------------------------------------


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def uniq(prefix: str = "n") -> str:
    return f"{prefix}-{secrets.token_hex(5)}"


@dataclass
class Target:
    method: str
    template: str
    url: str
    takes_body: bool
    lists: bool = False

    @property
    def dialect(self) -> str:
        return dialect(self.template)

    @property
    def admin(self) -> bool:
        return self.template.startswith("/v1/admin")

    @property
    def takes_bearer(self) -> bool:
        return self.admin or self.template == "/v1/introspect" or self.workload_route or (
            self.dialect in ("openai", "anthropic"))

    @property
    def workload_route(self) -> bool:
        """An identity route a workload calls with its own broker token."""
        return self.template.startswith("/v1/approvals")


@dataclass
class World:
    broker: Broker
    admin_token: str
    tenant: dict[str, Any]
    agent: dict[str, Any]
    agent_token: str
    targets: list[Target] = field(default_factory=list)

    @property
    def client(self) -> Any:
        return self.broker.client

    def auth(self, target: Target) -> dict[str, str]:
        """The credentials that get a request past authentication to the part under attack."""
        if target.admin:
            return {"authorization": f"Bearer {self.admin_token}"}
        if target.template == "/v1/introspect":
            return {"authorization": basic(self.agent["client_id"], self.agent["client_secret"])}
        if target.dialect in ("openai", "anthropic") or target.workload_route:
            return {"authorization": f"Bearer {self.agent_token}"}
        return {}

    def base_body(self, target: Target) -> dict[str, Any] | None:
        """A body the route accepts, for attacks that break one field of it."""
        key = (target.method, target.template)
        if key in {("POST", "/v1/admin/tenants"), ("PATCH", "/v1/admin/tenants/{id}")}:
            return {"name": uniq("t")}
        if key == ("POST", "/v1/admin/workloads"):
            return {"tenant_id": self.tenant["id"], "name": uniq("w"), "kind": "agent",
                    "policy": {"models": ["gpt-4o-mini"]}}
        if key == ("PATCH", "/v1/admin/workloads/{id}"):
            return {"name": uniq("w")}
        if key == ("POST", "/v1/token"):
            return {"grant_type": "client_credentials", "client_id": self.agent["client_id"],
                    "client_secret": self.agent["client_secret"]}
        if key == ("POST", "/v1/introspect"):
            return {"token": self.agent_token}
        if key == ("POST", "/v1/approvals"):
            return {"budget_micros": 1000, "rpm": 100, "ttl_s": 60}
        if key == ("POST", "/v1/admin/grants"):
            return {"workload_id": self.agent["id"], "budget_micros": 0, "rpm": 100,
                    "ttl_s": 60}
        return None

    def money_slots(self, target: Target) -> list[Callable[[Any], dict[str, Any]]]:
        """Ways to put one amount of money into the route's base body."""
        if self.base_body(target) is None:
            return []

        def base() -> dict[str, Any]:
            return self.base_body(target) or {}  # a fresh unique name for every probe

        if target.template.startswith("/v1/admin/tenants"):
            return [lambda v: {**base(), "budgets": [{"period": "day", "limit_micros": v}]}]
        if target.template.startswith("/v1/admin/workloads"):
            return [
                lambda v: {**base(), "policy": {"token_budget_micros": v}},
                lambda v: {**base(), "policy": {"budgets": [{"period": "day", "limit_micros": v}]}},
                lambda v: {**base(), "policy": {"burst": {"window_s": 60, "limit_micros": v}}},
            ]
        if target.template in ("/v1/token", "/v1/approvals", "/v1/admin/grants"):
            return [lambda v: {**base(), "budget_micros": v}]
        return []

    def name_slots(self, target: Target) -> list[Callable[[str], dict[str, Any]]]:
        base = self.base_body(target)
        if base is None or "name" not in base:
            return []
        return [lambda v: {**base, "name": v}]

    def fill(self, template: str) -> str:
        """A concrete URL: path parameters name real objects, so only the attack is wrong."""

        def one(match: re.Match[str]) -> str:
            before = template[: match.start()].rstrip("/").rsplit("/", 1)[-1]
            named: dict[str, str] = {"tenants": self.tenant["id"], "workloads": self.agent["id"]}
            return named.get(before, "zz_nothing")

        return re.sub(r"\{[^}]+\}", one, template)


def app_routes(broker: Broker) -> list[tuple[str, str]]:
    """(method, path template) of every HTTP route of the running app."""
    app = broker.client._inner.app
    out = []
    for route in app.router.routes:
        assert isinstance(route, Route), f"{route!r}: teach this table about non-HTTP routes"
        out += [(m, route.path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return out


def build_world(broker: Broker) -> World:
    admin_token = broker.admin_token()
    tenant = broker.create_tenant()
    agent = broker.create_workload(
        tenant["id"], policy={"models": ["gpt-4o-mini"], "token_budget_micros": 1_000_000})
    agent_token = broker.token(agent["client_id"], agent["client_secret"])
    w = World(broker, admin_token, tenant, agent, agent_token)
    doc = broker.client.get("/openapi.json").json()
    for method, template in app_routes(broker):
        op = doc["paths"].get(template, {}).get(method.lower(), {})
        target = Target(method, template, w.fill(template), takes_body="requestBody" in op)
        if method == "GET" and target.admin and "{" not in template:
            probe = broker.client.get(target.url, headers=w.auth(target))
            target.lists = probe.status_code == 200 and "next_cursor" in probe.json()
        w.targets.append(target)
    assert any(t.lists for t in w.targets)
    return w


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, vault: DevVault,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One broker per backend for the whole table: building one costs far more than the few
    requests of an attack, and every attack is refused, so none changes what the next sees."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('bad-input')}/broker.db"
            engine = make_engine(url)
            migrate(engine)
            engine.dispose()
        else:
            template = request.getfixturevalue("pg_template")
            name = f"broker_bad_{secrets.token_hex(4)}"
            with _pg_admin() as conn:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            stack.callback(_drop_database, name)
            url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        settings = make_settings(url, vault)
        services = Services.build(settings)
        stack.callback(services.close)
        app = create_app(settings, services=services)
        client = stack.enter_context(TestClient(app, base_url="http://broker.test"))
        yield build_world(Broker(settings, services, _LoggingClient(client, RESPONSES)))


def _drop_database(name: str) -> None:
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- probes and the attack table -----------------------------------------------------------


@dataclass
class Probe:
    target: Target
    headers: dict[str, Any] = field(default_factory=dict)
    content: Any = None
    url: str | None = None
    method: str | None = None
    expected: set[int] | None = None  # None: any 4xx


Attack = Callable[[World, Target], Iterator[Probe]]


@dataclass(frozen=True)
class Row:
    attack: Attack
    # Expected statuses by dialect; a dialect not named here may answer any 4xx.
    expect: dict[str, set[int]]


def _json_raw(body: dict[str, Any], raw_value: str) -> bytes:
    """``body`` as JSON text with the placeholder string replaced by a raw JSON literal."""
    return json.dumps(body).replace('"__RAW__"', raw_value).encode()


def raw_body(raw: bytes, ctype: str | None = "application/json") -> Attack:
    def attack(w: World, t: Target) -> Iterator[Probe]:
        if t.takes_body:
            headers = {**w.auth(t)}
            if ctype is not None:
                headers["content-type"] = ctype
            yield Probe(t, headers, raw)

    return attack


def body_of(make: Callable[[World, Target], list[bytes]], ctype: str = "application/json") -> Attack:
    def attack(w: World, t: Target) -> Iterator[Probe]:
        if not t.takes_body:
            return
        for raw in make(w, t):
            yield Probe(t, {**w.auth(t), "content-type": ctype}, raw)

    return attack


def money(raw_value: str) -> Callable[[World, Target], list[bytes]]:
    return lambda w, t: [_json_raw(slot("__RAW__"), raw_value) for slot in w.money_slots(t)]


def names(value: str) -> Callable[[World, Target], list[bytes]]:
    return lambda w, t: [json.dumps(slot(value)).encode() for slot in w.name_slots(t)]


def each_field(wrong: Callable[[Any], list[Any]]) -> Callable[[World, Target], list[bytes]]:
    def make(w: World, t: Target) -> list[bytes]:
        base = w.base_body(t) or {}
        return [json.dumps({**base, k: bad}).encode() for k, v in base.items() for bad in wrong(v)]

    return make


def _wrong_types(value: Any) -> list[Any]:
    candidates: tuple[Any, ...] = (5, True, [], {}, "text", 1.5)
    return [bad for bad in candidates if type(bad) is not type(value)]


def _str_fields(with_: str) -> Callable[[Any], list[Any]]:
    return lambda v: [v[:4] + with_ + v[4:]] if isinstance(v, str) else []


def admin_only(attack: Attack) -> Attack:
    """JSON strings where OAuth expects its form-compatible strings are not hostile there."""
    return lambda w, t: attack(w, t) if t.admin else iter(())


def required_body(attack: Attack) -> Attack:
    """Only where the body is required (some routes take an optional one, e.g. a reason)."""
    return lambda w, t: attack(w, t) if w.base_body(t) is not None else iter(())


def form(text: bytes) -> Attack:
    def attack(w: World, t: Target) -> Iterator[Probe]:
        if t.takes_body:
            yield Probe(t, {**w.auth(t), "content-type": "application/x-www-form-urlencoded"},
                        text)

    return attack


_CREDS = b"grant_type=client_credentials&client_id=wl_x&client_secret=bks_x"
BIG = b'{"name":"' + b"a" * 1_048_576 + b'"}'
DEEP = b'{"name":' + b"[" * 30_000 + b"]" * 30_000 + b"}"
NESTED = b'{"policy":{"models":' + b"[" * 100 + b"]" * 100 + b"}}"
BAD_REQUEST = {"problem": {400}, "oauth": {400}}
INVALID = {"problem": {422}, "oauth": {400}}
WRONG_POLICIES: tuple[dict[str, Any], ...] = (
    {"models": "gpt-4o"}, {"rate": {"rpm": "60"}}, {"token_ttl_s": "300"}, {"budgets": {}},
    {"rate": []}, {"burst": {"window_s": 1.5, "limit_micros": 1}})

BODY_ATTACKS = [
    pytest.param(Row(raw_body(b'{"name": '), BAD_REQUEST), id="malformed-json"),
    pytest.param(Row(raw_body(b'{"name": "abc", "budgets": [{"period": "day"'), BAD_REQUEST),
                 id="truncated-json"),
    pytest.param(Row(required_body(raw_body(b"")), BAD_REQUEST), id="empty-json"),
    pytest.param(Row(raw_body(b"[1, 2]"), INVALID), id="json-array"),
    pytest.param(Row(raw_body(b'"a string"'), INVALID), id="json-string"),
    pytest.param(Row(raw_body(b"null"), INVALID), id="json-null"),
    pytest.param(Row(raw_body(b"12"), INVALID), id="json-number"),
    pytest.param(Row(raw_body(b'{"name": "a", "name": "b"}'), BAD_REQUEST), id="duplicate-keys"),
    pytest.param(Row(raw_body(b'{"a": {"b": 1, "b": 2}}'), BAD_REQUEST),
                 id="duplicate-nested-keys"),
    pytest.param(Row(raw_body(b'{"budget_micros": NaN, "x": Infinity}'), BAD_REQUEST),
                 id="nan-infinity"),
    pytest.param(Row(raw_body(b'{"budget_micros": ' + b"9" * 5000 + b"}"), BAD_REQUEST),
                 id="int-of-5000-digits"),
    pytest.param(Row(raw_body(DEEP), BAD_REQUEST), id="nested-30000-deep"),
    pytest.param(Row(raw_body(NESTED), {"problem": {400, 422}, "oauth": {400}}),
                 id="nested-100-deep"),
    pytest.param(Row(raw_body(b'{"name": "\xff\xfe"}'), BAD_REQUEST), id="invalid-utf8"),
    pytest.param(Row(raw_body('{"name": "abc"}'.encode("utf-16"),
                              "application/json; charset=utf-16"), BAD_REQUEST), id="utf16"),
    pytest.param(Row(raw_body(BIG), {"problem": {413}, "oauth": {413}}), id="1mb-body"),
    pytest.param(Row(lambda w, t: (Probe(t, {**w.auth(t), "content-type": "application/json"},
                                         iter([BIG[i:i + 65536] for i in range(0, len(BIG), 65536)]))
                                   for _ in [0] if t.takes_body),
                     {"problem": {413}, "oauth": {413}}), id="1mb-body-chunked"),
    pytest.param(Row(raw_body(b'{"name": "x"}', "text/plain"), {"problem": {415}, "oauth": {400}}),
                 id="content-type-text-plain"),
    pytest.param(Row(raw_body(b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x"),
                     {"problem": {415}, "oauth": {400}}), id="content-type-multipart"),
    pytest.param(Row(raw_body(_CREDS, "application/x-www-form-urlencoded"),
                     {"problem": {415}}), id="content-type-form-on-admin"),
    pytest.param(Row(raw_body(b'{"name": "x"}', "application/xml"),
                     {"problem": {415}, "oauth": {400}}), id="content-type-xml"),
    pytest.param(Row(admin_only(body_of(lambda w, t: [
        json.dumps({**(w.base_body(t) or {}), "zzz": 1}).encode()])), INVALID), id="unknown-field"),
    pytest.param(Row(body_of(lambda w, t: [json.dumps({**(w.base_body(t) or {}),
                                                       "policy": {"modles": ["gpt-4o"]}}).encode()]
                             if t.template.startswith("/v1/admin/workloads") else []),
                     INVALID), id="unknown-nested-field"),
    pytest.param(Row(body_of(each_field(_wrong_types)), INVALID), id="wrong-types"),
    pytest.param(Row(body_of(lambda w, t: [
        json.dumps({**(w.base_body(t) or {}), "policy": bad}).encode()
        for bad in WRONG_POLICIES
    ] if t.template.startswith("/v1/admin/workloads") else []), INVALID), id="policy-wrong-types"),
    pytest.param(Row(body_of(money("-1")), INVALID), id="negative-money"),
    pytest.param(Row(body_of(money(str(10**30))), INVALID), id="money-10e30"),
    pytest.param(Row(body_of(money(str(2**63))), INVALID), id="money-2e63"),
    pytest.param(Row(body_of(money("100.0")), INVALID), id="money-float-100.0"),
    pytest.param(Row(body_of(money("1e6")), INVALID), id="money-float-1e6"),
    pytest.param(Row(body_of(money("true")), INVALID), id="money-boolean"),
    pytest.param(Row(admin_only(body_of(money('"100"'))), INVALID), id="money-string"),
    pytest.param(Row(body_of(each_field(_str_fields("\u0000"))), INVALID), id="nul-in-strings"),
    pytest.param(Row(body_of(each_field(_str_fields("\ud800"))), INVALID),
                 id="lone-surrogate-in-strings"),
    pytest.param(Row(body_of(names("")), INVALID), id="name-0-chars"),
    pytest.param(Row(body_of(names("n" * 129)), INVALID), id="name-129-chars"),
    pytest.param(Row(body_of(names("evil\u202egpj.exe")), INVALID), id="name-bidi-override"),
    pytest.param(Row(body_of(names("a\u2066b")), INVALID), id="name-bidi-isolate"),
    pytest.param(Row(body_of(names("a\nb")), INVALID), id="name-newline"),
    pytest.param(Row(body_of(names("a\u200bb")), INVALID), id="name-zero-width"),
    pytest.param(Row(body_of(names("a\x00b")), INVALID), id="name-nul"),
    pytest.param(Row(form(b"grant_type=client_credentials&client_id=a%00b&client_secret=x"),
                     {"oauth": {400}, "problem": {415}}), id="form-nul"),
    pytest.param(Row(form(b"grant_type=client_credentials&grant_type=client_credentials"),
                     {"oauth": {400}, "problem": {415}}), id="form-repeated-param"),
    pytest.param(Row(form(b"grant_type"), {"oauth": {400}, "problem": {415}}),
                 id="form-field-without-value"),
    pytest.param(Row(form(b"&".join(b"f%d=x" % i for i in range(100))),
                     {"oauth": {400}, "problem": {415}}), id="form-100-fields"),
    pytest.param(Row(form(b"grant_type=client_credentials&client_id=\xff&client_secret=x"),
                     {"oauth": {400, 401}, "problem": {415}}), id="form-invalid-utf8"),
    pytest.param(Row(form(_CREDS + b"&budget_micros=%C2%B2"), {"oauth": {400}, "problem": {415}}),
                 id="form-superscript-digit"),
    pytest.param(Row(form(_CREDS + b"&ttl_s=" + b"9" * 40), {"oauth": {400}, "problem": {415}}),
                 id="form-enormous-int"),
    pytest.param(Row(form(_CREDS + b"&budget_micros=-5"), {"oauth": {400}, "problem": {415}}),
                 id="form-negative-money"),
    pytest.param(Row(form(_CREDS + b"&budget_micros=1e6"), {"oauth": {400}, "problem": {415}}),
                 id="form-float-money"),
    pytest.param(Row(lambda w, t: (Probe(t, {**w.auth(t), "content-type": "application/json",
                                             "content-length": cl}, b"{}")
                                   for cl in ("abc", "-1", b"\xb2") if t.takes_body),
                     BAD_REQUEST), id="bad-content-length"),
    pytest.param(Row(lambda w, t: (Probe(t, {**w.auth(t), "content-type": "application/json",
                                             "content-length": "9" * 5000}, b"{}")
                                   for _ in [0] if t.takes_body),
                     {"problem": {400, 413}, "oauth": {400, 413}}), id="content-length-5000-digits"),
]


@pytest.mark.parametrize("row", BODY_ATTACKS)
def test_hostile_body_is_refused_in_the_routes_dialect(world: World, row: Row) -> None:
    run(world, row)


def run(world: World, row: Row) -> None:
    sent = 0
    for target in world.targets:
        for probe in row.attack(world, target):
            expected = probe.expected or row.expect.get(target.dialect)
            resp = world.client.request(probe.method or target.method, probe.url or target.url,
                                        headers=probe.headers, content=probe.content)
            assert_refused(resp, target.dialect, expected,
                           f"{probe.method or target.method} {probe.url or target.url}")
            sent += 1
    assert sent, "the attack applied to no route"


# --- bearer tokens -------------------------------------------------------------------------


@dataclass
class Forge:
    """Hand-built JWTs: header and payload are raw JSON text, so keys can be duplicated."""

    key: Ed25519PrivateKey
    kid: str
    claims: dict[str, Any]

    @classmethod
    def of(cls, w: World) -> Forge:
        key = w.broker.services.keyring.current
        claims = jwt.decode(w.admin_token, options={"verify_signature": False})
        return cls(key.private_key, key.kid, claims)

    def header(self, **extra: Any) -> str:
        return json.dumps({"alg": "EdDSA", "typ": "at+jwt", "kid": self.kid, **extra})

    def payload(self, **extra: Any) -> str:
        return json.dumps({**self.claims, **extra})

    def token(self, header: str | None = None, payload: str | None = None,
              key: Ed25519PrivateKey | None = None, sig: str | None = None) -> str:
        head = b64u((header or self.header()).encode())
        body = b64u((payload or self.payload()).encode())
        signing_input = f"{head}.{body}"
        if sig is None:
            sig = b64u((key or self.key).sign(signing_input.encode()))
        return f"{signing_input}.{sig}"

    def sized(self, length: int) -> str:
        """A correctly signed admin token of exactly ``length`` characters (base64 lengths
        step unevenly, so a header field takes up the slack)."""
        for q in range(4):
            header = self.header(**({"pad": "h" * q} if q else {}))
            short = len(self.token(header=header, payload=self.payload(pad="")))
            guess = (length - short) * 3 // 4
            for p in range(max(0, guess - 6), guess + 6):
                token = self.token(header=header, payload=self.payload(pad="x" * p))
                if len(token) == length:
                    return token
        raise AssertionError(f"cannot build a token of {length} characters")


def _public_raw(f: Forge) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return f.key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)


def _hs256(f: Forge) -> str:
    head = b64u(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": f.kid}).encode())
    body = b64u(f.payload().encode())
    mac = hmac.new(_public_raw(f), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64u(mac)}"


def _embedded_jwk(f: Forge) -> str:
    mine = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives import serialization

    x = b64u(mine.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw))
    header = f.header(jwk={"kty": "OKP", "crv": "Ed25519", "x": x})
    return f.token(header=header, key=mine)


def _dup_header(f: Forge) -> str:
    good = f.header()[:-1]
    return f.token(header='{"typ": "JWT", ' + good[1:] + "}")


def _dup_payload(f: Forge) -> str:
    # Sub-agent claims first, then the admin's: a parser keeping the last one sees an admin.
    payload = f.payload()
    return f.token(payload='{"roles": [], "kind": "agent", ' + payload[1:])


_NOW = int(time.time())
TOKENS: list[Any] = [
    pytest.param(lambda f: "", id="empty"),
    pytest.param(lambda f: "   ", id="blank"),
    pytest.param(lambda f: f.sized(8193), id="8kb-plus-1-signed"),
    pytest.param(lambda f: "a" * 100_000, id="100kb"),
    pytest.param(lambda f: f.token(header=json.dumps({"alg": "none", "typ": "at+jwt",
                                                     "kid": f.kid}), sig=""), id="alg-none"),
    pytest.param(lambda f: f.token(header=json.dumps({"alg": "none", "typ": "at+jwt"}), sig=""),
                 id="alg-none-no-kid"),
    pytest.param(_hs256, id="alg-hs256-public-key-as-secret"),
    pytest.param(lambda f: f.token(header=f.header(alg="ES256")), id="alg-es256-on-ed25519-kid"),
    pytest.param(lambda f: f.token(header=f.header(typ="JWT")), id="typ-jwt"),
    pytest.param(lambda f: f.token(header=json.dumps({"alg": "EdDSA", "kid": f.kid})),
                 id="typ-missing"),
    pytest.param(lambda f: f.token(header=f.header(jku="http://127.0.0.1:1/jwks.json")),
                 id="jku-header"),
    pytest.param(lambda f: f.token(header=f.header(x5u="http://127.0.0.1:1/cert.pem")),
                 id="x5u-header"),
    pytest.param(_embedded_jwk, id="jwk-header-self-signed"),
    pytest.param(lambda f: f.token(header=f.header(crit=["exp"])), id="crit-header"),
    pytest.param(lambda f: f.token(header=f.header(kid="k_unknown")), id="kid-unknown"),
    pytest.param(lambda f: f.token(header=f.header(kid=7)), id="kid-not-a-string"),
    pytest.param(lambda f: f.token(header=json.dumps({"alg": "EdDSA", "typ": "at+jwt"})),
                 id="kid-missing"),
    pytest.param(lambda f: f.token(key=Ed25519PrivateKey.generate()), id="signed-by-another-key"),
    pytest.param(_dup_header, id="duplicate-key-in-header"),
    pytest.param(_dup_payload, id="duplicate-key-in-payload"),
    pytest.param(lambda f: f.token(header="not json"), id="header-not-json"),
    pytest.param(lambda f: f.token(header='["alg", "EdDSA"]'), id="header-json-array"),
    pytest.param(lambda f: f.token(payload="[1, 2]"), id="payload-json-array"),
    pytest.param(lambda f: f.token(header="[" * 2000 + "]" * 2000), id="header-nested-2000-deep"),
    pytest.param(lambda f: f.token(payload="[" * 3000 + "]" * 3000), id="payload-nested-3000-deep"),
    pytest.param(lambda f: f.token(payload=f.payload()[:-1] + ', "big": ' + "9" * 5000 + "}"),
                 id="payload-5000-digit-int"),
    pytest.param(lambda f: f.token(payload=f.payload(iat=_NOW - 4000, nbf=_NOW - 4000,
                                                     exp=_NOW - 3600)), id="expired"),
    pytest.param(lambda f: f.token(payload=f.payload(nbf=_NOW + 3600)), id="not-yet-valid"),
    pytest.param(lambda f: f.token(payload=f.payload(aud="someone-else")), id="wrong-audience"),
    pytest.param(lambda f: f.token(payload=f.payload(aud=["ai-broker", "other"])),
                 id="audience-list"),
    pytest.param(lambda f: f.token(payload=f.payload(iss="http://evil.test")), id="wrong-issuer"),
    pytest.param(lambda f: f.token(payload=json.dumps(
        {k: v for k, v in f.claims.items() if k != "jti"})), id="missing-jti"),
    pytest.param(lambda f: f.token(payload=f.payload(sub=5)), id="sub-not-a-string"),
    pytest.param(lambda f: f.token(payload=f.payload(roles="org-admin")), id="roles-not-a-list"),
    pytest.param(lambda f: f.token() + ".extra", id="four-segments"),
    pytest.param(lambda f: "!!!.$$$.%%%", id="not-base64"),
    pytest.param(lambda f: f.token().replace(".", ". ", 1), id="space-inside"),
    pytest.param(lambda f: f.token()[:-3], id="truncated-signature"),
]


@pytest.mark.parametrize("make", TOKENS)
def test_garbage_bearer_token_is_refused_with_401(world: World, make: Callable[[Forge], str]
                                                  ) -> None:
    token = make(Forge.of(world))
    sent = 0
    for t in world.targets:
        if not t.takes_bearer:
            continue
        content = json.dumps({"token": world.agent_token} if t.template == "/v1/introspect"
                             else {}).encode()
        resp = world.client.request(t.method, t.url, content=content if t.takes_body else None,
                                    headers={"authorization": f"Bearer {token}",
                                             "content-type": "application/json"})
        assert_refused(resp, t.dialect, {401}, f"{t.method} {t.url}")
        sent += 1
    assert sent


def test_hand_built_tokens_are_accepted_when_nothing_is_wrong(world: World) -> None:
    """The control for the table above: the forger's honest tokens work, up to 8 KB exactly."""
    forge = Forge.of(world)
    for token in (forge.token(), forge.sized(8192)):
        resp = world.client.get("/v1/admin/tenants", headers={"authorization": f"Bearer {token}"})
        assert resp.status_code == 200, resp.text
        # The admin's own view of the tenants: the world's tenant among them.
        assert world.tenant["id"] in {t["id"] for t in resp.json()["data"]}, resp.text


def test_introspecting_garbage_answers_inactive(world: World) -> None:
    forge = Forge.of(world)
    headers = {"authorization": basic(world.agent["client_id"], world.agent["client_secret"])}
    for param in TOKENS:
        token = param.values[0](forge)
        resp = world.client.post("/v1/introspect", data={"token": token}, headers=headers)
        if token == "":
            assert resp.status_code == 400, param.id
            continue
        if resp.status_code == 413:
            continue  # the 100 KB one does not fit in a token request
        assert resp.status_code == 200, (param.id, resp.text)
        assert resp.json() == {"active": False}, param.id


# --- client authentication -----------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


BASIC = [
    pytest.param("Basic !!!not-base64", id="not-base64"),
    pytest.param("Basic " + _b64(b"no-colon"), id="no-colon"),
    pytest.param("Basic ", id="empty"),
    pytest.param("Basic " + _b64(b"\xff\xfe:\xfd"), id="invalid-utf8"),
    pytest.param("Basic " + _b64(b"wl_x%00y:secret"), id="percent-encoded-nul"),
    pytest.param("Basic " + _b64(b"wl_x\x00y:secret"), id="raw-nul"),
    pytest.param("Basic " + _b64(b"wl_x:sec%00ret"), id="nul-in-secret"),
    pytest.param("Basic " + _b64(b"%ED%A0%80:x"), id="percent-encoded-surrogate"),
    pytest.param("Basic " + _b64(b"a" * 20_000 + b":b"), id="20kb-client-id"),
    pytest.param("Basic " + _b64(b"wl_x:" + b"s" * 20_000), id="20kb-secret"),
    pytest.param("Basic " + _b64("wl_\u202e:x".encode()), id="bidi-client-id"),
    pytest.param("Basic " + _b64(b":"), id="only-colon"),
]


@pytest.mark.parametrize("header", BASIC)
def test_bad_basic_credentials_are_refused(world: World, header: str) -> None:
    sent = 0
    for t in world.targets:
        if t.template == "/v1/token":
            resp = world.client.post(t.url, data={"grant_type": "client_credentials"},
                                     headers={"authorization": header})
        elif t.template == "/v1/introspect":
            resp = world.client.post(t.url, data={"token": world.agent_token},
                                     headers={"authorization": header})
        elif t.admin:
            resp = world.client.request(t.method, t.url, headers={"authorization": header})
        else:
            continue
        assert_refused(resp, t.dialect, {401}, f"{t.method} {t.url}")
        sent += 1
    assert sent


def test_basic_and_body_credentials_together_are_refused(world: World) -> None:
    a = world.agent
    resp = world.client.post("/v1/token", data={
        "grant_type": "client_credentials", "client_secret": a["client_secret"]},
        headers={"authorization": basic(a["client_id"], a["client_secret"])})
    assert_refused(resp, "oauth", {400}, "basic+body")


# --- paths, queries, methods ---------------------------------------------------------------

BAD_IDS = ["%00", "wl_%00", "a" * 65, "..", "%2e%2e", "x%0ay", "%ff", "%D1%82%D0%B5", "%E2%80%AE",
           "wl_'%20OR%201=1--", "%20", "tn_" + "0" * 1000]


def test_garbage_path_ids_are_not_found(world: World) -> None:
    sent = 0
    for t in world.targets:
        if "{" not in t.template:
            continue
        for bad in BAD_IDS:
            url = re.sub(r"\{[^}]+\}", bad, t.template)
            resp = world.client.request(t.method, url, headers={
                **world.auth(t), "content-type": "application/json"},
                content=b"{}" if t.takes_body else None)
            # The dialect of the path as sent: a client normalises ".." away (out of /v1/batches).
            assert_refused(resp, dialect(resp.request.url.path), {404, 400} if t.admin else None,
                           f"{t.method} {url}")
            sent += 1
    assert sent


QUERIES = [
    pytest.param("limit=0", id="limit-0"),
    pytest.param("limit=-1", id="limit-negative"),
    pytest.param("limit=1001", id="limit-1001"),
    pytest.param("limit=abc", id="limit-text"),
    pytest.param("limit=1.5", id="limit-float"),
    pytest.param("limit=1e3", id="limit-exponent"),
    pytest.param(f"limit={10**30}", id="limit-10e30"),
    pytest.param("limit=", id="limit-empty"),
    pytest.param("limit=%C2%B2", id="limit-superscript-digit"),
    pytest.param("limit=%00", id="limit-nul"),
    pytest.param("limit=" + "9" * 5000, id="limit-5000-digits"),
    pytest.param("cursor=%00", id="cursor-nul"),
    pytest.param("cursor=" + "c" * 65, id="cursor-too-long"),
    pytest.param("cursor=a%0ab", id="cursor-newline"),
    pytest.param("cursor=%E2%80%AE", id="cursor-bidi"),
    pytest.param("cursor=%ff", id="cursor-invalid-utf8"),
    pytest.param("tenant_id=%00", id="tenant-id-nul"),
]


# Routes that answer {"data", "next_cursor"} but take no cursor or limit (a short fixed list,
# usage totals): they may ignore both, but must not break on them. Every other list validates.
LISTS_THAT_IGNORE_PAGING = {"/v1/admin/keys/signing", "/v1/admin/usage"}


@pytest.mark.parametrize("query", QUERIES)
def test_cursor_and_limit_garbage_is_refused(world: World, query: str) -> None:
    sent = 0
    for t in world.targets:
        if not t.lists:
            continue
        if t.template in LISTS_THAT_IGNORE_PAGING:
            resp = world.client.get(f"{t.url}?{query}", headers=world.auth(t))
            assert resp.status_code < 500, resp.text
            continue
        if query.startswith("tenant_id") and "workloads" not in t.template:
            continue
        resp = world.client.get(f"{t.url}?{query}", headers=world.auth(t))
        assert_refused(resp, t.dialect, {400}, f"GET {t.url}?{query}")
        sent += 1
    assert sent


@pytest.mark.parametrize("query", ["x=%00", "a=%ff&a=%00&" + "b=1&" * 500, "%00=%00", "=&&=&"])
def test_junk_query_strings_never_break_a_route(world: World, query: str) -> None:
    for t in world.targets:
        if t.method != "GET":
            continue
        resp = world.client.get(f"{t.url}?{query}", headers=world.auth(t))
        assert resp.status_code < 500, (t.url, resp.text)
        assert resp.headers.get("x-request-id")
        if resp.status_code >= 400:
            assert_error_shape(resp, t.dialect)


UNKNOWN = [
    pytest.param("GET", "/nope", 404, id="unknown-path"),
    pytest.param("GET", "/v1/admin/nope", 404, id="unknown-admin-path"),
    pytest.param("GET", "/v1/admin/tenants/a/b/c", 404, id="too-deep"),
    pytest.param("POST", "/v1/token/", 404, id="trailing-slash"),
    pytest.param("GET", "/v1/admin/tenants/", 404, id="trailing-slash-admin"),
    pytest.param("GET", "/%00", 404, id="nul-path"),
    pytest.param("GET", "/v1/admin/tenants%00", 404, id="nul-after-path"),
    pytest.param("GET", "/" + "a" * 10_000, 404, id="10kb-path"),
    pytest.param("DELETE", "/v1/token", 405, id="delete-token"),
    pytest.param("GET", "/v1/introspect", 405, id="get-introspect"),
    pytest.param("PUT", "/v1/admin/tenants", 405, id="put-tenants"),
    pytest.param("OPTIONS", "/v1/admin/tenants", 405, id="options-tenants"),
    pytest.param("POST", "/.well-known/jwks.json", 405, id="post-jwks"),
    pytest.param("TRACE", "/healthz", 405, id="trace-healthz"),
]


@pytest.mark.parametrize(("method", "path", "status"), UNKNOWN)
def test_unknown_paths_and_methods(world: World, method: str, path: str, status: int) -> None:
    resp = world.client.request(method, path, headers={"authorization": f"Bearer {world.admin_token}"},
                                follow_redirects=False)
    assert_refused(resp, dialect(path), {status}, f"{method} {path}")


def test_every_route_refuses_a_method_it_does_not_serve(world: World) -> None:
    served: dict[str, set[str]] = {}
    for t in world.targets:
        served.setdefault(t.template, set()).add(t.method)
    for template, methods in served.items():
        url = world.fill(template)
        for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE"} - methods):
            resp = world.client.request(method, url, headers={"content-type": "application/json"},
                                        content=b"{}")
            assert_refused(resp, dialect(template), {405}, f"{method} {template}")
            allowed = {m.strip() for m in resp.headers.get("allow", "").split(",")}
            assert methods <= allowed, (template, resp.headers.get("allow"))


def test_request_ids_are_echoed_only_when_valid(world: World) -> None:
    ok = world.client.get("/healthz", headers={"x-request-id": "abc-123._X"})
    assert ok.headers["x-request-id"] == "abc-123._X"
    for bad in ("a b", "x" * 65, "", "id;drop", "é"):
        resp = world.client.get("/healthz", headers={"x-request-id": bad.encode("utf-8")})
        rid = resp.headers["x-request-id"]
        assert rid != bad and re.fullmatch(r"[A-Za-z0-9._\-]{1,64}", rid), rid
    # Errors carry one too, and two requests never share a fresh one.
    a = world.client.get("/nope")
    b = world.client.get("/nope")
    assert a.headers["x-request-id"] != b.headers["x-request-id"]


def test_valid_bodies_are_accepted(broker: Broker) -> None:
    """The control for the body table: the base bodies, boundary names and sane money pass, so
    every refusal above is caused by the one thing each attack breaks."""
    world = build_world(broker)
    sent = 0
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    for t in world.targets:
        if world.base_body(t) is None:
            continue
        if t.workload_route:
            # The policy edits above ended the agent's tokens (a changed identity): a new one.
            world.agent_token = broker.token(world.agent["client_id"], world.agent["client_secret"])
        probes = [world.base_body(t)]
        probes += [slot(v) for slot in world.money_slots(t) for v in (0, 1000)]
        probes += [slot(next(letters)) for slot in world.name_slots(t)]
        probes += [slot("ñ" * 118 + secrets.token_hex(5)) for slot in world.name_slots(t)]
        for body in probes:
            resp = world.client.request(t.method, t.url, json=body, headers=world.auth(t))
            assert 200 <= resp.status_code < 300, (t.method, t.url, body, resp.text)
            sent += 1
    assert sent >= 6
