"""Rotating provider keys through the providers' admin APIs (``credential = "rotating"``).

Against the strict fakes of OpenAI's Admin API (service accounts), OpenRouter's management API
and Anthropic's key-status API (:mod:`plugins.mock_provider_admin`), a real OpenBao and real
databases: a rotation creates a key, checks it, swaps it in as a new Vault version and deletes
the old key after the grace, never before; every failed step leaves the old key serving and no
key behind at the provider; Anthropic keys are watched; OpenAI's project spend limit is held.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import openai
import pytest
from sqlalchemy import select

from broker.credentials import rotating, watch
from broker.errors import VaultUnavailable
from broker.services import Services
from broker.storage.credential_models import ProviderKey
from broker.storage.vault import CasConflict, Vault
from plugins.mock_provider_admin import OPENAI_PROJECT, AdminFault
from tests.conftest import SECRETS, Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import Env, make_env
from tests.support import assert_problem, wait_for

CHAT = {"model": "gpt-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(autouse=True)
def _no_check_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused new key is checked again after a pause; the fake never needs one."""
    monkeypatch.setattr(rotating, "CHECK_DELAYS_S", (0.0,))


def _admin_path(env: Env) -> str:
    return env.vault_path.replace("/providers/fake", "/admin/fake-openai")


def _rotating(sections: dict[str, dict[str, Any]], vault_path: str) -> None:
    sections["providers"]["fake-openai"].update(
        credential="rotating", vault_path=vault_path + "-openai",
        admin_vault_path=vault_path.replace("/providers/fake", "/admin/fake-openai"),
        project_id=OPENAI_PROJECT)


def _openai_env(make_live_broker: Callable[..., Broker], db: str, fake: FakeProviderServer,
                *, managed_first_key: bool = True, **sections: Any) -> Env:
    """A broker whose ``fake-openai`` provider rotates: the admin key in Vault, and a first
    key made through the admin API (as an operator would), stored with its ids."""
    holder: dict[str, str] = {}

    def factory(db_: str, **kw: Any) -> Broker:
        return make_live_broker(db_, **kw, **sections)

    def adjust(kw: dict[str, dict[str, Any]]) -> None:
        vault_path = kw["providers"]["fake-openai"]["vault_path"]
        holder["path"] = vault_path
        _rotating(kw, vault_path)

    env = make_env(factory, db, fake, adjust=adjust)
    vault = Vault(env.broker.settings.vault)
    vault.write(_admin_path(env), {"api_key": SECRETS.add(fake.state.admin_key)})
    if managed_first_key:
        svc = env.broker.services
        first = svc.providers["fake-openai"].create_key(  # type: ignore[attr-defined]
            fake.state.admin_key, "operator-first")
        SECRETS.add(first.key)
        vault.write(holder["path"] + "-openai", {"api_key": first.key, "key_id": first.key_id,
                                                 "account_id": first.account_id})
    else:
        key = SECRETS.add("sk-operator-" + secrets.token_urlsafe(16))
        fake.state.add_openai_user_key(key)
        vault.write(holder["path"] + "-openai", {"api_key": key})
    fake.state.valid_keys = (fake.state.valid_keys or set()) | {env.key}
    return env


def _stored(env: Env) -> tuple[dict[str, Any], int]:
    found = Vault(env.broker.settings.vault).read(env.vault_path + "-openai")
    assert found is not None
    return found


def _live(fake: FakeProviderServer) -> set[str]:
    """The keys the admin APIs made that still exist at the provider."""
    return set(fake.state.live_admin_keys().values())


def _call(env: Env, token: str) -> int:
    resp = env.broker.client.post("/v1/chat/completions", json=CHAT,
                                  headers={"authorization": f"Bearer {token}"})
    status: int = resp.status_code
    return status


def _journal(svc: Services) -> list[Any]:
    table = ProviderKey.__table__  # type: ignore[attr-defined]
    return list(svc.db.transaction(lambda conn: conn.execute(
        select(table).order_by(table.c.created_at, table.c.id)).all()))


def _alerts(broker: Broker) -> list[dict[str, Any]]:
    resp = broker.client.get("/v1/admin/alerts", headers=broker.admin())
    assert resp.status_code == 200, resp.text
    return [a for a in resp.json()["data"] if a["detector"] == "provider"]


def _providers(broker: Broker, headers: dict[str, str] | None = None) -> dict[str, Any]:
    resp = broker.client.get("/v1/admin/providers", headers=headers or broker.admin())
    assert resp.status_code == 200, resp.text
    return {p["name"]: p for p in resp.json()["data"]}


def _audit(broker: Broker, action: str) -> list[dict[str, Any]]:
    resp = broker.client.get("/v1/admin/audit", params={"action": action, "order": "asc"},
                             headers=broker.admin())
    assert resp.status_code == 200, resp.text
    return list(resp.json()["data"])


# --- a rotation under load ----------------------------------------------------------------


def test_a_rotation_in_the_middle_of_200_calls_fails_none(
    make_live_broker: Callable[..., Broker], db_url: str, fake: FakeProviderServer,
) -> None:
    env = _openai_env(make_live_broker, db_url, fake)
    svc = env.broker.services
    old_doc, _ = _stored(env)
    old_key = old_doc["api_key"]
    token = env.token(budget=50_000_000)
    statuses: list[int] = []
    lock = threading.Lock()
    rotated = threading.Event()

    def traffic() -> None:
        client = openai.OpenAI(api_key=token, base_url=f"{env.broker.url}/v1", max_retries=0)
        try:
            while True:
                with lock:
                    if len(statuses) >= 200:
                        return
                    statuses.append(0)
                    index = len(statuses) - 1
                try:
                    client.chat.completions.create(
                        model="gpt-test", max_tokens=5,
                        messages=[{"role": "user", "content": "hi"}])
                    statuses[index] = 200
                except openai.APIStatusError as exc:
                    statuses[index] = exc.status_code
                if index == 60:
                    rotated.wait(30)
        finally:
            client.close()

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    for w in workers:
        w.start()
    wait_for(lambda: len(statuses) >= 50, timeout=60, what="50 calls before the rotation")
    resp = env.broker.client.post("/v1/admin/providers/fake-openai/rotate",
                                  json={"reason": "scheduled hygiene"}, headers=env.broker.admin())
    rotated.set()
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["mode"] == "rotated" and result["previous_key_id"] == old_doc["key_id"]
    new_doc, version = _stored(env)
    assert version == result["version"] and new_doc["key_id"] == result["key_id"]
    new_key = SECRETS.add(new_doc["api_key"])
    assert new_key != old_key and old_key not in resp.text and new_key not in resp.text
    # Within the grace the old key lives on at the provider: a call still running on it works.
    assert rotating.tidy(svc) == []
    assert old_key in _live(fake)
    for w in workers:
        w.join(timeout=120)
    assert len(statuses) == 200 and set(statuses) == {200}, f"lost calls: {sorted(set(statuses))}"
    assert old_key in fake.state.received_keys and new_key in fake.state.received_keys
    assert fake.state.received_keys[-1] == new_key
    # Not one second before the grace is over; then the old key (and its account) are gone.
    revoke_at = int(datetime.fromisoformat(result["previous_key_revoke_at"]).timestamp())
    assert revoke_at - int(time.time()) > env.broker.settings.rotation.provider_grace_s - 120
    assert rotating.tidy(svc, now=revoke_at - 1) == []
    assert old_key in _live(fake)
    assert rotating.tidy(svc, now=revoke_at) == [old_doc["key_id"]]
    assert _live(fake) == {new_key}
    assert old_doc["account_id"] not in fake.state.service_accounts
    assert _call(env, token) == 200
    assert [(e["actor"], e["detail"]["key_id"]) for e in _audit(env.broker, "provider_key.rotate")] \
        == [("wl_admin", result["key_id"])]
    assert [e["detail"]["key_id"] for e in _audit(env.broker, "provider_key.revoke")] \
        == [old_doc["key_id"]]
    states = {row.key_id: row.state for row in _journal(svc)}
    assert states == {old_doc["key_id"]: "deleted", result["key_id"]: "serving"}


# --- every failed step ------------------------------------------------------------------


def _fail_vault_write(svc: Services, error: Exception, *, lands: bool = False
                      ) -> Callable[[], None]:
    """Make the next write of a provider key fail (after landing, with ``lands``)."""
    original = svc.vault.write

    def write(path: str, data: dict[str, Any], cas: int | None = None) -> int:
        if path.endswith("-openai"):
            svc.vault.write = original  # type: ignore[method-assign]
            if lands:
                original(path, data, cas)
            raise error
        return original(path, data, cas)

    svc.vault.write = write  # type: ignore[method-assign]
    return lambda: setattr(svc.vault, "write", original)


FAILURES: dict[str, Callable[[Env], Callable[[], None] | None]] = {
    "create refused": lambda env: env.fake.state.admin_faults.update(
        {"openai.create_service_account": AdminFault(500)}),
    "create answer lost": lambda env: env.fake.state.admin_faults.update(
        {"openai.create_service_account": AdminFault(502, after=True)}),
    "check refused": lambda env: env.fake.state.admin_faults.update(
        {"check": AdminFault(401, times=10)}),
    "check refused, then the deletion fails": lambda env: env.fake.state.admin_faults.update(
        {"check": AdminFault(401, times=10),
         "openai.delete_service_account": AdminFault(500, times=1)}),
    "store conflict": lambda env: _fail_vault_write(env.broker.services, CasConflict("x")),
    "store: Vault down": lambda env: _fail_vault_write(
        env.broker.services, VaultUnavailable("Vault did not answer")),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_every_failed_step_leaves_the_old_key_serving_and_no_key_behind(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
    failure: str,
) -> None:
    env = _openai_env(make_live_broker, sqlite_url, fake)
    svc = env.broker.services
    before = _stored(env)
    token = env.token()
    live_before = _live(fake)
    undo = FAILURES[failure](env)
    resp = env.broker.client.post("/v1/admin/providers/fake-openai/rotate",
                                  headers=env.broker.admin())
    if undo is not None:
        undo()
    assert resp.status_code in (409, 502, 503), resp.text
    assert _stored(env) == before  # the old key serves on
    fake.state.admin_faults.clear()
    # A key the failed rotation could not delete at once goes at the next tidy run.
    rotating.tidy(svc, now=int(time.time()) + rotating.STALE_S + 1)
    assert _live(fake) == live_before, "a key was left behind at the provider"
    assert _call(env, token) == 200
    assert fake.state.received_keys[-1] == before[0]["api_key"]
    view = _providers(env.broker)["fake-openai"]
    assert view["last_rotation"]["result"] == "failed"
    assert view["health"] == "degraded" and "previous key serves on" in view["health_reason"]
    alert = _alerts(env.broker)[0]
    assert alert["workload_id"] == "provider:fake-openai" and alert["tenant_id"] == ""
    assert "rotation failed" in alert["summary"]
    assert [row.state for row in _journal(svc)] in (["discarded"], ["failed"])
    text = json.dumps([view, alert, _audit(env.broker, "provider_key.rotate_failed")])
    assert fake.state.admin_key not in text and before[0]["api_key"] not in text


def test_a_rotation_that_died_after_storing_its_key_is_finished_not_undone(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = _openai_env(make_live_broker, sqlite_url, fake)
    svc = env.broker.services
    old_doc, _ = _stored(env)

    def died(self: Any, *args: Any) -> Any:
        raise SystemExit("the process died")

    monkeypatch.setattr(rotating._Cycle, "_serve", died)
    with pytest.raises(SystemExit):
        rotating.rotate(svc, "fake-openai", "test")
    monkeypatch.undo()
    new_doc, _ = _stored(env)
    assert new_doc["key_id"] != old_doc["key_id"]
    # Later, the tidy job sees Vault serves the new key: it is promoted, the old one retires.
    stale = int(time.time()) + rotating.STALE_S + 1
    assert rotating.tidy(svc, now=stale) == []
    assert {row.key_id: row.state for row in _journal(svc)}[new_doc["key_id"]] == "serving"
    assert new_doc["api_key"] in _live(fake)
    grace = env.broker.settings.rotation.provider_grace_s
    assert rotating.tidy(svc, now=stale + grace + 1) == [old_doc["key_id"]]
    assert _live(fake) == {new_doc["api_key"]}


def test_a_rotation_that_died_before_learning_its_key_id_finds_it_by_name(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = _openai_env(make_live_broker, sqlite_url, fake)
    before = _stored(env)
    live_before = _live(fake)
    real = rotating._Cycle._journal_update

    def died(self: Any, **values: Any) -> None:
        if values.get("state") == "created":
            raise SystemExit("the process died")
        real(self, **values)

    monkeypatch.setattr(rotating._Cycle, "_journal_update", died)
    with pytest.raises(SystemExit):
        rotating.rotate(env.broker.services, "fake-openai", "test")
    monkeypatch.undo()
    assert len(_live(fake)) == len(live_before) + 1  # made, but the broker never learnt its id
    assert rotating.tidy(env.broker.services) == []  # not while it might still be running
    assert len(_live(fake)) == len(live_before) + 1
    rotating.tidy(env.broker.services, now=int(time.time()) + rotating.STALE_S + 1)
    assert _live(fake) == live_before and _stored(env) == before


def test_a_replaced_key_whose_deletion_fails_is_retried_and_alerted(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    env = _openai_env(make_live_broker, sqlite_url, fake)
    svc = env.broker.services
    old_doc, _ = _stored(env)
    rotating.rotate(svc, "fake-openai", "test")
    later = int(time.time()) + env.broker.settings.rotation.provider_grace_s + 1
    fake.state.admin_faults["openai.delete_service_account"] = AdminFault(500, times=3)
    for _ in range(3):
        assert rotating.tidy(svc, now=later) == []
    assert old_doc["api_key"] in _live(fake)
    assert _providers(env.broker)["fake-openai"]["health"] == "degraded"
    assert any("could not be deleted" in a["summary"] for a in _alerts(env.broker))
    assert rotating.tidy(svc, now=later) == [old_doc["key_id"]]
    assert old_doc["api_key"] not in _live(fake)


def test_an_operator_key_without_an_id_is_left_to_a_person_with_an_alert(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    env = _openai_env(make_live_broker, sqlite_url, fake, managed_first_key=False)
    svc = env.broker.services
    old_key = _stored(env)[0]["api_key"]
    result = rotating.rotate(svc, "fake-openai", "test")
    assert result.previous_key_id is None
    rotating.tidy(svc, now=int(time.time()) + env.broker.settings.rotation.provider_grace_s + 1)
    assert fake.state.valid_keys is not None and old_key in fake.state.valid_keys
    assert any("delete it by hand" in a["summary"] for a in _alerts(env.broker))
    assert sorted(r.state for r in _journal(svc)) == ["abandoned", "serving"]


def test_provider_keys_rotate_on_the_configured_interval(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    env = _openai_env(make_live_broker, sqlite_url, fake,
                      rotation={"provider_interval_s": 1}, scheduler={"tick_s": 0.1})
    _doc, version = _stored(env)
    wait_for(lambda: _stored(env)[1] != version, timeout=20, interval=0.1,
             what="a scheduled provider rotation")
    assert {e["actor"] for e in _audit(env.broker, "provider_key.rotate")} == {"scheduler"}


# --- OpenRouter ---------------------------------------------------------------------------


def test_openrouter_keys_rotate_through_its_management_api(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    def adjust(sections: dict[str, dict[str, Any]]) -> None:
        path = sections["providers"]["fake-openai"]["vault_path"]
        sections["providers"]["router"] = {
            "plugin": "openrouter", "base_url": fake.url + "/api/v1", "credential": "rotating",
            "vault_path": path + "-router", "admin_vault_path": path + "-router-admin"}
        sections["models"]["router-test"] = {**sections["models"]["gpt-test"],
                                             "provider": "router"}

    env = make_env(make_live_broker, sqlite_url, fake, adjust=adjust)
    svc = env.broker.services
    vault = Vault(env.broker.settings.vault)
    vault.write(env.vault_path + "-router-admin", {"api_key": fake.state.admin_key})
    first = svc.providers["router"].create_key(  # type: ignore[attr-defined]
        fake.state.admin_key, "operator-first")
    vault.write(env.vault_path + "-router", {"api_key": SECRETS.add(first.key),
                                             "key_id": first.key_id})
    token = env.token(models=["router-test"])
    call = {**CHAT, "model": "router-test"}
    headers = {"authorization": f"Bearer {token}"}
    assert env.broker.client.post("/v1/chat/completions", json=call, headers=headers).status_code == 200
    result = rotating.rotate(svc, "router", "test")
    assert result.mode == "rotated" and result.previous_key_id == first.key_id
    assert env.broker.client.post("/v1/chat/completions", json=call, headers=headers).status_code == 200
    new_key = SECRETS.add(vault.read(env.vault_path + "-router")[0]["api_key"])  # type: ignore[index]
    assert fake.state.received_keys[-1] == new_key
    rotating.tidy(svc, now=int(time.time()) + env.broker.settings.rotation.provider_grace_s + 1)
    assert first.key_id not in fake.state.router_keys
    assert env.broker.client.post("/v1/chat/completions", json=call, headers=headers).status_code == 200


# --- Anthropic: watched, not rotated ------------------------------------------------------


@pytest.fixture
def anthropic_env(make_live_broker: Callable[..., Broker], sqlite_url: str,
                  fake: FakeProviderServer) -> Iterator[Env]:
    def adjust(sections: dict[str, dict[str, Any]]) -> None:
        path = sections["providers"]["fake-anthropic"]["vault_path"]
        sections["providers"]["fake-anthropic"].update(
            credential="rotating", vault_path=path + "-anthropic",
            admin_vault_path=path + "-anthropic-admin")

    env = make_env(make_live_broker, sqlite_url, fake, adjust=adjust)
    Vault(env.broker.settings.vault).write(env.vault_path + "-anthropic-admin",
                                           {"api_key": fake.state.admin_key})
    yield env


def _console_key(env: Env, **kw: Any) -> tuple[str, str]:
    key = SECRETS.add("sk-ant-api03-" + secrets.token_urlsafe(32))
    key_id = env.fake.state.add_anthropic_key(key, **kw)
    Vault(env.broker.settings.vault).write(env.vault_path + "-anthropic", {"api_key": key})
    return key, key_id


def test_an_archived_anthropic_key_makes_the_provider_unhealthy_with_one_alert(
    anthropic_env: Env,
) -> None:
    env, svc = anthropic_env, anthropic_env.broker.services
    _key, key_id = _console_key(env)
    status = watch.watch_provider(svc, "fake-anthropic")
    assert status is not None and status.key_id == key_id and status.status == "active"
    view = _providers(env.broker)["fake-anthropic"]
    assert view["health"] == "ok" and view["key_status"]["status"] == "active"
    env.fake.state.anthropic_keys[key_id].status = "archived"
    watch.watch_provider(svc, "fake-anthropic")
    watch.watch_provider(svc, "fake-anthropic")  # a lasting condition alerts once
    view = _providers(env.broker)["fake-anthropic"]
    assert view["health"] == "unhealthy" and "archived" in view["health_reason"]
    alerts = _alerts(env.broker)
    assert len(alerts) == 1 and alerts[0]["severity"] == "critical"
    assert "console" in alerts[0]["summary"]
    # The person makes a new key in the Console, writes it to Vault and reloads.
    _console_key(env)
    resp = env.broker.client.post("/v1/admin/providers/fake-anthropic/rotate",
                                  headers=env.broker.admin())
    assert resp.status_code == 200 and resp.json()["mode"] == "reloaded"
    assert _providers(env.broker)["fake-anthropic"]["health"] == "ok"


def test_an_anthropic_key_near_its_expiry_is_flagged_before_it_expires(anthropic_env: Env) -> None:
    env, svc = anthropic_env, anthropic_env.broker.services
    _console_key(env, expires_at=time.time() + 3 * 86_400)
    watch.watch_provider(svc, "fake-anthropic")
    view = _providers(env.broker)["fake-anthropic"]
    assert view["health"] == "unhealthy" and "expires soon" in view["health_reason"]
    assert view["key_status"]["expires_at"] is not None
    assert [a["severity"] for a in _alerts(env.broker)] == ["warning"]
    token = env.token()
    resp = env.broker.client.post("/v1/messages", headers={"x-api-key": token}, json={
        "model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200  # it still works: a person has days to act


def test_a_failed_status_check_is_recorded_not_fatal(anthropic_env: Env) -> None:
    env, svc = anthropic_env, anthropic_env.broker.services
    _console_key(env)
    env.fake.state.admin_faults["anthropic.list_keys"] = AdminFault(500, times=5)
    assert watch.watch_provider(svc, "fake-anthropic") is None
    view = _providers(env.broker)["fake-anthropic"]
    assert view["health"] == "unknown" and "HTTP 500" in view["health_reason"]


# --- OpenAI's project spend limit ---------------------------------------------------------


def test_the_project_spend_limit_is_set_and_held_at_the_provider(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    def factory(db: str, **kw: Any) -> Broker:
        kw["providers"]["fake-openai"]["project_spend_limit_micros"] = 250_000_000
        return make_live_broker(db, **kw)

    env = _openai_env(factory, sqlite_url, fake)
    svc = env.broker.services
    assert watch.sync_spend_limit(svc, "fake-openai") == 250_000_000
    assert fake.state.spend_limits[OPENAI_PROJECT] == 25_000  # cents
    fake.state.spend_limits[OPENAI_PROJECT] = 999_999  # someone raised it at the provider
    assert watch.sync_spend_limit(svc, "fake-openai") == 250_000_000
    assert fake.state.spend_limits[OPENAI_PROJECT] == 25_000
    view = _providers(env.broker)["fake-openai"]["spend_limit"]
    assert view["limit_micros"] == view["provider_limit_micros"] == 250_000_000
    fake.state.admin_faults["openai.spend_limit"] = AdminFault(500, times=5)
    assert watch.sync_spend_limit(svc, "fake-openai") is None
    assert _providers(env.broker)["fake-openai"]["health"] == "degraded"
    assert any("spend limit" in a["summary"] for a in _alerts(env.broker))


# --- the listing and its refusals ---------------------------------------------------------


def test_the_provider_listing_shows_each_mode_to_org_wide_roles_only(
    make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer,
) -> None:
    env = _openai_env(make_live_broker, sqlite_url, fake)
    broker = env.broker
    rotating.rotate(broker.services, "fake-openai", "test")
    auditor = broker.create_workload(broker.create_tenant()["id"], kind="admin",
                                     roles=["auditor"])
    headers = {"authorization":
               f"Bearer {broker.token(auditor['client_id'], auditor['client_secret'])}"}
    views = _providers(broker, headers)
    openai_view, static = views["fake-openai"], views["fake-anthropic"]
    assert openai_view["credential"] == "rotating" and openai_view["health"] == "ok"
    assert openai_view["key_version"] == _stored(env)[1]
    assert openai_view["last_rotation"]["result"] == "ok"
    assert [p["state"] for p in openai_view["pending_deletions"]] == ["retiring"]
    assert static["credential"] == "static" and static["key_version"] is not None
    assert views["mock"]["key_version"] is None
    text = json.dumps(views)
    assert fake.state.admin_key not in text and env.key not in text
    assert _stored(env)[0]["api_key"] not in text
    tenant_admin = broker.create_workload(broker.create_tenant()["id"], kind="admin",
                                          roles=["tenant-admin"])
    other = {"authorization":
             f"Bearer {broker.token(tenant_admin['client_id'], tenant_admin['client_secret'])}"}
    assert_problem(broker.client.get("/v1/admin/providers", headers=other), 403, "forbidden")
    assert_problem(broker.client.post("/v1/admin/providers/fake-openai/rotate", headers=headers),
                   403, "forbidden")


def test_rotation_refusals(make_live_broker: Callable[..., Broker], sqlite_url: str,
                           fake: FakeProviderServer) -> None:
    env = _openai_env(make_live_broker, sqlite_url, fake)
    broker = env.broker
    before = _stored(env)
    assert_problem(broker.client.post("/v1/admin/providers/nope/rotate", headers=broker.admin()),
                   404, "not_found")
    refused = broker.client.post("/v1/admin/providers/mock/rotate", headers=broker.admin())
    assert assert_problem(refused, 409, "conflict")["detail"] == "this provider takes no key"
    Vault(broker.settings.vault).write(_admin_path(env), {"note": "no key"})
    missing = broker.client.post("/v1/admin/providers/fake-openai/rotate", headers=broker.admin())
    assert "no admin key" in assert_problem(missing, 409, "conflict")["detail"]
    assert _stored(env) == before


def test_without_an_admin_api_an_operator_written_version_is_used_at_once(env: Env) -> None:
    token = env.token()
    call = {"model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    assert env.broker.client.post("/v1/messages", json=call,
                                  headers={"x-api-key": token}).status_code == 200
    new_key = SECRETS.add("sk-operator-" + secrets.token_urlsafe(12))
    env.fake.state.valid_keys = {env.key, new_key}
    Vault(env.broker.settings.vault).write(env.vault_path, {"api_key": new_key})
    resp = env.broker.client.post("/v1/admin/providers/fake-anthropic/rotate",
                                  headers=env.broker.admin())
    assert resp.status_code == 200 and resp.json()["mode"] == "reloaded"
    assert env.broker.client.post("/v1/messages", json=call,
                                  headers={"x-api-key": token}).status_code == 200
    assert env.fake.state.received_keys[-1] == new_key
    assert [e["actor"] for e in _audit(env.broker, "provider_key.reload")] == ["wl_admin"]
