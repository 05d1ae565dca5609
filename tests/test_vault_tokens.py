"""A workload's own Vault/OpenBao token as a subject token: ``lookup-self`` with that token at the
broker's Vault (the real OpenBao dev server of the session), and the ``vault`` issuer plugin."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import SecretStr

from broker.devvault import DevVault, free_port
from broker.errors import InvalidSubjectToken, VaultUnavailable
from broker.identity import vault_tokens
from broker.identity.vault_tokens import lookup_self
from broker.plugin import ExternalIdentity, IssuerType
from broker.settings import VaultSettings
from plugins.auth_vault import plugin
from tests.vault_support import AppRole


def settings_for(addr: str, *, timeout_s: float = 5.0, broker_token: str = "") -> VaultSettings:
    return VaultSettings(addr=addr, token=SecretStr(broker_token), timeout_s=timeout_s)


@pytest.fixture
def at_vault(vault: DevVault) -> VaultSettings:
    # The broker's own (root) token is configured: a lookup must never use it.
    return settings_for(vault.addr, broker_token=vault.root_token)


def assert_no_token(exc: BaseException, token: str) -> None:
    """Neither the exception nor anything it keeps (cause, context, args) shows ``token``."""
    seen: BaseException | None = exc
    while seen is not None:
        assert token not in str(seen) and token not in repr(seen)
        assert all(token not in repr(arg) for arg in seen.args)
        assert token not in repr(vars(seen))
        seen = seen.__cause__ or seen.__context__
    assert exc.__cause__ is None and exc.__context__ is None


# --- a fake Vault, for what the real one will not do on demand -------------------------------


class FakeVault:
    """An HTTP server that answers every request with ``status``/``body`` (after ``delay_s``) and
    records the requests it got."""

    def __init__(self, status: int = 500, body: bytes = b'{"errors":["boom"]}',
                 headers: dict[str, str] | None = None, delay_s: float = 0.0) -> None:
        self.status, self.body, self.headers, self.delay_s = status, body, headers or {}, delay_s
        self.requests: list[tuple[str, dict[str, str]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append((self.path, dict(self.headers)))
                time.sleep(fake.delay_s)
                try:
                    self.send_response(fake.status)
                    self.send_header("Content-Type", "application/json")
                    for k, v in fake.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(fake.body)))
                    self.end_headers()
                    self.wfile.write(fake.body)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.addr = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> FakeVault:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the real OpenBao -------------------------------------------------------------------------


def test_an_approle_login_token_is_looked_up_without_itself(
        approle: AppRole, at_vault: VaultSettings) -> None:
    token = approle.login()
    data = lookup_self(at_vault, token)
    meta = data["meta"]
    assert isinstance(meta, dict) and meta["role_name"] == approle.role
    assert isinstance(data["entity_id"], str) and data["entity_id"]
    assert data["path"] == f"auth/{approle.mount}/login"
    assert data["type"] == "service"
    assert isinstance(data["accessor"], str) and data["accessor"]
    assert "id" not in data
    assert token not in json.dumps(data)
    # It was the workload's token that looked itself up, not the broker's root token.
    assert data["policies"] == ["default"]


def test_a_revoked_token_is_refused(approle: AppRole, at_vault: VaultSettings) -> None:
    token = approle.login()
    lookup_self(at_vault, token)
    approle.root.auth.token.revoke(token)
    with pytest.raises(InvalidSubjectToken) as caught:
        lookup_self(at_vault, token)
    assert caught.value.reason == "vault refused the token"
    assert caught.value.status == 401 and caught.value.code == "invalid_client"
    assert_no_token(caught.value, token)


def test_a_token_vault_never_issued_is_refused(at_vault: VaultSettings) -> None:
    token = "hvs." + secrets.token_urlsafe(24)
    with pytest.raises(InvalidSubjectToken) as caught:
        lookup_self(at_vault, token)
    assert caught.value.reason == "vault refused the token"
    assert_no_token(caught.value, token)


def test_the_brokers_own_token_is_never_used(vault: DevVault) -> None:
    # Configured with the root token, a lookup with garbage still fails: the broker's token
    # never stands in for the subject's.
    settings = settings_for(vault.addr, broker_token=vault.root_token)
    with pytest.raises(InvalidSubjectToken):
        lookup_self(settings, "garbage")


def test_a_batch_token_is_looked_up(approle: AppRole, at_vault: VaultSettings) -> None:
    created = approle.root.auth.token.create(policies=["default"], ttl="5m", type="batch")
    token: str = approle.ledger.add(created["auth"]["client_token"])
    data = lookup_self(at_vault, token)
    assert data["type"] == "batch" and "id" not in data and token not in json.dumps(data)


@pytest.mark.parametrize("token", [
    "", "x" * 8193, "hvs.abc\n", "hvs.abc\r\nX-Vault-Token: other", "hvs. abc", "hvs.\x00abc",
    "hvs.tökén", "\thvs.abc",
])
def test_what_cannot_be_a_token_is_refused_before_any_call(token: str) -> None:
    with FakeVault(status=200, body=b'{"data":{}}') as fake:
        with pytest.raises(InvalidSubjectToken):
            lookup_self(settings_for(fake.addr), token)
        assert fake.requests == []


def test_the_longest_token_still_goes_to_vault() -> None:
    token = "s." + "a" * (vault_tokens.MAX_TOKEN_CHARS - 2)
    with FakeVault(status=403, body=b'{"errors":["permission denied"]}') as fake:
        with pytest.raises(InvalidSubjectToken):
            lookup_self(settings_for(fake.addr), token)
        assert len(fake.requests) == 1
        path, headers = fake.requests[0]
        assert path == "/v1/auth/token/lookup-self" and headers["X-Vault-Token"] == token


# --- Vault that does not answer: 503, never a refusal ------------------------------------------


def test_nothing_listening_is_unavailable() -> None:
    token = "hvs." + secrets.token_urlsafe(24)
    with pytest.raises(VaultUnavailable) as caught:
        lookup_self(settings_for(f"http://127.0.0.1:{free_port()}", timeout_s=2), token)
    assert caught.value.status == 503
    assert_no_token(caught.value, token)


@pytest.mark.parametrize(("status", "body"), [
    (500, b'{"errors":["internal error"]}'),
    (502, b'{"errors":["bad gateway"]}'),
    (503, b'{"errors":["Vault is sealed"]}'),
    (429, b'{"errors":["rate limited"]}'),
    (404, b"not vault"),
    (200, b"not json"),
    (200, b'{"data":"not an object"}'),
    (200, b'{"no":"data"}'),
])
def test_a_failing_or_strange_vault_is_unavailable(status: int, body: bytes) -> None:
    token = "hvs." + secrets.token_urlsafe(24)
    with FakeVault(status=status, body=body) as fake, pytest.raises(VaultUnavailable) as caught:
        lookup_self(settings_for(fake.addr), token)
    assert_no_token(caught.value, token)


def test_a_slow_vault_is_unavailable() -> None:
    token = "hvs." + secrets.token_urlsafe(24)
    with FakeVault(status=200, body=b'{"data":{}}', delay_s=2.0) as fake:
        started = time.monotonic()
        with pytest.raises(VaultUnavailable) as caught:
            lookup_self(settings_for(fake.addr, timeout_s=0.3), token)
        assert time.monotonic() - started < 1.5
    assert_no_token(caught.value, token)


def test_a_redirect_is_not_followed(approle: AppRole, at_vault: VaultSettings) -> None:
    # A redirect to the real Vault, where the token is good: following it would hand the token
    # to wherever the redirect points.
    token = approle.login()
    target = f"{approle.vault.addr}/v1/auth/token/lookup-self"
    for status in (301, 302, 307, 308):
        with FakeVault(status=status, body=b"", headers={"Location": target}) as fake, \
                pytest.raises(VaultUnavailable) as caught:
            lookup_self(settings_for(fake.addr), token)
        assert len(fake.requests) == 1
        assert_no_token(caught.value, token)


def test_invalid_request_is_a_refusal() -> None:
    with FakeVault(status=400, body=b'{"errors":["invalid token"]}') as fake, \
            pytest.raises(InvalidSubjectToken):
        lookup_self(settings_for(fake.addr), "hvs.whatever")


def test_401_is_a_refusal() -> None:
    with FakeVault(status=401, body=b'{"errors":["missing client token"]}') as fake, \
            pytest.raises(InvalidSubjectToken):
        lookup_self(settings_for(fake.addr), "hvs.whatever")


# --- what a lookup says about the token's life and type ---------------------------------------


def _answer(**data: object) -> bytes:
    base: dict[str, object] = {
        "accessor": "acc", "entity_id": "ent", "id": "hvs.secret", "meta": {"role_name": "r"},
        "path": "auth/approle/login", "policies": ["default"], "type": "service",
        "ttl": 600, "expire_time": "2999-01-01T00:00:00.123456789Z",
    }
    base.update(data)
    return json.dumps({"data": base}).encode()


@pytest.mark.parametrize("data", [
    {"ttl": 0, "expire_time": "2020-01-01T00:00:00.123456789Z"},  # expired, still listed
    {"ttl": 0, "expire_time": "2020-01-01T00:00:00+02:00"},
    {"ttl": 5, "expire_time": "2020-01-01T00:00:00Z"},
    {"ttl": 0, "expire_time": "2999-01-01T00:00:00Z"},
    {"ttl": 600, "expire_time": None},
    {"ttl": 600, "expire_time": "tomorrow"},
    {"ttl": 600, "expire_time": 12},
    {"ttl": -1},
    {"ttl": "600"},
    {"ttl": True},
    {"type": "root"},
    {"type": None},
    {"type": "Service"},
])
def test_an_expired_or_strange_token_is_refused(data: dict[str, object]) -> None:
    with FakeVault(status=200, body=_answer(**data)) as fake, pytest.raises(InvalidSubjectToken):
        lookup_self(settings_for(fake.addr), "hvs.secret")


def test_a_token_that_never_expires_is_looked_up() -> None:
    with FakeVault(status=200, body=_answer(ttl=0, expire_time=None)) as fake:
        data = lookup_self(settings_for(fake.addr), "hvs.secret")
    assert data["entity_id"] == "ent"


def test_no_copy_of_the_token_or_another_credential_is_handed_on() -> None:
    body = _answer(meta={"role_name": "r", "echo": "hvs.secret"}, client_token="x",
                   secret_id="y", cubbyhole_id="z", token="t", extra=["hvs.secret", "keep"])
    with FakeVault(status=200, body=body) as fake:
        data = lookup_self(settings_for(fake.addr), "hvs.secret")
    assert data == {
        "accessor": "acc", "entity_id": "ent", "meta": {"role_name": "r"},
        "path": "auth/approle/login", "policies": ["default"], "type": "service", "ttl": 600,
        "expire_time": "2999-01-01T00:00:00.123456789Z", "extra": ["keep"],
    }


# --- the plugin ---------------------------------------------------------------------------------


@dataclass
class FakeCtx:
    """The one part of :class:`SubjectVerifier` the plugin uses."""

    settings: VaultSettings

    async def vault_lookup_self(self, token: str) -> dict[str, object]:
        return await asyncio.to_thread(lookup_self, self.settings, token)


def test_the_plugin_is_an_issuer_type() -> None:
    assert isinstance(plugin, IssuerType)
    assert plugin.issuer_type == "vault"
    assert plugin.algorithms == ()
    assert plugin.pinning == (("meta.role_name",), ("entity_id",))


def test_the_plugin_turns_a_login_into_an_external_identity(
        approle: AppRole, at_vault: VaultSettings) -> None:
    token = approle.login()
    found = asyncio.run(plugin.verify(token, None, FakeCtx(at_vault)))  # type: ignore[arg-type]
    assert isinstance(found, ExternalIdentity)
    claims = dict(found.claims)
    assert found.issuer == "vault" and found.iss == "vault"
    assert found.sub == claims["entity_id"] and found.sub
    assert found.jti == claims["accessor"] and found.jti
    meta = claims["meta"]
    assert isinstance(meta, dict) and meta["role_name"] == approle.role
    assert claims["path"] == f"auth/{approle.mount}/login"
    assert "id" not in claims and token not in repr(found)


def test_the_plugin_refuses_what_vault_refuses(at_vault: VaultSettings) -> None:
    token = "hvs." + secrets.token_urlsafe(24)
    with pytest.raises(InvalidSubjectToken) as caught:
        asyncio.run(plugin.verify(token, None, FakeCtx(at_vault)))  # type: ignore[arg-type]
    assert_no_token(caught.value, token)


def test_without_an_entity_the_accessor_names_the_subject() -> None:
    with FakeVault(status=200, body=_answer(entity_id="")) as fake:
        found = asyncio.run(plugin.verify(
            "hvs.secret", None, FakeCtx(settings_for(fake.addr))))  # type: ignore[arg-type]
    assert (found.sub, found.jti) == ("accessor:acc", "acc")


def test_without_an_entity_or_an_accessor_there_is_no_subject() -> None:
    with FakeVault(status=200, body=_answer(entity_id="", accessor="")) as fake, \
            pytest.raises(InvalidSubjectToken):
        asyncio.run(plugin.verify(
            "hvs.secret", None, FakeCtx(settings_for(fake.addr))))  # type: ignore[arg-type]
