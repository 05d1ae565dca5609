"""Rotation: signing keys (published as next before they sign, kept as previous until their
tokens expired) and workload secrets (old and new both work during the grace); provider keys
are in ``tests/test_provider_rotation.py``."""

from __future__ import annotations

import calendar
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from sqlalchemy import text

from broker.cli import main as cli_main
from broker.devvault import DevVault
from broker.revocation import rotation
from broker.tokens.issuance import authenticate_client
from broker.tokens.keys import MAX_PREVIOUS_KEYS, RotationTooSoon
from tests.conftest import Broker
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
