"""The monitor: runs the detectors (:mod:`broker.monitoring.detectors`) on the live stream of
usage events and refusals, and acts on what they find.

The request path only appends an observation to a bounded queue (:meth:`Monitor.observe`, a
few hundred nanoseconds, no lock held against the monitor, no I/O): everything else happens on
the monitor's own thread, so no request waits for it. When the queue is full (the thread far
behind), observations are dropped and counted, never waited for.

On the thread, each observation is completed with what the broker knows of its workload (its
tenant, kind and ``policy.monitoring``, read from the database and cached briefly), the
workload's baselines are loaded from the database the first time it is seen, and the findings
are acted on, in one transaction each:

* an alert row (listed and cleared through the admin API), an audit entry and one webhook
  outbox row per configured webhook (:mod:`broker.monitoring.webhooks`);
* the action of the workload's kind (``monitoring.actions``), or of ``policy.monitoring`` for
  that detector: ``suspend`` through the revocation path (its tokens die on every replica, its
  streams end, its exchanges are refused), ``throttle`` (the open alert cuts its rates), or
  ``alert`` alone. A finding of severity ``info``, or one that rests only on signals anyone
  could send (wrong secrets for a known client id), only alerts: otherwise a stranger could
  suspend an agent by failing to log in as it.

Baselines are written back every ``monitoring.flush_interval_s`` and at stop. With several
replicas each one watches the traffic it serves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from broker.errors import BrokerError, LedgerUnavailable
from broker.identity.identities import ROOT_TENANT_ID, Actor
from broker.identity.policy import MonitoringPolicy, Policy
from broker.metrics import Metrics
from broker.monitoring import alerts, webhooks
from broker.monitoring.detectors import Detectors, Finding, Observation, peer_key
from broker.monitoring.webhooks import WebhookSender
from broker.revocation import actions
from broker.revocation.log import Entry
from broker.settings import Settings
from broker.storage.audit import record
from broker.storage.db import Database
from broker.storage.models import MonitorState, Workload

log = logging.getLogger("broker.monitor")

_state = MonitorState.__table__  # type: ignore[attr-defined]
_workload = Workload.__table__  # type: ignore[attr-defined]

MONITOR_ACTOR = Actor(id="broker:monitor", tenant_id=ROOT_TENANT_ID, roles=frozenset({"org-admin"}))
# How long what the monitor read of a workload (tenant, kind, policy.monitoring) is trusted.
INFO_CACHE_S = 30.0
INFO_CACHE_MAX = 100_000
# Observations handled per wake-up before the thread looks at its other duties.
BATCH = 1000
# How often the thread takes what was queued: the most a detection waits for the thread, and
# few enough wake-ups that the thread never competes with requests for each one.
DRAIN_S = 0.05
# Findings kept while the database does not answer (beyond, the oldest go).
UNACTED_MAX = 10_000


def fingerprint(key: bytes, body: Mapping[str, Any]) -> str:
    """The keyed digest of a request's model, messages and parameters: the same request gives
    the same digest whatever the order of its keys. Only the digest is kept, never the prompt;
    keyed, so that whoever reads alerts or the database cannot confirm a guessed prompt."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           default=str)
    return hmac.new(key, canonical.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def fingerprint_key(pepper: bytes) -> bytes:
    """The fingerprints' key, derived from the broker's pepper (held in Vault) for this use
    alone."""
    return hmac.new(pepper, b"broker:monitor:fingerprint", hashlib.sha256).digest()


@dataclass(frozen=True)
class _Workload:
    tenant_id: str
    kind: str
    monitoring: MonitoringPolicy | None
    read_at: float


class Monitor:
    def __init__(self, db: Database, settings: Settings, metrics: Metrics, *,
                 applied: Callable[[Entry | None], None] = lambda _entry: None,
                 sender: WebhookSender | None = None,
                 clock: Callable[[], float] = time.time,
                 key: bytes = b"") -> None:
        self.db = db
        self.settings = settings
        self.metrics = metrics
        self.detectors = Detectors(settings.monitoring)
        self._applied = applied
        self._sender = sender
        self._key = key
        self._clock = clock
        self._queue: deque[tuple[Observation, Mapping[str, Any] | None]] = deque()
        self._max = settings.monitoring.queue_max
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one consumer at a time: the thread, or a test's drain
        self._thread: threading.Thread | None = None
        self._workloads: dict[str, _Workload] = {}
        # Findings made while the database was away, acted on first at the next pass.
        self._unacted: deque[tuple[Observation, _Workload, Finding]] = deque(maxlen=UNACTED_MAX)
        self._flushed = time.monotonic()

    # --- the request path: append and return -------------------------------------------

    def observe(self, obs: Observation, body: Mapping[str, Any] | None = None) -> None:
        """Queue an observation (with the request body its fingerprint is made of, hashed on
        the monitor's thread). Never blocks."""
        if len(self._queue) >= self._max:
            self.metrics.monitor_dropped.inc()
            return
        # No wake-up call: waking the thread for every observation costs the request path a
        # thread switch and a turn of the GIL each; the thread looks every DRAIN_S instead.
        self._queue.append((obs, body))

    def pending(self) -> int:
        """Observations waiting for the monitor's thread."""
        return len(self._queue)

    def refusal(self, workload_id: str, reason: str, *, authenticated: bool,
                tenant_id: str = "", kind: str = "", client_ip: str | None = None) -> None:
        self.observe(Observation(ts=self._clock(), workload_id=workload_id, tenant_id=tenant_id,
                                 kind=kind, signal="refusal", refusal=reason,
                                 authenticated=authenticated, client_ip=client_ip))

    # --- the monitor's thread -----------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="broker-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with contextlib.suppress(Exception):
            self.drain()
            self.flush()

    def _run(self) -> None:
        interval = self.settings.monitoring.flush_interval_s
        while not self._stop.is_set():
            self._wake.wait(timeout=DRAIN_S)
            try:
                self.drain()
                if time.monotonic() - self._flushed >= interval:
                    self.flush()
            except Exception as exc:  # the database may be down a while: keep watching
                log.warning("the monitor failed a pass: %s", type(exc).__name__)
                self._stop.wait(1.0)

    def drain(self) -> int:
        """Handle every queued observation; returns how many. While the database does not
        answer, nothing is lost: the findings not yet acted on, and the observations not yet
        read, wait in order for the next pass (:class:`LedgerUnavailable` is raised)."""
        handled = 0
        with self._lock:
            while self._unacted:
                obs, workload, finding = self._unacted[0]
                try:
                    self._act(obs, workload, finding)
                except LedgerUnavailable:
                    raise
                except Exception as exc:  # a bug, not an outage: retrying would not help
                    log.error("acting on a %s finding failed: %s", finding.detector,
                              type(exc).__name__)
                self._unacted.popleft()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                for n, (obs, body) in enumerate(batch):
                    try:
                        self._handle(obs, body)
                    except LedgerUnavailable:
                        self._queue.extendleft(reversed(batch[n:]))
                        raise
                handled += len(batch)
        return handled

    def flush(self) -> None:
        """Write the baselines changed since the last flush."""
        with self._lock:
            dirty = self.detectors.dirty()
            self._flushed = time.monotonic()
        if not dirty:
            return
        now = int(self._clock())

        def txn(conn: Connection) -> None:
            ins: Any = pg_insert(_state) if conn.dialect.name == "postgresql" else sqlite_insert(_state)
            for key in sorted(dirty):
                stmt = ins.values(workload_id=key, state=dirty[key], updated_at=now)
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=["workload_id"],
                    set_={"state": stmt.excluded.state, "updated_at": stmt.excluded.updated_at}))

        self.db.transaction(txn)

    # --- one observation ----------------------------------------------------------------

    def _handle(self, obs: Observation, body: Mapping[str, Any] | None) -> None:
        workload = self._workload(obs.workload_id)
        if workload is None:
            return  # a client id that names no workload: nobody to watch
        cidrs = tuple(workload.monitoring.cidrs) if workload.monitoring is not None else ()
        obs = dataclasses.replace(
            obs, tenant_id=workload.tenant_id, kind=workload.kind, cidrs=cidrs,
            fingerprint=fingerprint(self._key, body) if body is not None else obs.fingerprint)
        self._load(obs.workload_id, peer_key(workload.tenant_id, workload.kind))
        for finding in self.detectors.observe(obs):
            if self._unacted:  # the database was away: after those, in order
                self._unacted.append((obs, workload, finding))
                continue
            try:
                self._act(obs, workload, finding)
            except LedgerUnavailable:
                log.warning("the database did not answer; the %s finding waits",
                            finding.detector)
                self._unacted.append((obs, workload, finding))
            except Exception as exc:
                log.error("acting on a %s finding failed: %s", finding.detector,
                          type(exc).__name__)

    def forget_workload(self, workload_id: str) -> None:
        """What was read of a workload is stale (its policy or kind changed, it was suspended
        or resumed): read it again at its next observation."""
        self._workloads.pop(workload_id, None)

    def _workload(self, workload_id: str) -> _Workload | None:
        now = time.monotonic()
        hit = self._workloads.get(workload_id)
        if hit is not None and now - hit.read_at < INFO_CACHE_S:
            return hit
        w = _workload.c
        row = self.db.read_transaction(lambda conn: conn.execute(
            select(w.tenant_id, w.kind, w.policy).where(w.id == workload_id)).first())
        if row is None:
            self._workloads.pop(workload_id, None)
            return None
        try:
            monitoring = Policy.model_validate(row[2]).monitoring
        except ValidationError:
            monitoring = None
        if len(self._workloads) >= INFO_CACHE_MAX:
            self._workloads.clear()
        found = self._workloads[workload_id] = _Workload(str(row[0]), str(row[1]), monitoring, now)
        return found

    def _load(self, *keys: str) -> None:
        missing = [k for k in keys if not self.detectors.loaded(k)]
        if not missing:
            return
        rows = self.db.read_transaction(lambda conn: conn.execute(
            select(_state.c.workload_id, _state.c.state).where(_state.c.workload_id.in_(missing))
        ).all())
        found = {str(key): state for key, state in rows}
        for key in missing:
            state = found.get(key)
            if isinstance(state, str):  # SQLite hands JSON back as text through some paths
                with contextlib.suppress(ValueError):
                    state = json.loads(state)
            self.detectors.load(key, state if isinstance(state, Mapping) else {})

    def action_for(self, workload: _Workload, finding: Finding) -> str:
        """What a finding does: ``off`` (nothing), ``suspend``, ``throttle`` or ``alert``."""
        chosen = getattr(workload.monitoring, finding.detector, None) if workload.monitoring else None
        action = str(chosen or self.settings.monitoring.actions.get(workload.kind, "alert"))
        if action in ("suspend", "throttle") and (finding.severity == "info" or not finding.attributable):
            return "alert"
        return action

    def _act(self, obs: Observation, workload: _Workload, finding: Finding) -> None:
        action = self.action_for(workload, finding)
        if action == "off":
            return
        now = int(self._clock())

        def txn(conn: Connection) -> tuple[alerts.AlertRecord, Entry | None]:
            entry = None
            done = action
            if action == "suspend":
                done = "alert"  # unless the suspension below is made by this alert
                with contextlib.suppress(BrokerError):  # gone, or an admin's own identity
                    _view, entry = actions.suspend(
                        conn, MONITOR_ACTOR, "workload", obs.workload_id,
                        f"monitor: {finding.summary}"[:512], now)
                    if entry is not None:
                        done = "suspend"
            alert = alerts.create(
                conn, tenant_id=workload.tenant_id, workload_id=obs.workload_id,
                detector=finding.detector, severity=finding.severity, action=done,
                summary=finding.summary, evidence=dict(finding.evidence), now=now)
            record(conn, MONITOR_ACTOR.id, "alert.raise", alert.id,
                   {"workload_id": obs.workload_id, "tenant_id": workload.tenant_id,
                    "detector": finding.detector, "severity": finding.severity,
                    "action": done, "summary": finding.summary}, now)
            webhooks.enqueue(conn, self.settings.alerts, alerts.view(alert), now)
            return alert, entry

        alert, entry = self.db.transaction(txn)
        self._applied(entry)
        self.metrics.alerts.labels(finding.detector, alert.action).inc()
        if self._sender is not None:
            self._sender.wake()
        log.warning("alert %s: %s (%s) on workload %s: %s", alert.id, finding.detector,
                    alert.action, obs.workload_id, finding.summary)
