"""The workload client (``broker.client``) and ``broker token``: a workload gets a live token
without handling one, the official SDKs call the gateway through it, and no secret or token
ever shows in a message.

The end-to-end tests run against a live broker in front of the fake provider (the ``env``
fixture); the timing and exchange details that a live broker cannot be made to show on demand
(the order of refreshes, the posted subject token, delegation while its server side is not
there) run against a fake token endpoint on an ``httpx.MockTransport`` and a test clock.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import anthropic
import httpx
import jwt
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

import broker.client as client_module
from broker.client import (
    ACCESS_TOKEN_TYPE,
    JWT_TOKEN_TYPE,
    TOKEN_EXCHANGE,
    BrokerAuthError,
    BrokerClient,
    BrokerClientError,
    BrokerUnavailable,
    refresh_after,
)
from tests.conftest import SECRETS
from tests.gateway_support import Env
from tests.support import wait_for

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something short."}]
CLAUDE_PROMPT: list[MessageParam] = [{"role": "user", "content": "Say something short."}]
BROKER_BIN = Path(sys.executable).parent / "broker"


def jti_of(token: str) -> str:
    jti: str = jwt.decode(token, options={"verify_signature": False})["jti"]
    return jti


def login(env: Env, **policy: Any) -> tuple[dict[str, Any], BrokerClient]:
    """A new agent and a client logged in with its secret, closed with the broker."""
    agent = env.agent(**policy)
    assert env.broker.url
    client = env.broker.opened(BrokerClient(env.broker.url, client_id=agent["client_id"],
                                            client_secret=agent["client_secret"]))
    return agent, client


def introspect(env: Env, agent: dict[str, Any], token: str) -> dict[str, Any]:
    resp = env.broker.client.post("/v1/introspect", data={"token": token},
                                  auth=(agent["client_id"], agent["client_secret"]))
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


# --- against the live broker --------------------------------------------------------------


def test_a_secret_login_gets_a_token_that_the_gateway_accepts(env: Env) -> None:
    agent, client = login(env, budget=700_000)
    token = SECRETS.add(client.token())

    models = httpx.get(f"{env.broker.url}/v1/models", headers={"authorization": f"Bearer {token}"})
    assert models.status_code == 200, models.text
    assert client.budget_micros == 700_000
    assert client.scope is not None and "gpt-test" in client.scope.split()
    assert client.expires_at is not None and client.expires_at > time.time()
    assert introspect(env, agent, token)["active"] is True


def test_a_fresh_token_is_reused_not_fetched_again(env: Env) -> None:
    _, client = login(env)
    assert SECRETS.add(client.token()) == client.token() == client.token()


def test_openai_chat_completion_goes_through_the_gateway_with_the_live_token(env: Env) -> None:
    _, client = login(env)
    sdk = env.broker.opened(client.openai(max_retries=0))
    completion = sdk.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=4)
    SECRETS.add(client.token())

    assert completion.choices[0].message.content == "w0 w1 w2 w3"
    # The SDK's placeholder key would be refused: the call was paid by the broker token.
    [event] = env.wait_for_events(1)
    assert event["jti"] == jti_of(client.token())
    assert env.fake.state.received_keys == [env.key]


def test_anthropic_messages_go_through_the_gateway_with_the_live_token(env: Env) -> None:
    _, client = login(env)
    sdk = env.broker.opened(client.anthropic(max_retries=0))
    message = sdk.messages.create(model="claude-test", max_tokens=3, messages=CLAUDE_PROMPT)
    SECRETS.add(client.token())

    [block] = message.content
    assert isinstance(block, anthropic.types.TextBlock) and block.text == "w0 w1 w2"
    [event] = env.wait_for_events(1)
    assert event["jti"] == jti_of(client.token())


def test_async_openai_goes_through_the_gateway(env: Env) -> None:
    _, client = login(env)

    async def call() -> str | None:
        async with client.async_openai(max_retries=0) as sdk:
            completion = await sdk.chat.completions.create(
                model="gpt-test", messages=PROMPT, max_tokens=2)
            return completion.choices[0].message.content

    assert asyncio.run(call()) == "w0 w1"
    SECRETS.add(client.token())


def test_tokens_are_refreshed_across_a_short_ttl_and_no_call_fails(env: Env) -> None:
    """Tokens of 2 s; calls through the SDK for several lifetimes: each call succeeds, and the
    calls were paid by several tokens, each fetched before the last one expired."""
    agent, client = login(env, token_ttl_s=2)
    # Every answer the gateway gives, the refusals the auth flow would retry included.
    statuses: list[int] = []
    lib = client_module._http_lib_of(openai)
    http_client = lib.Client(event_hooks={"response": [lambda r: statuses.append(r.status_code)]})
    sdk = env.broker.opened(client.openai(max_retries=0, http_client=http_client))
    seen: set[str] = set()
    calls = 0
    deadline = time.monotonic() + 30  # a bound for a broken client, not a timing assertion
    while len(seen) < 4 and time.monotonic() < deadline:
        completion = sdk.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=1)
        assert completion.choices[0].message.content == "w0"
        calls += 1
        seen.add(SECRETS.add(client.token()))
        time.sleep(0.1)

    assert len(seen) >= 4, "the client never refreshed"
    assert statuses == [200] * calls
    events = env.wait_for_events(calls)
    assert all(e["status"] == "ok" for e in events), {e["status"] for e in events}
    assert len({e["jti"] for e in events if e["workload_id"] == agent["id"]}) >= 3


def test_a_token_the_gateway_refuses_is_replaced_once_and_the_call_succeeds(env: Env) -> None:
    _, client = login(env)
    sdk = env.broker.opened(client.openai(max_retries=0))
    first = SECRETS.add(client.token())
    resp = env.broker.client.post(f"/v1/admin/tokens/{jti_of(first)}/revoke",
                                  json={"reason": "test"}, headers=env.broker.admin())
    assert resp.status_code == 200, resp.text
    wait_for(lambda: httpx.get(f"{env.broker.url}/v1/models",
                               headers={"authorization": f"Bearer {first}"}).status_code == 401,
             5, what="the revocation")

    completion = sdk.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=1)

    assert completion.choices[0].message.content == "w0"
    assert SECRETS.add(client.token()) != first


def test_a_wrong_secret_is_a_broker_auth_error_that_shows_no_secret(env: Env) -> None:
    agent = env.agent()
    wrong = "wrong-" + agent["client_secret"][::-1]
    SECRETS.add(wrong)
    assert env.broker.url
    client = env.broker.opened(BrokerClient(env.broker.url, client_id=agent["client_id"],
                                            client_secret=wrong))
    with pytest.raises(BrokerAuthError) as caught:
        client.token()

    assert (caught.value.status, caught.value.error) == (401, "invalid_client")
    shown = " ".join([str(caught.value), repr(caught.value), repr(client), str(vars(client))])
    assert wrong not in shown and agent["client_secret"] not in shown
    assert client.token_info is None


def test_an_sdk_call_whose_token_is_refused_names_the_cause(env: Env) -> None:
    agent = env.agent()
    assert env.broker.url
    client = env.broker.opened(BrokerClient(env.broker.url, client_id=agent["client_id"],
                                            client_secret=SECRETS.add("not-" + agent["client_secret"])))
    sdk = env.broker.opened(client.openai(max_retries=0))
    # Some SDK versions wrap whatever their HTTP client raised in their connection error.
    with pytest.raises((BrokerAuthError, openai.APIConnectionError)) as caught:
        sdk.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=1)
    cause = caught.value if isinstance(caught.value, BrokerAuthError) else caught.value.__cause__
    assert isinstance(cause, BrokerAuthError) and cause.error == "invalid_client"


def test_neither_the_secret_nor_a_token_shows_in_a_repr(env: Env) -> None:
    agent, client = login(env)
    token = SECRETS.add(client.token())
    shown = " ".join([repr(client), str(vars(client)), repr(client.token_info), repr(client.auth),
                      repr(client.delegate(["gpt-test"]))])
    assert agent["client_secret"] not in shown and token not in shown
    assert agent["client_id"] in shown


# --- broker token ---------------------------------------------------------------------------


def run_cli(url: str | None, *args: str, secret: str | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    if secret is not None:
        environ["BROKER_CLIENT_SECRET"] = secret
    assert url
    return subprocess.run([str(BROKER_BIN), "token", "--url", url, *args],
                          input=stdin or "", capture_output=True, text=True, env=environ,
                          timeout=60)


def test_broker_token_prints_a_live_token_with_the_secret_from_the_environment(env: Env) -> None:
    agent = env.agent()
    done = run_cli(env.broker.url, "--client-id", agent["client_id"], secret=agent["client_secret"])
    assert done.returncode == 0, done.stderr
    token = SECRETS.add(done.stdout.strip())
    assert done.stdout == token + "\n"
    assert introspect(env, agent, token)["active"] is True


def test_broker_token_reads_the_secret_from_stdin_and_prints_the_response(env: Env) -> None:
    agent = env.agent()
    done = run_cli(env.broker.url, "--client-id", agent["client_id"], "--client-secret-stdin", "--json",
                   "--scope", "gpt-test", "--budget-micros", "1234", "--ttl-s", "60",
                   stdin=agent["client_secret"] + "\n")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    SECRETS.add(body["access_token"])
    assert (body["scope"], body["budget_micros"], body["token_type"]) == ("gpt-test", 1234, "Bearer")
    assert 0 < body["expires_in"] <= 60
    assert introspect(env, agent, body["access_token"])["active"] is True


def test_broker_token_with_a_wrong_secret_says_why_in_one_line_and_exits_1(env: Env) -> None:
    agent = env.agent()
    wrong = SECRETS.add("wrong-" + agent["client_secret"][::-1])
    done = run_cli(env.broker.url, "--client-id", agent["client_id"], secret=wrong)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("broker token: invalid_client")
    assert "Traceback" not in done.stderr and wrong not in done.stderr


def test_broker_token_with_a_subject_token_no_issuer_vouches_for_is_refused(
        env: Env, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.\n")
    done = run_cli(env.broker.url, "--subject-token-file", str(path))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("broker token: invalid_client")


@pytest.mark.parametrize("args", [
    pytest.param(["--client-id", "x", "--client-secret", "s"], id="no-secret-option"),
    pytest.param(["--client-id", "x", "--client-secret=s"], id="no-secret-option-abbreviated"),
    pytest.param(["--client-id", "x"], id="no-secret-at-all"),
    pytest.param(["--client-id", "x", "--client-secret-stdin"], id="nothing-on-stdin"),
    pytest.param([], id="no-login"),
    pytest.param(["--client-id", "x", "--subject-token-file", "/f"], id="two-logins"),
    pytest.param(["--subject-token-file", "/f", "--client-secret-stdin"], id="stdin-without-id"),
    pytest.param(["--client-id", "x", "--ttl-s", "soon"], id="ttl-not-a-number"),
])
def test_broker_token_usage_errors_exit_2(args: list[str]) -> None:
    done = run_cli("http://127.0.0.1:9", *args)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr


# --- a fake token endpoint: what the client sends, and when -----------------------------------


class FakeClock:
    """Stands in for the ``time`` module inside broker.client."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(client_module, "time", fake)
    return fake


class FakeBroker:
    """``POST /v1/token`` and a gateway route, on a MockTransport: records each token request's
    form and Basic credentials, and answers tokens ``tok-1``, ``tok-2``, ... of ``expires_in``."""

    def __init__(self, expires_in: int = 100) -> None:
        self.expires_in = expires_in
        self.forms: list[dict[str, str]] = []
        self.basic: list[tuple[str, str] | None] = []
        self.gateway_tokens: list[str] = []
        self.refuse: set[str] = set()
        self.delay_s = 0.0
        self.down_status: int | None = None
        self.lock = threading.Lock()

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/token":
            return self.token(request)
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        self.gateway_tokens.append(token)
        if token in self.refuse or request.headers.get("x-api-key") not in (None, token):
            return httpx.Response(401, json={"error": {"code": "invalid_api_key"}})
        return httpx.Response(200, json={"ok": True})

    def token(self, request: httpx.Request) -> httpx.Response:
        time.sleep(self.delay_s)
        if self.down_status is not None:
            return httpx.Response(self.down_status, json={"error": "temporarily_unavailable"})
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        header = request.headers.get("authorization")
        basic = None
        if header and header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            basic = (unquote(user), unquote(password))
        with self.lock:
            self.forms.append(form)
            self.basic.append(basic)
            n = len(self.forms)
        return httpx.Response(200, json={
            "access_token": f"tok-{n}", "token_type": "Bearer", "expires_in": self.expires_in,
            "issued_token_type": JWT_TOKEN_TYPE, "scope": form.get("scope", "gpt-test"),
            "budget_micros": int(form.get("budget_micros", 1000))})

    def http(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.handler))


@pytest.fixture
def fake_broker() -> Iterator[Callable[..., tuple[FakeBroker, httpx.Client]]]:
    opened: list[httpx.Client] = []

    def make(expires_in: int = 100) -> tuple[FakeBroker, httpx.Client]:
        fake = FakeBroker(expires_in)
        opened.append(fake.http())
        return fake, opened[-1]

    yield make
    for http in opened:
        http.close()


def test_a_token_is_refreshed_at_80_percent_of_its_life_or_with_the_margin_left() -> None:
    assert refresh_after(300, 60) == 240  # 80 %
    assert refresh_after(900, 60) == 720  # 80 %
    assert refresh_after(100, 60) == 50   # the margin, capped at half the life
    assert refresh_after(200, 60) == 140  # the margin
    assert refresh_after(2, 60) == 1
    assert refresh_after(0, 60) == 0


def test_the_client_refreshes_before_expiry_and_not_before(
        clock: FakeClock, fake_broker: Callable[..., tuple[FakeBroker, httpx.Client]]) -> None:
    fake, http = fake_broker(expires_in=300)
    client = BrokerClient("http://broker.test", client_id="c", client_secret="s", http=http)

    assert client.token() == "tok-1"
    assert client.expires_at == clock.time() + 300
    clock.now += 239
    assert client.token() == "tok-1"
    clock.now += 1
    assert client.token() == "tok-2"
    assert len(fake.forms) == 2


@pytest.mark.parametrize("status", [429, 503])
def test_a_refresh_the_broker_cannot_serve_keeps_the_token_in_hand_until_its_last_seconds(
        clock: FakeClock, fake_broker: Callable[..., tuple[FakeBroker, httpx.Client]],
        status: int) -> None:
    fake, http = fake_broker(expires_in=300)
    client = BrokerClient("http://broker.test", client_id="c", client_secret="s", http=http)
    assert client.token() == "tok-1"
    fake.down_status = status
    clock.now += 250  # due for a refresh, 50 s of life left
    assert client.token() == "tok-1"
    clock.now += 46  # 4 s left: too little to hand out
    with pytest.raises(BrokerAuthError):
        client.token()
    fake.down_status = None
    assert client.token() == "tok-2"


def test_a_refused_refresh_is_not_papered_over(
        clock: FakeClock, fake_broker: Callable[..., tuple[FakeBroker, httpx.Client]]) -> None:
    fake, http = fake_broker(expires_in=300)
    client = BrokerClient("http://broker.test", client_id="c", client_secret="s", http=http)
    client.token()
    fake.down_status = 401
    clock.now += 250
    with pytest.raises(BrokerAuthError):
        client.token()


def test_the_secret_goes_in_http_basic_form_url_encoded(
        clock: FakeClock, fake_broker: Callable[..., tuple[FakeBroker, httpx.Client]]) -> None:
    fake, http = fake_broker()
    client = BrokerClient("http://broker.test/", client_id="id:with%odd chars",
                          client_secret="s3cret:+/% é", http=http, scope=["gpt-test", "o1-*"],
                          budget_micros=5, ttl_s=60)
    client.token()

    assert fake.basic == [("id:with%odd chars", "s3cret:+/% é")]
    assert fake.forms == [{"grant_type": "client_credentials", "scope": "gpt-test o1-*",
                           "budget_micros": "5", "ttl_s": "60"}]


def test_a_subject_token_file_is_read_again_at_every_refresh(
        clock: FakeClock, fake_broker: Callable[..., tuple[FakeBroker, httpx.Client]],
        tmp_path: Path) -> None:
    fake, http = fake_broker(expires_in=100)
    path = tmp_path / "token"
    path.write_text("  first-jwt\n")
    client = BrokerClient("http://broker.test", subject_token_file=path, http=http)

    client.token()
    path.write_text("rotated-jwt\n")  # Kubernetes rotates the projected token in place
    clock.now += 100
    client.token()

    assert [f["subject_token"] for f in fake.forms] == ["first-jwt", "rotated-jwt"]
    assert {f["grant_type"] for f in fake.forms} == {TOKEN_EXCHANGE}
    assert {f["subject_token_type"] for f in fake.forms} == {JWT_TOKEN_TYPE}
    assert fake.basic == [None, None]


@pytest.mark.parametrize("content", [pytest.param(None, id="missing"), pytest.param(" \n", id="empty")])
def test_an_unreadable_subject_token_file_is_a_client_error(
        tmp_path: Path, content: str | None,
        fake_broker: Callable[..., tuple[FakeBroker, httpx.Client]]) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    fake, http = fake_broker()
    with pytest.raises(BrokerClientError, match="subject token file"):
        BrokerClient("http://broker.test", subject_token_file=path, http=http).token()
    assert fake.forms == []


def test_concurrent_callers_share_one_refresh(
        fake_broker: Callable[..., tuple[FakeBroker, httpx.Client]]) -> None:
    fake, http = fake_broker()
    fake.delay_s = 0.2
    client = BrokerClient("http://broker.test", client_id="c", client_secret="s", http=http)
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(client.token())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["tok-1"] * 16 and len(fake.forms) == 1


def test_auth_retries_a_refused_token_once_with_a_new_one(
        fake_broker: Callable[..., tuple[FakeBroker, httpx.Client]]) -> None:
    fake, http = fake_broker()
    client = BrokerClient("http://broker.test", client_id="c", client_secret="s", http=http)
    fake.refuse = {"tok-1"}
    with httpx.Client(transport=httpx.MockTransport(fake.handler), auth=client.auth) as gateway:
        assert gateway.get("http://broker.test/v1/models").status_code == 200
        assert fake.gateway_tokens == ["tok-1", "tok-2"]

        fake.refuse = {"tok-2", "tok-3"}  # refused again: one retry, then the 401 is the answer
        assert gateway.get("http://broker.test/v1/models").status_code == 401
        assert fake.gateway_tokens[2:] == ["tok-2", "tok-3"]


def test_the_anthropic_sdk_sends_the_live_token_whatever_header_it_uses(
        fake_broker: Callable[..., tuple[FakeBroker, httpx.Client]]) -> None:
    _, http = fake_broker()
    client = BrokerClient("http://broker.test", client_id="c", client_secret="s", http=http)
    lib = client_module._http_lib_of(anthropic)
    sent: list[dict[str, str]] = []

    def gateway(request: Any) -> Any:
        sent.append(dict(request.headers))
        return lib.Response(200, json={
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}})

    with client.anthropic(max_retries=0,
                          http_client=lib.Client(transport=lib.MockTransport(gateway))) as sdk:
        sdk.messages.create(model="claude-test", max_tokens=3, messages=CLAUDE_PROMPT)

    # Anthropic SDK versions differ in which header carries the key: whichever, it is the token.
    [headers] = sent
    assert headers["authorization"] == "Bearer tok-1"
    assert headers.get("x-api-key", "tok-1") == "tok-1"


def test_an_api_key_header_is_overridden_with_the_live_token(
        fake_broker: Callable[..., tuple[FakeBroker, httpx.Client]]) -> None:
    fake, http = fake_broker()
    client = BrokerClient("http://broker.test", client_id="c", client_secret="s", http=http)
    with httpx.Client(transport=httpx.MockTransport(fake.handler), auth=client.auth) as gateway:
        resp = gateway.post("http://broker.test/v1/messages", json={},
                            headers={"x-api-key": "placeholder", "authorization": "Bearer x"})
    assert resp.status_code == 200
    assert resp.request.headers["x-api-key"] == "tok-1"
    assert resp.request.headers["authorization"] == "Bearer tok-1"


def test_a_child_exchanges_its_parents_current_token_for_a_narrower_one(
        clock: FakeClock, fake_broker: Callable[..., tuple[FakeBroker, httpx.Client]]) -> None:
    fake, http = fake_broker(expires_in=100)
    parent = BrokerClient("http://broker.test", client_id="c", client_secret="s", http=http)
    child = parent.delegate(models=["gpt-test"], budget_micros=250, ttl_s=50)

    assert child.token() == "tok-2"
    assert fake.forms[1] == {"grant_type": TOKEN_EXCHANGE, "subject_token": "tok-1",
                             "subject_token_type": ACCESS_TOKEN_TYPE, "scope": "gpt-test",
                             "budget_micros": "250", "ttl_s": "50"}
    assert fake.basic[1] is None
    assert child.budget_micros == 250

    # When the child's token is due, so is the parent's: a new parent token, then a new slice.
    clock.now += 80
    assert child.token() == "tok-4"
    assert [f.get("subject_token") for f in fake.forms] == [None, "tok-1", None, "tok-3"]


def test_a_broker_that_does_not_answer_is_unavailable_not_a_refusal() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with httpx.Client(transport=httpx.MockTransport(down)) as http:
        client = BrokerClient("http://broker.test", client_id="c", client_secret="s", http=http)
        with pytest.raises(BrokerUnavailable, match="did not answer"):
            client.token()


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_a_missing_sdk_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch, sdk: str) -> None:
    monkeypatch.setitem(sys.modules, sdk, None)
    client = BrokerClient("http://broker.test", client_id="c", client_secret="s")
    with pytest.raises(ImportError, match=rf"pip install 'ai-secrets-broker\[{sdk}\]'"):
        getattr(client, sdk)()


@pytest.mark.parametrize("status,body", [
    pytest.param(200, b"not json", id="200-not-json"),
    pytest.param(200, b"[]", id="200-not-an-object"),
    pytest.param(200, b'{"expires_in": 300}', id="200-no-token"),
    pytest.param(200, b'{"access_token": "t", "expires_in": true}', id="200-bool-lifetime"),
    pytest.param(200, b'{"access_token": "t", "expires_in": 0}', id="200-dead-on-arrival"),
    pytest.param(502, b"<html>bad gateway</html>", id="proxy-page"),
    pytest.param(401, b'{"error": {"nested": 1}}', id="error-not-oauth"),
])
def test_an_answer_not_in_oauths_shape_is_unavailable(status: int, body: bytes) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    with httpx.Client(transport=transport) as http:
        client = BrokerClient("http://broker.test", client_id="c", client_secret="s", http=http)
        with pytest.raises(BrokerUnavailable):
            client.token()
        assert client.token_info is None


def test_an_oauth_error_is_shown_on_one_printable_line_of_bounded_length() -> None:
    body = {"error": "slow_down", "error_description": "wait\n" + "x" * 1000}
    transport = httpx.MockTransport(lambda request: httpx.Response(429, json=body))
    with httpx.Client(transport=transport) as http:
        client = BrokerClient("http://broker.test", client_id="c", client_secret="s", http=http)
        with pytest.raises(BrokerAuthError) as caught:
            client.token()
    error = caught.value
    assert (error.status, error.error) == (429, "slow_down")
    assert error.error_description is not None and error.error_description.startswith("wait x")
    assert "\n" not in str(error) and len(str(error)) < 400


def test_async_auth_retries_a_refused_token_once_with_a_new_one(
        fake_broker: Callable[..., tuple[FakeBroker, httpx.Client]]) -> None:
    fake, http = fake_broker()
    client = BrokerClient("http://broker.test", client_id="c", client_secret="s", http=http)
    fake.refuse = {"tok-1"}

    async def call() -> int:
        transport = httpx.MockTransport(fake.handler)
        async with httpx.AsyncClient(transport=transport, auth=client.auth) as gateway:
            return (await gateway.post("http://broker.test/v1/x", json={})).status_code

    assert asyncio.run(call()) == 200
    assert fake.gateway_tokens == ["tok-1", "tok-2"]


def test_one_login_exactly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        BrokerClient("http://b", client_id="c", client_secret="s", subject_token_file=tmp_path)
    with pytest.raises(ValueError):
        BrokerClient("http://b", client_id="c")
    with pytest.raises(ValueError):
        BrokerClient("broker.test", client_id="c", client_secret="s")


def test_the_client_module_imports_nothing_of_the_server() -> None:
    code = ("import sys, broker.client; "
            "bad = [m for m in ('starlette', 'sqlalchemy', 'hvac', 'uvicorn', 'openai', 'anthropic',"
            " 'broker.services', 'broker.settings') if m in sys.modules]; print(bad)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


def test_a_delegated_client_calls_the_gateway_within_a_slice_carved_from_its_parent(
        env: Env) -> None:
    agent, parent = login(env, budget=500_000)
    child = parent.delegate(models=["gpt-test"], budget_micros=100_000, ttl_s=60)
    sdk = env.broker.opened(child.openai(max_retries=0))

    completion = sdk.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=1)
    assert completion.choices[0].message.content == "w0"
    with pytest.raises(openai.PermissionDeniedError):  # the parent may, the child may not
        sdk.chat.completions.create(model="claude-test", messages=PROMPT, max_tokens=1)

    parent_token, child_token = SECRETS.add(parent.token()), SECRETS.add(child.token())
    claims = introspect(env, agent, child_token)
    assert claims["active"] is True and claims["models"] == ["gpt-test"]
    assert claims["act"]["jti"] == jti_of(parent_token)
    assert claims["exp"] <= introspect(env, agent, parent_token)["exp"]
    assert child.budget_micros == 100_000
    assert introspect(env, agent, parent_token)["budget_remaining_micros"] == 400_000
