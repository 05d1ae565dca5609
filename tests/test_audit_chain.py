"""The audit trail is a hash chain with signed checkpoints: whoever can write the database can
still change it, but not without ``broker audit verify`` (and the API's own output) naming the
first entry edited, deleted, inserted or reordered."""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, text

from broker.audit import checkpoints
from broker.audit.verify import Report, keys_from_jwks, verify, verify_stored
from broker.cli import main as cli_main
from broker.devvault import DevVault
from broker.metrics import Metrics
from broker.storage import audit
from broker.storage.db import Database, make_engine
from tests.conftest import Broker


def _append(broker: Broker, n: int, tenant_id: str | None = None) -> None:
    """``n`` entries, as admin actions write them."""
    def txn(conn: Connection) -> None:
        for i in range(n):
            audit.record(conn, "admin", "test.act", f"obj-{i}", {"i": i, "tenant_id": tenant_id},
                         1_700_000_000 + i)
    broker.services.db.transaction(txn)


def _verify(broker: Broker) -> Report:
    keys = broker.services.audit_keys.public_keys()
    return broker.services.db.read_transaction(lambda conn: verify_stored(conn, keys))


def _sql(broker: Broker, statement: str, **params: Any) -> None:
    broker.services.db.transaction(lambda conn: conn.execute(text(statement), params))


def _checkpoint(broker: Broker) -> dict[str, Any] | None:
    svc = broker.services
    return checkpoints.checkpoint_once(svc.db, svc.audit_keys, svc.settings.audit)


@pytest.fixture
def chain(broker: Broker) -> Broker:
    """A broker whose chain holds a tenant, a workload and ten more entries."""
    tenant = broker.create_tenant()
    broker.create_workload(tenant["id"])
    _append(broker, 10, tenant["id"])
    return broker


def _head(broker: Broker) -> int:
    return broker.services.db.read_transaction(audit.head)[0]


# --- a clean chain ---------------------------------------------------------------------------


def test_a_clean_chain_verifies(chain: Broker) -> None:
    assert _checkpoint(chain) is not None
    _append(chain, 3)
    report = _verify(chain)
    assert report.ok, report.problem
    assert report.entries == _head(chain) >= 15
    assert report.checkpoints == 1
    assert "audit chain ok" in report.line()


def test_each_hash_is_sha256_of_the_previous_hash_and_the_rfc8785_entry(chain: Broker) -> None:
    import hashlib

    import rfc8785

    entries = chain.client.get("/v1/admin/audit?order=asc&limit=1000", headers=chain.admin()).json()["data"]
    assert entries[0]["prev_hash"] == "0" * 64
    for before, entry in zip([None, *entries], entries, strict=False):
        body = {k: v for k, v in entry.items() if k != "hash"}
        expected = hashlib.sha256(entry["prev_hash"].encode() + b"\n" + rfc8785.dumps(body)).hexdigest()
        assert entry["hash"] == expected
        if before is not None:
            assert entry["prev_hash"] == before["hash"]
            assert entry["seq"] == before["seq"] + 1
    assert set(entries[0]) == {"seq", "ts", "actor", "action", "target", "tenant_id", "detail",
                               "prev_hash", "hash"}


def test_values_json_cannot_write_exactly_are_kept_as_strings(chain: Broker) -> None:
    huge = 2**70
    chain.services.db.transaction(lambda conn: audit.record(
        conn, "admin", "test.odd", "x", {"big": huge, "nan": float("nan"), "t": (1, 2)}, 1))
    [entry] = chain.services.db.read_transaction(lambda conn: audit.page(
        conn, tenant_id=None, action="test.odd", before=None, limit=5))[0]
    assert entry["detail"] == {"big": str(huge), "nan": "nan", "t": [1, 2]}
    assert _verify(chain).ok


def test_an_entry_lands_with_its_change_or_not_at_all(broker: Broker) -> None:
    """An entry of a transaction that failed is never written, neither then nor by the next
    transaction that happens to get the same pooled connection."""
    db = broker.services.db
    before = _head(broker)

    def failing(conn: Connection) -> None:
        audit.record(conn, "admin", "test.lost", "x", {}, 1)
        raise RuntimeError("the change failed")

    with pytest.raises(RuntimeError):
        db.transaction(failing)
    db.transaction(lambda conn: audit.record(conn, "admin", "test.kept", "y", {}, 2))
    actions = [e["action"] for e in db.read_transaction(lambda conn: audit.entries(conn, before))]
    assert actions == ["test.kept"]
    assert _verify(broker).ok


# --- tampering, one row at a time -------------------------------------------------------------


@pytest.mark.parametrize("column, value", [
    ("detail", '{"i": 99}'), ("actor", "someone-else"), ("action", "test.other"),
    ("ts", "1"), ("tenant_id", "t_other"), ("prev_hash", "f" * 64),
])
def test_an_edited_entry_is_named(chain: Broker, column: str, value: str) -> None:
    _sql(chain, f"UPDATE audit_event SET {column} = :v WHERE seq = 7", v=value)
    report = _verify(chain)
    assert (report.ok, report.kind, report.seq) == (False, "edited", 7), report.problem
    assert "entry 7 was edited" in str(report.problem)


def test_an_entry_edited_and_rehashed_is_named_by_the_next_link(chain: Broker) -> None:
    row = chain.services.db.read_transaction(lambda conn: audit.entries(conn, 4, 1))[0]
    forged = {**row, "actor": "mallory"}
    forged["hash"] = audit.entry_hash(forged)
    _sql(chain, "UPDATE audit_event SET actor = 'mallory', hash = :h WHERE seq = 5", h=forged["hash"])
    report = _verify(chain)
    assert (report.kind, report.seq) == ("edited", 5), report.problem


def test_a_deleted_entry_is_named(chain: Broker) -> None:
    _sql(chain, "DELETE FROM audit_event WHERE seq = 6")
    report = _verify(chain)
    assert (report.ok, report.kind, report.seq) == (False, "deleted", 6), report.problem


def test_a_deletion_hidden_by_renumbering_is_named(chain: Broker) -> None:
    _sql(chain, "DELETE FROM audit_event WHERE seq = 6")
    # Two steps: a single ``seq = seq - 1`` would trip the unique index midway on PostgreSQL.
    _sql(chain, "UPDATE audit_event SET seq = -seq + 1 WHERE seq > 6")
    _sql(chain, "UPDATE audit_event SET seq = -seq WHERE seq < 0")
    report = _verify(chain)
    assert (report.kind, report.seq) == ("deleted", 6), report.problem


def test_a_deleted_tail_is_caught_by_the_last_checkpoint(chain: Broker) -> None:
    assert _checkpoint(chain) is not None
    head = _head(chain)
    # Everything the database holds agrees with the shorter chain, head row included.
    _sql(chain, "DELETE FROM audit_event WHERE seq >= :s", s=head - 1)
    prev = chain.services.db.read_transaction(lambda conn: audit.entries(conn, head - 3, 1))[0]["hash"]
    _sql(chain, "UPDATE audit_head SET seq = :s, hash = :h", s=head - 2, h=prev)
    report = _verify(chain)
    assert (report.kind, report.seq) == ("truncated", head - 1), report.problem


def test_a_deleted_tail_without_checkpoint_is_caught_by_the_head(chain: Broker) -> None:
    head = _head(chain)
    _sql(chain, "DELETE FROM audit_event WHERE seq = :s", s=head)
    report = _verify(chain)
    assert (report.kind, report.seq) == ("truncated", head), report.problem


def _make_room_at(broker: Broker, seq: int) -> None:
    _sql(broker, "UPDATE audit_event SET seq = -seq - 1 WHERE seq >= :s", s=seq)
    _sql(broker, "UPDATE audit_event SET seq = -seq WHERE seq < 0")


def _insert(broker: Broker, entry: dict[str, Any]) -> None:
    _sql(broker, "INSERT INTO audit_event (seq, ts, actor, action, target, tenant_id, detail, "
         "prev_hash, hash) VALUES (:seq, 1700000000, :actor, :action, :target, :tenant_id, "
         ":detail, :prev_hash, :hash)", **{**entry, "detail": json.dumps(entry["detail"])})


def test_an_inserted_entry_is_named(chain: Broker) -> None:
    before = chain.services.db.read_transaction(lambda conn: audit.entries(conn, 3, 1))[0]
    forged: dict[str, Any] = {"seq": 5, "ts": "2023-11-14T22:13:20Z", "actor": "admin",
                              "action": "tenant.delete", "target": "t_x", "tenant_id": None,
                              "detail": {}, "prev_hash": before["hash"]}
    forged["hash"] = audit.entry_hash(forged)  # the forger knows the algorithm, not the key
    _make_room_at(chain, 5)
    _insert(chain, forged)
    report = _verify(chain)
    assert (report.kind, report.seq) == ("inserted", 5), report.problem


def test_an_inserted_entry_with_a_made_up_hash_is_named(chain: Broker) -> None:
    _make_room_at(chain, 5)
    _insert(chain, {"seq": 5, "actor": "admin", "action": "x", "target": "y", "tenant_id": None,
                    "detail": {}, "prev_hash": "a" * 64, "hash": "b" * 64})
    report = _verify(chain)
    assert (report.kind, report.seq) == ("inserted", 5), report.problem


def test_a_second_entry_with_the_same_seq_is_named(chain: Broker) -> None:
    _sql(chain, "DROP INDEX ix_audit_event_seq")
    row = chain.services.db.read_transaction(lambda conn: audit.entries(conn, 5, 1))[0]
    _insert(chain, {**row, "actor": "mallory"})
    report = _verify(chain)
    assert (report.kind, report.seq) == ("inserted", 6), report.problem


def test_a_reordered_entry_is_named(chain: Broker) -> None:
    _sql(chain, "UPDATE audit_event SET seq = -1 WHERE seq = 8")
    _sql(chain, "UPDATE audit_event SET seq = 8 WHERE seq = 9")
    _sql(chain, "UPDATE audit_event SET seq = 9 WHERE seq = -1")
    report = _verify(chain)
    assert (report.kind, report.seq) == ("reordered", 8), report.problem


def test_a_rehashed_chain_is_caught_by_a_checkpoint(chain: Broker) -> None:
    """The whole tail recomputed after an edit: consistent in itself, but not with what was
    signed."""
    assert _checkpoint(chain) is not None
    entries = chain.services.db.read_transaction(lambda conn: audit.entries(conn))
    prev = entries[2]["hash"]
    for entry in entries[3:]:
        entry["prev_hash"] = prev
        if entry["seq"] == 4:
            entry["actor"] = "mallory"
        entry["hash"] = prev = audit.entry_hash(entry)
        _sql(chain, "UPDATE audit_event SET actor = :a, prev_hash = :p, hash = :h WHERE seq = :s",
             a=entry["actor"], p=entry["prev_hash"], h=entry["hash"], s=entry["seq"])
    _sql(chain, "UPDATE audit_head SET hash = :h", h=prev)
    report = _verify(chain)
    assert (report.ok, report.kind, report.seq) == (False, "edited", 1), report.problem
    assert "checkpoint" in str(report.problem)


def test_a_forged_checkpoint_is_refused(chain: Broker) -> None:
    real = _checkpoint(chain)
    assert real is not None
    _sql(chain, "UPDATE audit_checkpoint SET sig = :s", s=real["sig"][:-4] + "AAAA")
    report = _verify(chain)
    assert (report.kind, report.seq) == ("checkpoint", real["seq"]), report.problem


def test_the_checkpoint_job_refuses_to_sign_a_tampered_chain(chain: Broker) -> None:
    assert _checkpoint(chain) is not None
    _append(chain, 2)
    _sql(chain, "UPDATE audit_event SET actor = 'mallory' WHERE seq = :s", s=_head(chain))
    svc = chain.services
    metrics = Metrics()
    with pytest.raises(checkpoints.ChainBroken):
        checkpoints.checkpoint_once(svc.db, svc.audit_keys, svc.settings.audit, metrics=metrics)
    marks = svc.db.read_transaction(lambda conn: checkpoints.stored(conn))
    assert len(marks) == 1
    # What an operator alerts on: the job's refusal is counted.
    assert b'broker_audit_checkpoints_total{result="refused"} 1.0' in metrics.render()


def test_nothing_new_means_no_checkpoint(chain: Broker) -> None:
    assert _checkpoint(chain) is not None
    assert _checkpoint(chain) is None


# --- replicas -------------------------------------------------------------------------------


def test_two_replicas_keep_one_chain(make_broker: Any, pg_url: str) -> None:
    """Two brokers on one PostgreSQL database append at once, each from several threads: one
    chain, no gap, no fork, every entry once."""
    first, second = make_broker(pg_url), make_broker(pg_url)
    per_thread, errors = 25, []

    def one(name: str, i: int, conn: Connection) -> None:
        audit.record(conn, name, "test.race", str(i), {}, i)

    def append(db: Database, name: str) -> None:
        try:
            for i in range(per_thread):
                db.transaction(functools.partial(one, name, i))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(b.services.db, f"{n}-{t}"))
               for n, b in enumerate((first, second)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    entries = first.services.db.read_transaction(lambda conn: audit.entries(conn, 0, 100_000))
    race = [e for e in entries if e["action"] == "test.race"]
    assert len(race) == 8 * per_thread
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert _verify(first).ok and _verify(second).ok


# --- the API and the command line ----------------------------------------------------------


def test_the_api_output_verifies_on_its_own(chain: Broker) -> None:
    """Everything a verifier outside the broker needs: entries, checkpoints and the keys."""
    _checkpoint(chain)
    headers = chain.admin()
    entries, cursor = [], None
    while True:
        page = chain.client.get("/v1/admin/audit", params={"order": "asc", "limit": 4,
                                                           **({"cursor": cursor} if cursor else {})},
                                headers=headers).json()
        entries += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    marks = chain.client.get("/v1/admin/audit/checkpoints", headers=headers).json()["data"]
    jwks = chain.client.get("/v1/admin/audit/keys", headers=headers).json()
    assert verify(entries, marks, keys_from_jwks(jwks)).ok
    newest = chain.client.get("/v1/admin/audit?limit=2", headers=headers).json()
    assert [e["seq"] for e in newest["data"]] == [len(entries), len(entries) - 1]
    status = chain.client.get("/v1/admin/audit/status", headers=headers).json()
    assert status["ok"] is True and status["head_seq"] == len(entries)


def test_the_audit_key_is_not_the_token_signing_key(chain: Broker) -> None:
    _checkpoint(chain)
    keys = chain.client.get("/v1/admin/audit/keys", headers=chain.admin()).json()["keys"]
    audit_kids = {k["kid"] for k in keys}
    token_kids = {k["kid"] for k in chain.client.get("/.well-known/jwks.json").json()["keys"]}
    assert audit_kids and not audit_kids & token_kids


def test_a_tenant_admin_reads_only_its_tenant_and_cannot_verify_the_chain(chain: Broker) -> None:
    tenant = chain.create_tenant()
    other = chain.create_tenant()
    _append(chain, 2, other["id"])
    ta = chain.create_workload(tenant["id"], kind="admin", roles=["tenant-admin"])
    headers = {"authorization": f"Bearer {chain.token(ta['client_id'], ta['client_secret'])}"}
    mine = chain.client.get("/v1/admin/audit", headers=headers).json()["data"]
    assert mine and {e["tenant_id"] for e in mine} == {tenant["id"]}
    theirs = chain.client.get(f"/v1/admin/audit?tenant_id={other['id']}", headers=headers).json()
    assert theirs["data"] == []
    assert chain.client.get("/v1/admin/audit/status", headers=headers).status_code == 403


@pytest.mark.parametrize("query", ["cursor=nope", "order=sideways", "limit=0", "cursor=seq_1x"])
def test_bad_audit_queries_are_400(chain: Broker, query: str) -> None:
    resp = chain.client.get(f"/v1/admin/audit?{query}", headers=chain.admin())
    assert resp.status_code == 400
    assert resp.headers["content-type"].startswith("application/problem+json")


def _cli_env(monkeypatch: pytest.MonkeyPatch, broker: Broker, vault: DevVault, tmp_path: Path,
             **extra: str) -> None:
    monkeypatch.chdir(tmp_path)  # no config/broker.toml here: the environment is the config
    for name, value in {"BROKER_VAULT_ADDR": vault.addr, "BROKER_VAULT_TOKEN": vault.root_token,
                        "BROKER_VAULT_PREFIX": broker.settings.vault.prefix,
                        "BROKER_DATABASE_URL": broker.settings.database.url, **extra}.items():
        monkeypatch.setenv(name, value)


def test_broker_audit_verify_exits_0_then_1_naming_the_entry(
    chain: Broker, vault: DevVault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _checkpoint(chain)
    _cli_env(monkeypatch, chain, vault, tmp_path)
    assert cli_main(["audit", "verify"]) == 0
    assert "audit chain ok" in capsys.readouterr().out
    _sql(chain, "UPDATE audit_event SET detail = '{}' WHERE seq = 3")
    assert cli_main(["audit", "verify"]) == 1
    assert "entry 3 was edited" in capsys.readouterr().err


def test_checkpoints_kept_outside_the_database_catch_a_rewrite_of_everything(
    make_broker: Any, sqlite_url: str, vault: DevVault, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The database administrator deletes the tail, the head row and every checkpoint row:
    the checkpoint file still holds what was signed."""
    sink = tmp_path / "checkpoints.jsonl"
    broker = make_broker(sqlite_url, audit={"checkpoint_file": str(sink)})
    _append(broker, 6)
    assert _checkpoint(broker) is not None
    assert json.loads(sink.read_text().splitlines()[0])["seq"] == 6
    _sql(broker, "DELETE FROM audit_event WHERE seq > 4")
    _sql(broker, "DELETE FROM audit_checkpoint")
    prev = broker.services.db.read_transaction(lambda conn: audit.entries(conn, 3, 1))[0]["hash"]
    _sql(broker, "UPDATE audit_head SET seq = 4, hash = :h", h=prev)
    assert _verify(broker).ok  # the database alone no longer shows it
    _cli_env(monkeypatch, broker, vault, tmp_path, BROKER_AUDIT_CHECKPOINT_FILE=str(sink))
    assert cli_main(["audit", "verify"]) == 1
    assert "entries after 4 were deleted" in capsys.readouterr().err


def test_a_migrated_database_chains_the_entries_written_before(tmp_path: Path) -> None:
    """Migration 0011 chains the audit rows of an older database in the order they were
    written."""
    from alembic import command

    from broker.storage.db import _alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = _alembic_config(url)
    command.upgrade(config, "0010")
    engine = create_engine(url)
    with engine.begin() as conn:
        for i in range(3):
            conn.execute(text("INSERT INTO audit_event (ts, actor, action, target, detail) "
                              "VALUES (:ts, 'admin', 'tenant.create', :t, :d)"),
                         {"ts": 1_700_000_000 + i, "t": f"t_{i}", "d": json.dumps({"tenant_id": f"t_{i}"})})
    engine.dispose()
    command.upgrade(config, "head")
    db = Database(make_engine(url))
    try:
        entries = db.read_transaction(lambda conn: audit.entries(conn))
        assert [e["target"] for e in entries] == ["t_0", "t_1", "t_2"]
        assert entries[1]["tenant_id"] == "t_1"
        assert db.read_transaction(lambda conn: verify_stored(conn, {})).ok
        db.transaction(lambda conn: audit.record(conn, "admin", "x", "y", {}, 1))
        assert db.read_transaction(lambda conn: verify_stored(conn, {})).entries == 4
    finally:
        db.dispose()


# --- copies out of the database's reach ------------------------------------------------------


def test_checkpoints_reach_the_webhook_in_order_even_after_it_failed(
    make_broker: Any, sqlite_url: str,
) -> None:
    from tests.test_webhooks import Receiver

    receiver = Receiver().start()
    try:
        broker = make_broker(sqlite_url, audit={"checkpoint_webhook": receiver.url})
        receiver.fail_next(1)
        _append(broker, 2)
        svc, metrics = broker.services, Metrics()
        # Signed and stored, but the copy failed (and is counted).
        assert checkpoints.checkpoint_once(svc.db, svc.audit_keys, svc.settings.audit,
                                           metrics=metrics) is not None
        assert b'copy_failures_total{sink="webhook"} 1.0' in metrics.render()
        _append(broker, 2)
        assert _checkpoint(broker) is not None  # the first one goes first, then this one
        assert _checkpoint(broker) is None
        posted = [json.loads(r.body) for r in receiver.requests]
        assert [(p["seq"], r.status) for p, r in zip(posted, receiver.requests, strict=True)] == [
            (2, 500), (2, 200), (4, 200)]
        keys = broker.services.audit_keys.public_keys()
        assert all(checkpoints.signature_ok(p, keys) for p in posted)
    finally:
        receiver.stop()


def test_a_checkpoint_file_that_cannot_be_written_is_written_later(
    make_broker: Any, sqlite_url: str, tmp_path: Path,
) -> None:
    sink = tmp_path / "later" / "checkpoints.jsonl"
    broker = make_broker(sqlite_url, audit={"checkpoint_file": str(sink)})
    _append(broker, 1)
    assert _checkpoint(broker) is not None
    assert not sink.exists()
    sink.parent.mkdir()
    assert _checkpoint(broker) is None  # nothing new to sign; the backlog is copied
    assert [json.loads(line)["seq"] for line in sink.read_text().splitlines()] == [1]


def test_hostile_text_in_an_entry_is_kept_verifiable(broker: Broker) -> None:
    """A lone surrogate (JSON can carry one from an outside token's claims) and a target
    longer than its column: stored as hashed, and the chain still verifies."""
    broker.services.db.transaction(lambda conn: audit.record(
        conn, "broker:exchange", "token.exchange_clash", "https://issuer.test/" + "x" * 300,
        {"sub": "a\ud800b", "nul": "\x00"}, 1))
    [entry] = broker.services.db.read_transaction(lambda conn: audit.page(
        conn, tenant_id=None, action="token.exchange_clash", before=None, limit=5))[0]
    assert len(entry["target"]) == 128
    assert entry["detail"] == {"sub": "a?b", "nul": "\x00"}
    assert _verify(broker).ok
