"""Alert webhooks: every alert reaches every configured webhook that wants its severity, at least
once, in order per workload, signed, only at the configured URL, never redirected, retried with
a capped backoff, and across a restart; two replicas do not normally post one row twice.

Against real parts: OpenBao (the webhook secret), SQLite and PostgreSQL (the outbox), and an
HTTP receiver on a local port that records each request and fails when told to.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import Connection, insert, select

from broker.devvault import DevVault, free_port
from broker.metrics import Metrics
from broker.monitoring.webhooks import (
    NOT_CONFIGURED,
    SIGNATURE_HEADER,
    WebhookSender,
    backoff_s,
    enqueue,
    sign,
    target_of,
    verify,
)
from broker.settings import VaultSettings
from broker.settings.monitoring import AlertSettings
from broker.storage.db import Database, make_engine
from broker.storage.models import AlertOutbox
from broker.storage.vault import Vault
from tests.conftest import SECRETS
from tests.support import Clock, wait_for

_outbox = AlertOutbox.__table__  # type: ignore[attr-defined]

START = 1_700_000_000.0


# --- the receiver ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int  # what the receiver answered

    @property
    def alert(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.body)
        return out


@dataclass
class Receiver:
    """A webhook receiver on a real port. ``fail_next(n)`` answers 500 to the next ``n``
    requests; ``fail_when(alert)`` answers 500 to the alerts it picks; ``redirect`` answers
    ``/hook`` with a 302 to ``/elsewhere``."""

    port: int = field(default_factory=free_port)
    requests: list[Received] = field(default_factory=list)
    redirect: bool = False
    fail_when: Callable[[dict[str, Any]], bool] | None = None
    _failures_left: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def fail_next(self, n: int) -> None:
        with self._lock:
            self._failures_left = n

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        with self._lock:
            extra: dict[str, str] = {}
            if self.redirect and path == "/hook":
                status, extra = 302, {"location": "/elsewhere"}
            elif self._failures_left > 0:
                self._failures_left -= 1
                status = 500
            elif self.fail_when is not None and self.fail_when(json.loads(body)):
                status = 500
            else:
                status = 200
            self.requests.append(Received(path, headers, body, status))
        return status, extra

    def delivered(self, workload_id: str | None = None) -> list[str]:
        """Alert ids answered 2xx, in arrival order (one workload's, if given)."""
        with self._lock:
            return [r.alert["id"] for r in self.requests if r.status == 200
                    and (workload_id is None or r.alert["workload_id"] == workload_id)]

    def attempted(self, workload_id: str) -> list[str]:
        with self._lock:
            return [r.alert["id"] for r in self.requests if r.alert["workload_id"] == workload_id]

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, extra = receiver.answer(self.path, headers, body)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                self.do_POST()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=10)
            self._server = None


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def real_vault(vault: DevVault) -> Vault:
    return Vault(VaultSettings.model_validate(
        {"addr": vault.addr, "token": vault.root_token, "timeout_s": 2}))


@dataclass(frozen=True)
class Secret:
    path: str
    value: str

    @property
    def key(self) -> bytes:
        return self.value.encode()


@pytest.fixture
def secret(real_vault: Vault) -> Secret:
    value = SECRETS.add("whsec-" + secrets.token_urlsafe(32))
    path = f"webhooks-{secrets.token_hex(6)}/hook"
    real_vault.write(path, {"secret": value})
    return Secret(path, value)


@pytest.fixture
def sqlite_db(sqlite_url: str) -> Iterator[Database]:
    database = Database(make_engine(sqlite_url))
    yield database
    database.dispose()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def senders() -> Iterator[list[WebhookSender]]:
    """Senders a test made, stopped after it (which also closes their HTTP clients)."""
    made: list[WebhookSender] = []
    yield made
    for sender in made:
        sender.stop()


def alert_settings(*hooks: tuple[str, Secret] | tuple[str, Secret, str], **kw: Any) -> AlertSettings:
    webhooks = [{"url": h[0], "secret_vault_path": h[1].path,
                 **({"min_severity": h[2]} if len(h) > 2 else {})} for h in hooks]
    return AlertSettings.model_validate({"webhooks": webhooks, **kw})


def an_alert(workload_id: str, severity: str = "warning") -> dict[str, Any]:
    return {"id": f"al_{secrets.token_hex(8)}", "ts": int(START), "tenant_id": "ten_1",
            "workload_id": workload_id, "detector": "loop", "severity": severity,
            "action": "alert", "summary": "the same request 40 times in a minute",
            "evidence": {"count": 40, "window_s": 60}}


def queue(db: Database, settings: AlertSettings, *alerts: dict[str, Any]) -> int:
    def write(conn: Connection) -> int:
        return sum(enqueue(conn, settings, alert, int(START)) for alert in alerts)

    return db.transaction(write)


def outbox(db: Database) -> list[dict[str, Any]]:
    def read(conn: Connection) -> list[dict[str, Any]]:
        return [dict(r._mapping) for r in conn.execute(select(_outbox).order_by(_outbox.c.id))]

    return db.read_transaction(read)


def counted(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value(
        "broker_alert_webhook_deliveries_total", {"result": result}) or 0.0


def deliver_all(sender: WebhookSender, clock: Clock, db: Database, step_s: float,
                passes: int = 30) -> None:
    """Passes, the clock moving ``step_s`` between them, until every row is delivered."""
    for _ in range(passes):
        sender.deliver_due()
        if all(r["delivered_at"] is not None for r in outbox(db)):
            return
        clock.advance(step_s)
    raise AssertionError(f"undelivered after {passes} passes: {outbox(db)}")


# --- signatures --------------------------------------------------------------------------------


def test_a_signature_is_the_hmac_of_the_timestamp_and_the_body() -> None:
    key, body = b"k" * 32, b'{"id":"al_1"}'
    expected = hmac.new(key, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(key, body, 1_700_000_000) == f"t=1700000000,v1={expected}"
    assert verify(key, sign(key, body, 1_700_000_000), body, now=1_700_000_000)


def test_a_signature_verifies_within_the_tolerance_only() -> None:
    key, body = b"k" * 32, b"{}"
    header = sign(key, body, 1_000)
    assert verify(key, header, body, now=1_300)
    assert verify(key, header, body, now=700)
    assert not verify(key, header, body, now=1_301)
    assert verify(key, header, body, now=1_301, tolerance_s=301)


def test_a_receiver_accepts_any_of_several_v1_values() -> None:
    """So a receiver can take a signature made with either of two secrets during a rotation."""
    key, body = b"k" * 32, b"{}"
    good = sign(key, body, 1_000).rpartition("v1=")[2]
    assert verify(key, f"t=1000,v1={'0' * 64},v1={good}", body, now=1_000)


_KEY, _BODY, _T = b"k" * 32, b'{"id":"al_1","severity":"critical"}', 1_000
_GOOD = sign(_KEY, _BODY, _T)
_MAC = _GOOD.rpartition("v1=")[2]


@pytest.mark.parametrize(("header", "body"), [
    pytest.param(sign(b"x" * 32, _BODY, _T), _BODY, id="wrong-secret"),
    pytest.param(_GOOD, _BODY.replace(b"critical", b"info"), id="tampered-body"),
    pytest.param(f"t={_T + 1},v1={_MAC}", _BODY, id="timestamp-moved"),
    pytest.param(sign(_KEY, _BODY, _T - 301), _BODY, id="replayed-too-late"),
    pytest.param(sign(_KEY, _BODY, _T + 301), _BODY, id="from-the-future"),
    pytest.param(f"v1={_MAC}", _BODY, id="no-timestamp"),
    pytest.param(f"t={_T}", _BODY, id="no-signature"),
    pytest.param(f"t={_T},v1=", _BODY, id="empty-signature"),
    pytest.param(f"t={_T},v1={_MAC.upper()}", _BODY, id="upper-case-hex"),
    pytest.param(f"t={_T},t={_T + 5},v1={_MAC}", _BODY, id="two-timestamps"),
    pytest.param(f"t=+{_T},v1={_MAC}", _BODY, id="signed-timestamp"),
    pytest.param(f"t=\uff11\uff10\uff10\uff10,v1={_MAC}", _BODY, id="non-ascii-digits"),
    pytest.param(f"t={_T},v1={_MAC}é", _BODY, id="non-ascii-signature"),
    pytest.param(f"t={_T};v1={_MAC}", _BODY, id="wrong-separator"),
    pytest.param(f"t={_T},v0={_MAC}", _BODY, id="unknown-scheme-only"),
    pytest.param(f"t={_T}," + f"v1={'0' * 64}," * 20 + f"v1={_MAC}", _BODY, id="oversized-header"),
    pytest.param("", _BODY, id="empty-header"),
])
def test_verify_refuses(header: str, body: bytes) -> None:
    assert not verify(_KEY, header, body, now=_T)


# --- enqueue ---------------------------------------------------------------------------------


def test_an_alert_is_queued_for_each_webhook_that_wants_its_severity(db: Database,
                                                                       secret: Secret) -> None:
    every, serious, urgent = ("https://a.example/hook", secret), \
        ("https://b.example/hook?token=abc", secret, "warning"), \
        ("https://c.example/hook", secret, "critical")
    settings = alert_settings(every, serious, urgent)
    info, warning, critical = an_alert("w1", "info"), an_alert("w1", "warning"), \
        an_alert("w1", "critical")

    assert [queue(db, settings, a) for a in (info, warning, critical)] == [1, 2, 3]

    rows = outbox(db)
    by_alert = {a["id"]: sorted(r["target"] for r in rows if r["alert_id"] == a["id"])
                for a in (info, warning, critical)}
    a, b, c = (target_of(h[0]) for h in (every, serious, urgent))
    assert by_alert == {info["id"]: [a], warning["id"]: sorted([a, b]),
                        critical["id"]: sorted([a, b, c])}
    for row in rows:
        # The body is the exact compact JSON posted; the row names the webhook by a digest only.
        assert row["body"] == json.dumps(json.loads(row["body"]), separators=(",", ":"),
                                         sort_keys=True)
        assert len(row["target"]) == 64 and "example" not in json.dumps(row)
        assert row["workload_id"] == "w1" and row["delivered_at"] is None


def test_an_alert_rolled_back_leaves_nothing_to_deliver(sqlite_db: Database,
                                                        secret: Secret) -> None:
    settings = alert_settings(("https://a.example/hook", secret))

    def raise_the_alert_then_fail(conn: Connection) -> None:
        assert enqueue(conn, settings, an_alert("w1"), int(START)) == 1
        raise RuntimeError("the alert's own transaction failed")

    with pytest.raises(RuntimeError):
        sqlite_db.transaction(raise_the_alert_then_fail)
    assert outbox(sqlite_db) == []


def test_an_alert_body_is_strict_json_whatever_its_evidence_holds(sqlite_db: Database,
                                                                  secret: Secret) -> None:
    """A detector's ratio over a zero baseline must not fail the alert's transaction."""
    settings = alert_settings(("https://a.example/hook", secret))
    alert = {**an_alert("w1"), "evidence": {"ratio": float("inf"), "values": (1.5, float("nan"))}}
    assert queue(sqlite_db, settings, alert) == 1
    (row,) = outbox(sqlite_db)
    decoded = json.loads(row["body"], parse_constant=lambda name: pytest.fail(name))
    assert decoded["evidence"] == {"ratio": None, "values": [1.5, None]}


def test_an_alert_of_unknown_severity_is_refused(sqlite_db: Database, secret: Secret) -> None:
    settings = alert_settings(("https://a.example/hook", secret))
    with pytest.raises(ValueError, match="severity"):
        queue(sqlite_db, settings, an_alert("w1", "fatal"))


# --- delivery ----------------------------------------------------------------------------------


def test_a_receiver_that_fails_then_recovers_gets_every_alert_in_order_per_workload(
        db: Database, real_vault: Vault, secret: Secret, receiver: Receiver, metrics: Metrics,
        senders: list[WebhookSender]) -> None:
    settings = alert_settings((receiver.url, secret), retry_max_s=4)
    a1, b1, a2, b2, a3 = (an_alert(w) for w in ("wa", "wb", "wa", "wb", "wa"))
    queue(db, settings, a1, b1, a2, b2, a3)
    clock = Clock(START)
    sender = WebhookSender(db, real_vault, settings, metrics=metrics, clock=clock)
    senders.append(sender)
    receiver.fail_next(3)

    assert sender.deliver_due() == 0
    first = outbox(db)[0]
    assert (first["attempts"], first["last_error"]) == (1, "http 500")
    deliver_all(sender, clock, db, step_s=4)

    assert receiver.delivered("wa") == [a1["id"], a2["id"], a3["id"]]
    assert receiver.delivered("wb") == [b1["id"], b2["id"]]
    # A later alert is never even attempted while an earlier one of its workload is pending.
    for workload, ids in (("wa", [a1, a2, a3]), ("wb", [b1, b2])):
        order = [a["id"] for a in ids]
        attempted = [order.index(i) for i in receiver.attempted(workload)]
        assert attempted == sorted(attempted), receiver.attempted(workload)
    assert counted(metrics, "delivered") == 5 and counted(metrics, "failed") == 3
    assert all(r["delivered_at"] is not None and r["last_error"] is None for r in outbox(db))


def test_a_failing_workload_does_not_hold_back_another(
        db: Database, real_vault: Vault, secret: Secret, receiver: Receiver,
        senders: list[WebhookSender]) -> None:
    settings = alert_settings((receiver.url, secret), retry_max_s=4)
    stuck, waiting, b1, b2 = an_alert("wa"), an_alert("wa"), an_alert("wb"), an_alert("wb")
    queue(db, settings, stuck, waiting, b1, b2)
    receiver.fail_when = lambda alert: alert["workload_id"] == "wa"
    clock = Clock(START)
    sender = WebhookSender(db, real_vault, settings, clock=clock)
    senders.append(sender)

    for _ in range(6):
        sender.deliver_due()
        clock.advance(4)

    assert receiver.delivered("wb") == [b1["id"], b2["id"]]
    assert set(receiver.attempted("wa")) == {stuck["id"]}  # ``waiting`` waits behind it
    rows = {r["alert_id"]: r for r in outbox(db)}
    assert rows[stuck["id"]]["last_error"] == "http 500" and rows[stuck["id"]]["attempts"] >= 2
    assert rows[waiting["id"]]["attempts"] == 0 and rows[waiting["id"]]["delivered_at"] is None


def test_undelivered_alerts_are_delivered_by_a_new_sender_after_a_restart(
        db: Database, real_vault: Vault, secret: Secret, senders: list[WebhookSender]) -> None:
    receiver = Receiver()  # its port is closed until the broker has "restarted"
    settings = alert_settings((receiver.url, secret))
    alerts = [an_alert("w1"), an_alert("w2"), an_alert("w1")]
    queue(db, settings, *alerts)
    before = WebhookSender(db, real_vault, settings)
    senders.append(before)
    assert before.deliver_due() == 0
    assert {(r["attempts"], r["last_error"]) for r in outbox(db)} == {(1, "ConnectError"),
                                                                       (0, None)}
    before.stop()

    receiver.start()
    try:
        # The new broker starts an hour later (well past every backoff): its thread delivers.
        after = WebhookSender(db, real_vault, settings, clock=Clock(time.time() + 3600))
        senders.append(after)
        after.start()
        after.wake()
        wait_for(lambda: len(receiver.delivered()) == 3, what=lambda: f"{receiver.requests}")
        after.stop()
    finally:
        receiver.stop()

    assert receiver.delivered("w1") == [alerts[0]["id"], alerts[2]["id"]]
    assert receiver.delivered("w2") == [alerts[1]["id"]]
    assert all(r["delivered_at"] is not None for r in outbox(db))


def test_the_receiver_verifies_every_signature(
        db: Database, real_vault: Vault, secret: Secret, receiver: Receiver,
        senders: list[WebhookSender], recorded_logs: list[str]) -> None:
    settings = alert_settings((receiver.url, secret), retry_max_s=2)
    alerts = [an_alert("w1", "critical"), an_alert("w2", "info")]
    queue(db, settings, *alerts)
    clock = Clock(START + 42)
    sender = WebhookSender(db, real_vault, settings, clock=clock)
    senders.append(sender)
    receiver.fail_next(1)  # one retry, signed afresh at its own send time
    deliver_all(sender, clock, db, step_s=2)

    assert len(receiver.requests) == 3
    stored = {r["alert_id"]: r["body"].encode() for r in outbox(db)}
    for request in receiver.requests:
        header = request.headers[SIGNATURE_HEADER]
        stamp, mac = (part.partition("=")[2] for part in header.split(","))
        independent = hmac.new(secret.key, f"{stamp}.".encode() + request.body,
                               hashlib.sha256).hexdigest()
        assert hmac.compare_digest(mac, independent)
        assert verify(secret.key, header, request.body, now=int(stamp))
        assert request.body == stored[request.alert["id"]]
        assert request.headers["content-type"] == "application/json"
    stamps = [int(r.headers[SIGNATURE_HEADER].split(",")[0][2:]) for r in receiver.requests]
    assert stamps[0] == int(START + 42) and stamps[-1] > stamps[0]  # the send time, each time
    assert verify(secret.key, receiver.requests[0].headers[SIGNATURE_HEADER],
                  receiver.requests[0].body, now=int(START + 42))
    assert not verify(b"another secret", receiver.requests[0].headers[SIGNATURE_HEADER],
                      receiver.requests[0].body, now=int(START + 42))
    # The secret went into signatures only: not the outbox, not a log line.
    assert secret.value not in json.dumps(outbox(db))
    assert not [line for line in recorded_logs if secret.value in line]


def test_a_row_whose_webhook_is_not_configured_is_never_posted(
        sqlite_db: Database, real_vault: Vault, secret: Secret, receiver: Receiver,
        metrics: Metrics, senders: list[WebhookSender]) -> None:
    # Both URLs reach this test's receiver: a post to either would be seen.
    removed = f"http://127.0.0.1:{receiver.port}/removed"
    queue(sqlite_db, alert_settings((removed, secret)), an_alert("w1"))
    # A row that carries a URL where a target belongs is not a way to choose where alerts go.
    forged = f"http://127.0.0.1:{receiver.port}/forged"
    sqlite_db.transaction(lambda c: c.execute(insert(_outbox).values(
        alert_id="al_forged", target=forged[:64], workload_id="w2", body="{}",
        created_at=int(START), attempts=0, next_attempt_ms=0)))
    settings = alert_settings((receiver.url, secret), retry_max_s=60)
    clock = Clock(START)
    sender = WebhookSender(sqlite_db, real_vault, settings, metrics=metrics, clock=clock)
    senders.append(sender)

    assert sender.deliver_due() == 0
    clock.advance(61)
    assert sender.deliver_due() == 0  # looked at again, still not posted, not counted twice

    assert receiver.requests == []
    assert [(r["delivered_at"], r["attempts"], r["last_error"]) for r in outbox(sqlite_db)] == [
        (None, 0, NOT_CONFIGURED), (None, 0, NOT_CONFIGURED)]
    assert counted(metrics, "dropped") == 2

    fresh = an_alert("w3")
    queue(sqlite_db, settings, fresh)
    assert sender.deliver_due() == 1
    assert [r.path for r in receiver.requests] == ["/hook"]
    assert receiver.delivered() == [fresh["id"]]


def test_a_redirect_is_a_failure_and_is_never_followed(
        sqlite_db: Database, real_vault: Vault, secret: Secret, receiver: Receiver,
        metrics: Metrics, senders: list[WebhookSender]) -> None:
    settings = alert_settings((receiver.url, secret))
    queue(sqlite_db, settings, an_alert("w1"))
    receiver.redirect = True
    sender = WebhookSender(sqlite_db, real_vault, settings, metrics=metrics, clock=Clock(START))
    senders.append(sender)

    assert sender.deliver_due() == 0

    assert [(r.path, r.status) for r in receiver.requests] == [("/hook", 302)]
    (row,) = outbox(sqlite_db)
    assert (row["delivered_at"], row["attempts"], row["last_error"]) == (None, 1, "http 302")
    assert counted(metrics, "failed") == 1


def test_backoff_doubles_from_one_second_and_is_capped(
        sqlite_db: Database, real_vault: Vault, secret: Secret, receiver: Receiver,
        senders: list[WebhookSender]) -> None:
    settings = alert_settings((receiver.url, secret), retry_max_s=8)
    queue(sqlite_db, settings, an_alert("w1"))
    receiver.fail_next(1_000)
    clock = Clock(START)
    sender = WebhookSender(sqlite_db, real_vault, settings, clock=clock)
    senders.append(sender)

    waits: list[int] = []
    for attempt in range(1, 8):
        sender.deliver_due()
        (row,) = outbox(sqlite_db)
        assert (row["attempts"], len(receiver.requests)) == (attempt, attempt)
        now_ms = int(clock.now * 1000)
        waits.append(row["next_attempt_ms"] - now_ms)
        clock.now = (row["next_attempt_ms"] - 5) / 1000
        sender.deliver_due()  # not yet due: no attempt
        assert len(receiver.requests) == attempt
        clock.now = (row["next_attempt_ms"] + 5) / 1000

    bases = [1, 2, 4, 8, 8, 8, 8]
    assert [backoff_s(n, 8) for n in range(1, 8)] == bases
    for wait_ms, base in zip(waits, bases, strict=True):
        assert base * 1000 <= wait_ms <= base * 1100, waits  # at most 10 % jitter


def test_a_vault_outage_delays_delivery_and_never_drops(
        sqlite_db: Database, real_vault: Vault, secret: Secret, receiver: Receiver,
        senders: list[WebhookSender]) -> None:
    settings = alert_settings((receiver.url, secret))
    alert = an_alert("w1")
    queue(sqlite_db, settings, alert)
    away = Vault(VaultSettings(addr=f"http://127.0.0.1:{free_port()}", timeout_s=1))
    clock = Clock(START)
    during = WebhookSender(sqlite_db, away, settings, clock=clock)
    senders.append(during)

    assert during.deliver_due() == 0
    (row,) = outbox(sqlite_db)
    assert (row["delivered_at"], row["attempts"], row["last_error"]) == (
        None, 1, "VaultUnavailable")
    assert receiver.requests == []  # never posted unsigned

    clock.advance(2)
    after = WebhookSender(sqlite_db, real_vault, settings, clock=clock)
    senders.append(after)
    assert after.deliver_due() == 1
    assert receiver.delivered() == [alert["id"]]


def test_two_senders_on_one_postgresql_database_deliver_each_row_once(
        pg_url: str, real_vault: Vault, secret: Secret, receiver: Receiver,
        senders: list[WebhookSender]) -> None:
    db = Database(make_engine(pg_url))
    try:
        settings = alert_settings((receiver.url, secret))
        workloads = [f"w{i}" for i in range(6)]
        alerts = [an_alert(workloads[i % 6]) for i in range(36)]
        queue(db, settings, *alerts)
        replicas = [Metrics(), Metrics()]
        for m in replicas:
            sender = WebhookSender(db, real_vault, settings, metrics=m)
            senders.append(sender)
        for sender in senders:
            sender.start()
            sender.wake()
        wait_for(lambda: all(r["delivered_at"] is not None for r in outbox(db)),
                 what=lambda: f"{len(receiver.delivered())} of 36 delivered")
        for sender in senders:
            sender.stop()

        assert sorted(receiver.delivered()) == sorted(a["id"] for a in alerts)
        assert len(receiver.requests) == 36  # no row posted twice
        assert sum(counted(m, "delivered") for m in replicas) == 36
        for w in workloads:
            assert receiver.delivered(w) == [a["id"] for a in alerts if a["workload_id"] == w]
    finally:
        db.dispose()


def test_delivered_rows_are_pruned_after_their_retention_and_undelivered_never(
        sqlite_url: str) -> None:
    from sqlalchemy import text

    from broker.monitoring.webhooks import prune_delivered
    from broker.storage.db import Database, make_engine, migrate

    engine = make_engine(sqlite_url)
    migrate(engine)
    db = Database(engine)
    try:
        rows = [(1, 100), (2, 200), (3, None)]
        db.transaction(lambda conn: [conn.execute(text(
            "INSERT INTO alert_outbox (id, alert_id, target, workload_id, body, created_at, "
            "attempts, next_attempt_ms, delivered_at) VALUES (:i, 'al', 't', 'w', '{}', 1, 1, 0, "
            ":d)"), {"i": i, "d": d}) for i, d in rows])
        assert db.transaction(lambda conn: prune_delivered(conn, before=150)) == 1
        left = db.read_transaction(lambda conn: conn.execute(
            text("SELECT id FROM alert_outbox ORDER BY id")).scalars().all())
        assert left == [2, 3]
        assert db.transaction(lambda conn: prune_delivered(conn, before=10_000)) == 1
    finally:
        engine.dispose()
