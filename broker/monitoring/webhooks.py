"""Alert webhooks, delivered at least once from a durable outbox.

An alert is written to ``alert_outbox`` in the transaction that raises it (:func:`enqueue`), one
row per configured webhook that wants its severity, so a crash or restart loses none. A
:class:`WebhookSender` on every replica posts the rows:

* **In order per (webhook, workload).** Only the oldest undelivered row of each pair is
  eligible, so a later alert of a workload waits behind a failing one; other workloads do not.
* **Retried with backoff, never given up** while the webhook is configured: attempt *n* is
  followed by a wait of ``min(retry_max_s, 2**(n-1))`` seconds plus up to 10 % jitter.
* **Claimed before posting.** A conditional UPDATE on the row's ``next_attempt_ms`` as read
  pushes it out by a lease, so two replicas on one database do not normally post the same row.
  A sender that dies mid-post leaves the lease to expire and the row is posted again: receivers
  dedupe on the alert's ``id``.
* **Only to configured URLs.** A row names its webhook by :func:`target_of` (a digest of the
  URL), never by the URL. A row whose target is not in this replica's configuration is never
  posted: it is marked ``last_error = "webhook no longer configured"`` and left undelivered,
  looked at again every ``retry_max_s``. Leaving it (rather than settling it) means a replica
  still on an older configuration during a rolling change cannot lose an alert that a replica
  on the newer one can deliver, and a webhook configured again gets its backlog.
* **Never redirected.** A 3xx answer is a failure like any other non-2xx.

Receivers check the ``x-broker-signature`` header, ``t=<unix seconds>,v1=<hex>``, where the hex
is HMAC-SHA256 under the webhook's secret of ``"<t>.<body>"`` over the raw body bytes::

    from broker.monitoring.webhooks import verify

    if not verify(secret, request.headers["x-broker-signature"], raw_body, now=int(time.time())):
        return 401

(or the same in any language: recompute the HMAC, compare it in constant time, and refuse a
``t`` more than a few minutes from the receiver's clock, which bounds replays).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import Connection, delete, func, insert, select, update

from broker.errors import VaultUnavailable
from broker.metrics import Metrics
from broker.settings.monitoring import SEVERITIES, AlertSettings, WebhookSettings
from broker.storage.db import Database
from broker.storage.models import AlertOutbox
from broker.storage.vault import Vault

log = logging.getLogger("broker.monitoring.webhooks")

_outbox = AlertOutbox.__table__  # type: ignore[attr-defined]

SIGNATURE_HEADER = "x-broker-signature"
NOT_CONFIGURED = "webhook no longer configured"
SECRET_MISSING = "webhook secret missing"

# A claim outlives the slowest post it covers (connect and read may each take ``timeout_s``)
# plus a Vault read, so a live sender's row is not taken over by another replica mid-post.
LEASE_MARGIN_S = 30.0
# A webhook secret rotated in Vault is picked up within this long.
SECRET_TTL_S = 300.0
# The idle sender looks for due rows this often, besides being woken.
POLL_S = 1.0
# Heads read per round, and rounds per pass: a pass follows a workload's chain of alerts
# (each delivery makes the next row the head) but stays short enough to notice ``stop``.
BATCH = 100
MAX_ROUNDS = 50
JITTER = 0.1
_MAX_HEADER = 1024
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def target_of(url: str) -> str:
    """The name rows give a configured webhook: SHA-256 of its URL in hex (64 characters).

    The URL stays in configuration: it may carry a credential in its path or query, and a row
    must never be able to send an alert anywhere configuration does not."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def sign(secret: bytes, body: bytes, t: int) -> str:
    """The ``x-broker-signature`` value for ``body`` sent at unix time ``t``."""
    mac = hmac.new(secret, str(t).encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, *, now: int, tolerance_s: int = 300) -> bool:
    """True when ``header`` signs ``body`` under ``secret`` and its ``t`` is within
    ``tolerance_s`` of ``now``. For receivers; several ``v1`` values are accepted (one may
    match), a malformed header is simply False, and the comparison runs in constant time."""
    if len(header) > _MAX_HEADER:
        return False
    stamp: str | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            if stamp is not None:  # two timestamps: which one was signed is ambiguous
                return False
            stamp = value
        elif key == "v1":
            candidates.append(value)
    if stamp is None or not candidates or not _TIMESTAMP.fullmatch(stamp):
        return False
    t = int(stamp)
    if abs(now - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).rpartition("v1=")[2].encode("ascii")
    matched = False
    for candidate in candidates:
        # No early exit: how many candidates were compared must not depend on which matched.
        matched |= hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
    return matched


def _rank(severity: str) -> int:
    if severity not in SEVERITIES:
        raise ValueError(f"unknown alert severity {severity!r}")
    return SEVERITIES.index(severity)


def _configured(settings: AlertSettings) -> dict[str, WebhookSettings]:
    """Configured webhooks by target. A URL listed twice is one webhook: the first entry's
    secret and threshold apply, so one alert is never posted twice to the same URL."""
    webhooks: dict[str, WebhookSettings] = {}
    for webhook in settings.webhooks:
        webhooks.setdefault(target_of(webhook.url), webhook)
    return webhooks


def enqueue(conn: Connection, settings: AlertSettings, alert: Mapping[str, Any], now: int) -> int:
    """Queue ``alert`` (with ``id``, ``workload_id`` and ``severity``) for every configured
    webhook whose ``min_severity`` it reaches, in the caller's transaction, so the alert and
    its deliveries commit or vanish together. Returns the rows written; each is due at once.

    The body is strict JSON whatever the evidence holds: a non-finite number becomes null and
    any other value JSON lacks becomes its string, rather than failing the alert's transaction
    (which also suspends or throttles the workload)."""
    rank = _rank(str(alert["severity"]))
    body = json.dumps(_finite(dict(alert)), separators=(",", ":"), sort_keys=True,
                      allow_nan=False, default=str)
    rows = [
        {"alert_id": str(alert["id"]), "target": target, "workload_id": str(alert["workload_id"]),
         "body": body, "created_at": now, "attempts": 0, "next_attempt_ms": 0}
        for target, webhook in _configured(settings).items()
        if rank >= _rank(webhook.min_severity)
    ]
    if rows:
        conn.execute(insert(_outbox), rows)
    return len(rows)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def backoff_s(attempts: int, retry_max_s: int) -> float:
    """The wait after the ``attempts``-th failed attempt, jitter excluded."""
    return float(min(retry_max_s, 2 ** min(max(attempts, 1) - 1, 32)))


@dataclass(frozen=True)
class _Head:
    id: int
    target: str
    body: str
    attempts: int
    next_attempt_ms: int
    last_error: str | None


def _due_heads(conn: Connection, now_ms: int) -> list[_Head]:
    o = _outbox.c
    heads = (
        select(func.min(o.id)).where(o.delivered_at.is_(None)).group_by(o.target, o.workload_id)
    )
    rows = conn.execute(
        select(o.id, o.target, o.body, o.attempts, o.next_attempt_ms, o.last_error)
        .where(o.id.in_(heads), o.next_attempt_ms <= now_ms)
        # The longest-waiting first: a row that keeps failing does not starve the others.
        .order_by(o.next_attempt_ms, o.id)
        .limit(BATCH)
    ).all()
    return [_Head(r.id, r.target, r.body, r.attempts, r.next_attempt_ms, r.last_error)
            for r in rows]


def _move(conn: Connection, head: _Head, until_ms: int, **values: Any) -> bool:
    """Set ``next_attempt_ms`` (and ``values``) on ``head`` only if nobody moved it since it
    was read: the claim that keeps two replicas from posting one row at once."""
    o = _outbox.c
    result = conn.execute(
        update(_outbox)
        .where(o.id == head.id, o.delivered_at.is_(None), o.next_attempt_ms == head.next_attempt_ms)
        .values(next_attempt_ms=until_ms, **values)
    )
    return bool(result.rowcount == 1)


def _delivered(conn: Connection, row_id: int, attempts: int, now_s: int) -> None:
    o = _outbox.c
    conn.execute(
        update(_outbox).where(o.id == row_id, o.delivered_at.is_(None))
        .values(delivered_at=now_s, attempts=attempts, last_error=None)
    )


def prune_delivered(conn: Connection, before: int, batch: int = 1000) -> int:
    """Delete up to ``batch`` rows delivered before ``before`` (UNIX seconds): the alert rows
    and the audit keep the record; an undelivered row is never pruned."""
    o = _outbox.c
    doomed = select(o.id).where(o.delivered_at.isnot(None), o.delivered_at < before).limit(batch)
    return int(conn.execute(delete(_outbox).where(o.id.in_(doomed))).rowcount or 0)


class _Undelivered(Exception):
    """One attempt did not deliver; ``reason`` is short and holds nothing secret."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class WebhookSender:
    """Posts due outbox rows to their configured webhooks; see the module's docstring."""

    def __init__(self, db: Database, vault: Vault, settings: AlertSettings, *,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._db = db
        self._vault = vault
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._transport = transport
        self._webhooks = _configured(settings)
        self._secrets: dict[str, tuple[bytes, float]] = {}  # vault path -> (secret, read at)
        self._client: httpx.Client | None = None
        self._pass = threading.Lock()  # one pass at a time, whoever calls it
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the thread ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="broker-webhooks", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """An alert was just enqueued (and committed): look for due rows now."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread (a post in flight finishes or times out) and close the HTTP client.
        Call it also when only :meth:`deliver_due` was used: the client holds connections."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self._settings.timeout_s + LEASE_MARGIN_S)
            self._thread = None
        if self._pass.acquire(timeout=2 * self._settings.timeout_s + LEASE_MARGIN_S):
            try:
                if self._client is not None:
                    self._client.close()
                    self._client = None
            finally:
                self._pass.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            # Cleared before the pass: a wake during it makes the next pass start at once.
            self._wake.clear()
            try:
                self._deliver(interruptible=True)
            except Exception as exc:  # the database is away: the rows wait, the loop goes on
                log.warning("alert webhook pass failed: %s", type(exc).__name__)
            self._wake.wait(POLL_S)

    # --- one pass --------------------------------------------------------------------------

    def deliver_due(self) -> int:
        """Attempt every due row that is the head of its (webhook, workload); returns the rows
        delivered. After a failure, a webhook's other rows wait for the next pass, so a
        webhook that hangs costs one timeout per pass, not one per row."""
        return self._deliver(interruptible=False)

    def _deliver(self, *, interruptible: bool) -> int:
        delivered = 0
        failed: set[str] = set()
        with self._pass:
            for _ in range(MAX_ROUNDS):
                now_ms = int(self._clock() * 1000)
                heads = self._db.read_transaction(functools.partial(_due_heads, now_ms=now_ms))
                progress = 0
                for head in heads:
                    if interruptible and self._stop.is_set():
                        return delivered
                    if head.target in failed:
                        continue
                    outcome = self._attempt(head)
                    if outcome == "delivered":
                        progress += 1
                    elif outcome == "failed":
                        failed.add(head.target)
                delivered += progress
                if progress == 0:
                    break
        return delivered

    def _attempt(self, head: _Head) -> str:
        now_ms = int(self._clock() * 1000)
        webhook = self._webhooks.get(head.target)
        if webhook is None:
            return self._drop(head, now_ms)
        lease_ms = int((2 * self._settings.timeout_s + LEASE_MARGIN_S) * 1000)
        if not self._db.transaction(lambda c: _move(c, head, now_ms + lease_ms)):
            return "taken"  # another replica claimed it, or delivered it, since we read it
        claimed = _Head(head.id, head.target, head.body, head.attempts, now_ms + lease_ms,
                        head.last_error)
        attempts = head.attempts + 1
        try:
            self._post(webhook, head.body.encode("utf-8"))
        except _Undelivered as failure:
            self._reschedule(claimed, attempts, failure.reason)
            return "failed"
        self._db.transaction(lambda c: _delivered(c, head.id, attempts, int(self._clock())))
        self._count("delivered")
        return "delivered"

    def _drop(self, head: _Head, now_ms: int) -> str:
        until = now_ms + self._settings.retry_max_s * 1000
        moved = self._db.transaction(lambda c: _move(c, head, until, last_error=NOT_CONFIGURED))
        if moved and head.last_error != NOT_CONFIGURED:
            log.warning("alert outbox row %d names a webhook that is not configured (%s...): "
                        "not posted", head.id, head.target[:12])
            self._count("dropped")
        return "dropped"

    def _reschedule(self, claimed: _Head, attempts: int, reason: str) -> None:
        wait_s = backoff_s(attempts, self._settings.retry_max_s)
        wait_s += random.uniform(0, wait_s * JITTER)
        until = int(self._clock() * 1000) + int(wait_s * 1000)
        # Only while the claim is still ours: a replica that took over after our lease ran out
        # keeps its own schedule.
        self._db.transaction(lambda c: _move(c, claimed, until, attempts=attempts,
                                             last_error=reason[:128]))
        log.warning("alert webhook %s... row %d not delivered (%s), attempt %d; next in %.0fs",
                    claimed.target[:12], claimed.id, reason, attempts, wait_s)
        self._count("failed")

    def _post(self, webhook: WebhookSettings, body: bytes) -> None:
        secret = self._secret(webhook.secret_vault_path)
        # Signed at the send time, so the receiver's replay window starts now.
        headers = {"content-type": "application/json",
                   SIGNATURE_HEADER: sign(secret, body, int(self._clock()))}
        try:
            with self._http().stream("POST", webhook.url, content=body, headers=headers) as resp:
                # The status is the whole answer: the body is never read, so a receiver cannot
                # make the sender hold a large one.
                status = resp.status_code
        except Exception as exc:  # timeouts, refusals, TLS: by class only, the text may hold the URL
            raise _Undelivered(type(exc).__name__) from None
        if not 200 <= status < 300:
            raise _Undelivered(f"http {status}")

    def _secret(self, path: str) -> bytes:
        now = self._clock()
        cached = self._secrets.get(path)
        if cached is not None and now - cached[1] < SECRET_TTL_S:
            return cached[0]
        try:
            found = self._vault.read(path)
        except VaultUnavailable:
            if cached is not None:  # Vault away: keep signing with the secret we have
                return cached[0]
            raise _Undelivered("VaultUnavailable") from None
        value = found[0].get("secret") if found is not None else None
        if not isinstance(value, str) or not value:
            self._secrets.pop(path, None)
            raise _Undelivered(SECRET_MISSING)
        secret = value.encode("utf-8")
        self._secrets[path] = (secret, now)
        return secret

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(transport=self._transport, follow_redirects=False,
                                        timeout=self._settings.timeout_s)
        return self._client

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.webhook_deliveries.labels(result=result).inc()
