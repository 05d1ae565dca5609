"""Rotation: signing keys (published as next before they sign, kept as previous until their
tokens expired), workload secrets (old and new both work during the grace) and provider keys."""

from __future__ import annotations

import calendar
import json
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import text

from broker.cli import main as cli_main
from broker.devvault import DevVault
from broker.revocation import rotation
from broker.services import Services
from broker.storage.vault import Vault
from broker.tokens.issuance import authenticate_client
from broker.tokens.keys import MAX_PREVIOUS_KEYS, RotationTooSoon
from tests.conftest import SECRETS, Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import Env, make_env
from tests.support import assert_problem, wait_for


def _states(broker: Broker, headers: dict[str, str] | None = None) -> dict[str, str]:
    resp = broker.client.get("/v1/admin/keys/signing", headers=headers or broker.admin())
    assert resp.status_code == 200, resp.text
    return {k["kid"]: k["state"] for k in resp.json()["data"]}


def _jwks(broker: Broker) -> set[str]:
    return {k["kid"] for k in broker.client.get("/.well-known/jwks.json").json()["keys"]}


def _kid(token: str) -> str:
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


def _active(broker: Broker, token: str) -> bool:
    resp = broker.client.post("/v1/introspect", data={"token": token}, headers=broker.admin())
    assert resp.status_code == 200, resp.text
    active: bool = resp.json()["active"]
    return active


def _agent(broker: Broker) -> dict[str, Any]:
    tenant = broker.create_tenant()
    return broker.create_workload(tenant["id"], policy={"models": ["gpt-4o-mini"]})


def _audit(broker: Broker, action: str) -> list[tuple[str, str, dict[str, Any]]]:
    with broker.services.db.engine.connect() as conn:
        rows = conn.execute(text("SELECT actor, target, detail FROM audit_event WHERE action = :a "
                                 "ORDER BY id"), {"a": action}).all()
    return [(r[0], r[1], json.loads(r[2]) if isinstance(r[2], str) else r[2]) for r in rows]


def _by_state(states: dict[str, str], state: str) -> list[str]:
    return [kid for kid, s in states.items() if s == state]


# --- signing keys ---------------------------------------------------------------------------


def test_signing_rotation_walks_next_current_previous_and_retires(broker: Broker) -> None:
    start = _states(broker)
    (k1,), (k2,) = _by_state(start, "current"), _by_state(start, "next")
    assert sorted(start.values()) == ["current", "next"]
    assert _jwks(broker) == {k1, k2}  # the next key is published before it signs
    agent = _agent(broker)
    old = broker.token(agent["client_id"], agent["client_secret"])
    assert _kid(old) == k1

    resp = broker.client.post("/v1/admin/keys/signing/rotate", json={"reason": "quarterly"},
                              headers=broker.admin())
    assert resp.status_code == 200, resp.text
    assert resp.json()["current_kid"] == k2
    after = _states(broker)
    (k3,) = _by_state(after, "next")
    assert after == {k1: "previous", k2: "current", k3: "next"}
    assert _jwks(broker) == {k1, k2, k3}
    new = broker.token(agent["client_id"], agent["client_secret"])
    assert _kid(new) == k2
    assert _active(broker, old) and _active(broker, new)  # signed before: still verifies

    # Nothing retires while a token signed by the previous key may still be alive.
    assert rotation.retire_signing_keys(broker.services) == []
    retire_at = broker.services.keyring.keys[k1].retire_at
    assert retire_at is not None
    assert retire_at >= int(time.time()) + broker.settings.tokens.max_ttl_s
    assert rotation.retire_signing_keys(broker.services, now=retire_at) == [k1]
    broker.forget_admin_token()  # it was signed by k1 too
    assert _states(broker) == {k2: "current", k3: "next"}
    assert _jwks(broker) == {k2, k3}
    assert not _active(broker, old)  # its key is gone
    assert _active(broker, new)

    assert [(a, t, d["reason"]) for a, t, d in _audit(broker, "signing_key.rotate")] == [
        ("wl_admin", k2, "quarterly")]
    assert [(a, t) for a, t, _ in _audit(broker, "signing_key.retire")] == [("scheduler", k1)]


def test_signing_key_listing_never_shows_material(sqlite_broker: Broker) -> None:
    resp = sqlite_broker.client.get("/v1/admin/keys/signing", headers=sqlite_broker.admin())
    body = resp.text
    assert resp.status_code == 200
    assert "PRIVATE" not in body and "pem" not in body and '"d"' not in body
    for key in resp.json()["data"]:
        assert set(key) == {"kid", "state", "alg", "created_at", "retire_at"}


def test_only_an_org_admin_rotates_signing_keys(sqlite_broker: Broker) -> None:
    broker = sqlite_broker
    tenant = broker.create_tenant()
    before = _states(broker)
    for role in ("tenant-admin", "auditor"):
        ident = broker.create_workload(tenant["id"], kind="admin", roles=[role])
        headers = {"authorization": f"Bearer {broker.token(ident['client_id'], ident['client_secret'])}"}
        assert_problem(broker.client.post("/v1/admin/keys/signing/rotate", headers=headers),
                       403, "forbidden")
        assert _states(broker, headers) == before  # they may read the key list, not change it
    assert_problem(broker.client.post("/v1/admin/keys/signing/rotate"), 401, "invalid_token")
    assert _states(broker) == before and _audit(broker, "signing_key.rotate") == []


def test_a_burst_of_rotations_is_bounded_instead_of_breaking_the_keyring(
    sqlite_broker: Broker,
) -> None:
    """Found by fuzzing: each rotation keeps the old key for a token lifetime, and past about
    97 keys Vault refused the keyring document, so every rotation answered 503 until the oldest
    retired. Now the rotation past the bound is refused, with when to try again."""
    broker = sqlite_broker
    for _ in range(MAX_PREVIOUS_KEYS):
        resp = broker.client.post("/v1/admin/keys/signing/rotate", headers=broker.admin())
        assert resp.status_code == 200, resp.text
    before = _states(broker)
    assert len(_by_state(before, "previous")) == MAX_PREVIOUS_KEYS
    refused = broker.client.post("/v1/admin/keys/signing/rotate", headers=broker.admin())
    body = assert_problem(refused, 429, "slow_down")
    lifetime = broker.settings.tokens.max_ttl_s
    assert 0 < int(refused.headers["retry-after"]) <= lifetime + 30, refused.headers
    assert "previous signing keys" in body["detail"]
    assert _states(broker) == before and len(_jwks(broker)) == MAX_PREVIOUS_KEYS + 2
    # Once the oldest previous key retired (its tokens expired), rotating works again.
    keyring = broker.services.keyring
    with pytest.raises(RotationTooSoon):
        keyring.rotate()
    later = int(time.time()) + lifetime + 31
    assert keyring.rotate(later).kid == _by_state(before, "next")[0]


def test_signing_keys_rotate_on_the_configured_interval(make_broker: Any, sqlite_url: str) -> None:
    broker = make_broker(sqlite_url, rotation={"signing_interval_s": 1},
                         scheduler={"tick_s": 0.1})
    first = _by_state(_states(broker), "current")
    wait_for(lambda: _by_state(_states(broker), "current") != first, timeout=15, interval=0.1,
             what="a scheduled rotation")
    actors = {a for a, _, _ in _audit(broker, "signing_key.rotate")}
    assert actors == {"scheduler"}


def test_broker_keys_rotate_is_picked_up_by_a_running_broker(
    make_broker: Any, sqlite_url: str, vault: DevVault, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = make_broker(sqlite_url, revocation={"catchup_interval_s": 0.1})
    (old_next,) = _by_state(_states(broker), "next")
    monkeypatch.chdir(tmp_path)  # no config/broker.toml here: the environment is the config
    for name, value in {"BROKER_VAULT_ADDR": vault.addr, "BROKER_VAULT_TOKEN": vault.root_token,
                        "BROKER_VAULT_PREFIX": broker.settings.vault.prefix,
                        "BROKER_DATABASE_URL": sqlite_url}.items():
        monkeypatch.setenv(name, value)
    assert cli_main(["keys", "rotate"]) == 0

    wait_for(lambda: _by_state(_states(broker), "current") == [old_next], timeout=15,
             what="the running broker seeing the rotation")
    assert [(a, t) for a, t, _ in _audit(broker, "signing_key.rotate")] == [("cli", old_next)]


# --- workload secrets -----------------------------------------------------------------------


def _exchange(broker: Broker, client_id: str, secret: str) -> int:
    resp = broker.client.post("/v1/token", data={
        "grant_type": "client_credentials", "client_id": client_id, "client_secret": secret})
    status: int = resp.status_code
    return status


def _authenticates(broker: Broker, client_id: str, secret: str, now: int) -> bool:
    """Whether the token endpoint's credential check accepts ``secret`` at the instant ``now``."""
    svc = broker.services
    return svc.db.transaction(
        lambda conn: authenticate_client(svc, conn, client_id, secret, now)) is not None


def test_both_secrets_work_inside_the_grace_and_only_the_new_one_after(
    make_broker: Any, db_url: str, secret_ledger: Any,
) -> None:
    broker = make_broker(db_url, auth={"secret_grace_s": 600})
    agent = _agent(broker)
    resp = broker.client.post(f"/v1/admin/workloads/{agent['id']}/rotate-secret",
                              json={"reason": "offboarding"}, headers=broker.admin())
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    new = secret_ledger.add(body["client_secret"])
    assert new != agent["client_secret"] and body["id"] == agent["id"]
    assert body["previous_secret_expires_at"].endswith("Z")

    assert _exchange(broker, agent["client_id"], agent["client_secret"]) == 200
    assert _exchange(broker, agent["client_id"], new) == 200
    # The check takes the time: it is asked at the grace's last second and at its end, rather
    # than the test waiting out the grace on the real clock.
    ends = calendar.timegm(time.strptime(body["previous_secret_expires_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert _authenticates(broker, agent["client_id"], agent["client_secret"], now=ends - 1)
    assert not _authenticates(broker, agent["client_id"], agent["client_secret"], now=ends)
    assert _authenticates(broker, agent["client_id"], new, now=ends)
    # The new secret is shown once: reading the workload never shows it.
    shown = broker.client.get(f"/v1/admin/workloads/{agent['id']}", headers=broker.admin())
    assert "client_secret" not in shown.json() and new not in shown.text

    audit = _audit(broker, "workload.rotate_secret")
    assert [(a, t, d["reason"], d["grace_s"]) for a, t, d in audit] == [
        ("wl_admin", agent["id"], "offboarding", 600)]
    assert new not in json.dumps(audit) and agent["client_secret"] not in json.dumps(audit)


def test_without_grace_the_old_secret_stops_at_once(make_broker: Any, sqlite_url: str,
                                                    secret_ledger: Any) -> None:
    broker = make_broker(sqlite_url, auth={"secret_grace_s": 0})
    agent = _agent(broker)
    resp = broker.client.post(f"/v1/admin/workloads/{agent['id']}/rotate-secret",
                              headers=broker.admin())
    new = secret_ledger.add(resp.json()["client_secret"])
    assert _exchange(broker, agent["client_id"], agent["client_secret"]) == 401
    assert _exchange(broker, agent["client_id"], new) == 200


def test_a_second_rotation_inside_the_grace_ends_the_first_old_secret(
    make_broker: Any, sqlite_url: str, secret_ledger: Any,
) -> None:
    broker = make_broker(sqlite_url, auth={"secret_grace_s": 600})
    agent = _agent(broker)
    path = f"/v1/admin/workloads/{agent['id']}/rotate-secret"
    second = secret_ledger.add(broker.client.post(path, headers=broker.admin()).json()["client_secret"])
    third = secret_ledger.add(broker.client.post(path, headers=broker.admin()).json()["client_secret"])
    assert _exchange(broker, agent["client_id"], agent["client_secret"]) == 401
    assert _exchange(broker, agent["client_id"], second) == 200
    assert _exchange(broker, agent["client_id"], third) == 200


# --- provider keys --------------------------------------------------------------------------


class FakeKeyAdmin:
    """A provider plugin's key-admin side (:class:`broker.plugin.KeyAdmin`) for the fake
    provider's ``/admin/keys`` API."""

    def __init__(self, origin: str, works: bool = True):
        self.origin = origin
        self.works = works

    def create_key(self, admin_key: str) -> tuple[str, str]:
        resp = httpx.post(f"{self.origin}/admin/keys", headers={"x-admin-key": admin_key})
        resp.raise_for_status()
        body = resp.json()
        return body["id"], SECRETS.add(body["key"])

    def check_key(self, key: str) -> bool:
        resp = httpx.get(f"{self.origin}/v1/models", headers={"authorization": f"Bearer {key}"})
        return self.works and resp.status_code == 200

    def revoke_key(self, admin_key: str, key_id: str) -> None:
        resp = httpx.delete(f"{self.origin}/admin/keys/{key_id}", headers={"x-admin-key": admin_key})
        if resp.status_code not in (200, 404):
            resp.raise_for_status()


def _give_key_admin(svc: Services, admin: FakeKeyAdmin) -> None:
    """Make the ``fake-openai`` provider a key admin, as the provider object of a plugin with a
    key admin API is (:class:`broker.plugin.KeyAdmin` is checked structurally)."""
    provider = svc.providers["fake-openai"]
    for name in ("create_key", "check_key", "revoke_key"):
        object.__setattr__(provider, name, getattr(admin, name))


def _provider_env(make_live_broker: Callable[..., Broker], sqlite_url: str,
                  fake: FakeProviderServer, **sections: dict[str, Any]) -> Env:
    env = make_env(lambda db, **kw: make_live_broker(db, **kw, **sections), sqlite_url, fake)
    # The operator's first key, known to the provider's admin API by an id.
    fake.state.admin_keys["key_initial"] = env.key
    Vault(env.broker.settings.vault).write(env.vault_path, {
        "api_key": env.key, "key_id": "key_initial", "admin_key": fake.state.admin_key})
    return env


def _vault_doc(env: Env) -> tuple[dict[str, Any], int]:
    found = Vault(env.broker.settings.vault).read(env.vault_path)
    assert found is not None
    return found


def test_a_stream_of_calls_during_a_provider_rotation_loses_none(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    env = _provider_env(make_live_broker, sqlite_url, fake)
    svc = env.broker.services
    _give_key_admin(svc, FakeKeyAdmin(fake.url))
    old_key = env.key
    token = env.token(budget=50_000_000)
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=env.broker.url or "", timeout=30) as client:
            while not stop.is_set():
                resp = client.post("/v1/chat/completions", headers={"authorization": f"Bearer {token}"},
                                   json={"model": "gpt-test", "max_tokens": 5,
                                         "messages": [{"role": "user", "content": "hi"}]})
                statuses.append(resp.status_code)

    def calls_reach(n: int) -> None:
        wait_for(lambda: len(statuses) >= n, timeout=60,
                 what=lambda: f"{n} calls (traffic stalled at {len(statuses)})")

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        calls_reach(20)
        resp = env.broker.client.post("/v1/admin/providers/fake-openai/rotate",
                                      json={"reason": "scheduled hygiene"},
                                      headers=env.broker.admin())
        assert resp.status_code == 200, resp.text
        result = resp.json()
        assert result["mode"] == "rotated" and result["previous_key_id"] == "key_initial"
        assert old_key not in resp.text
        doc, _ = _vault_doc(env)
        new_key = doc["api_key"]
        assert new_key != old_key and doc["key_id"] == result["key_id"]
        calls_reach(len(statuses) + 40)
        # Once the grace is over the old key is revoked at the provider; calls go on.
        grace = env.broker.settings.rotation.provider_grace_s
        assert rotation.revoke_retired_provider_keys(svc) == []  # not before
        revoked = rotation.revoke_retired_provider_keys(svc, now=int(time.time()) + grace)
        assert revoked == ["key_initial"]
        assert old_key not in (fake.state.valid_keys or set())
        assert _vault_doc(env)[0]["retiring"] == []
        calls_reach(len(statuses) + 40)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
    assert statuses and set(statuses) == {200}, f"lost calls: {sorted(set(statuses))}"
    assert old_key in fake.state.received_keys and new_key in fake.state.received_keys
    assert fake.state.received_keys[-1] == new_key
    actions = [(a, d.get("key_id")) for a, _t, d in
               _audit(env.broker, "provider_key.rotate") + _audit(env.broker, "provider_key.revoke")]
    assert actions == [("wl_admin", result["key_id"]), ("scheduler", "key_initial")]
    assert all(old_key not in json.dumps(row) and new_key not in json.dumps(row)
               for row in _audit(env.broker, "provider_key.rotate"))


def test_a_new_key_that_does_not_work_is_never_used(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    env = _provider_env(make_live_broker, sqlite_url, fake)
    _give_key_admin(env.broker.services, FakeKeyAdmin(fake.url, works=False))
    before = _vault_doc(env)
    resp = env.broker.client.post("/v1/admin/providers/fake-openai/rotate",
                                  headers=env.broker.admin())
    assert resp.status_code == 502, resp.text
    assert _vault_doc(env) == before
    assert list(fake.state.admin_keys) == ["key_initial"]  # the failed key was revoked again


def test_without_an_admin_api_an_operator_written_version_is_used_at_once(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    env = _provider_env(make_live_broker, sqlite_url, fake)
    token = env.token()
    call = {"model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    assert env.broker.client.post("/v1/messages", json=call,
                                  headers={"x-api-key": token}).status_code == 200
    new_key = SECRETS.add("sk-operator-" + secrets.token_urlsafe(12))
    fake.state.valid_keys = {env.key, new_key}
    Vault(env.broker.settings.vault).write(env.vault_path, {"api_key": new_key})
    resp = env.broker.client.post("/v1/admin/providers/fake-anthropic/rotate",
                                  headers=env.broker.admin())
    assert resp.status_code == 200 and resp.json()["mode"] == "reloaded"
    assert env.broker.client.post("/v1/messages", json=call,
                                  headers={"x-api-key": token}).status_code == 200
    assert fake.state.received_keys[-1] == new_key
    assert [a for a, _, _ in _audit(env.broker, "provider_key.reload")] == ["wl_admin"]


def test_provider_rotation_refusals(make_live_broker: Callable[..., Broker], sqlite_url: str,
                                   fake: FakeProviderServer) -> None:
    env = _provider_env(make_live_broker, sqlite_url, fake)
    broker = env.broker
    before = _vault_doc(env)
    assert_problem(broker.client.post("/v1/admin/providers/nope/rotate", headers=broker.admin()),
                   404, "not_found")
    refused = broker.client.post("/v1/admin/providers/mock/rotate", headers=broker.admin())
    assert assert_problem(refused, 409, "conflict")["detail"] == "this provider takes no key"
    tenant = broker.create_tenant()
    ident = broker.create_workload(tenant["id"], kind="admin", roles=["tenant-admin"])
    headers = {"authorization": f"Bearer {broker.token(ident['client_id'], ident['client_secret'])}"}
    assert_problem(broker.client.post("/v1/admin/providers/fake-openai/rotate", headers=headers),
                   403, "forbidden")
    assert _vault_doc(env) == before  # no refusal touched the stored key


def test_provider_keys_rotate_on_the_configured_interval(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    env = _provider_env(make_live_broker, sqlite_url, fake,
                        rotation={"provider_interval_s": 1}, scheduler={"tick_s": 0.1})
    _give_key_admin(env.broker.services, FakeKeyAdmin(fake.url))
    _doc, version = _vault_doc(env)
    wait_for(lambda: _vault_doc(env)[1] != version, timeout=20, interval=0.1,
             what="a scheduled provider rotation")
    assert {a for a, _, _ in _audit(env.broker, "provider_key.rotate")} == {"scheduler"}
