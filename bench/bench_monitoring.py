"""Monitoring benchmark: how fast the monitor contains a looping agent, how quiet it stays on a
day of honest traffic, and what it costs the gateway.

    python -m bench.bench_monitoring [--runs 5] [--rate 20] [--workloads 500] [--hours 24]
                                     [--rounds 4] [--duration 8] [--concurrency 16]

1. Time to contain. A real ``broker serve`` (SQLite WAL, an OpenBao dev server, the in-process
   ``mock`` provider, monitoring enabled with the default settings: ``loop`` fires at 20
   identical fingerprints within 60 s, and an agent's finding suspends it). For each run a fresh
   ``agent`` workload gets one token, then one client sends the identical chat request at
   ``--rate`` requests a second (paced on a fixed schedule, one keep-alive connection, the next
   request never before the previous answer) until a call is refused with 401. A thread in this
   process polls the broker's database file every 10 ms for the agent's alert row (written in
   one transaction with the ``alert.raise`` and ``workload.suspend`` audit entries and the
   revocation-log entry). Reported per run: seconds from sending the first request to the
   alert row being visible and to receiving the first 401, the calls answered 200 before it,
   and the micro-dollars its usage events cost. The agent's policy lifts the agent defaults'
   60 rpm rate limit (``harness.bench_policy``), so the loop detector, not the rate limiter or
   the failures detector, is what stops it.

2. False positives. ``tests.traffic.steady_traffic`` (500 workloads of mixed kinds, 24
   simulated hours, a diurnal curve, Poisson arrivals, each workload's own models and network,
   the odd retry and refusal) replayed in this process through the production
   :class:`~broker.monitoring.detectors.Detectors` with default ``MonitoringSettings``. The
   detectors have no clock: each observation carries its simulated ``ts``, so a day replays in
   seconds. The observations are generated first (timed apart), then replayed: wall time and
   CPU time of the replay alone, per observation, and every finding by detector and severity.

3. Overhead. Two ``broker serve`` processes, identical but for ``[monitoring] enabled =
   false`` in one's configuration (the TOML form of ``BROKER_MONITORING_ENABLED=false``),
   each with an ``agent`` load workload on default monitoring. ``wrk`` (1 thread, keep-alive,
   ``--concurrency`` connections) sends non-stream ``/v1/chat/completions`` to the ``mock``
   provider in segments that alternate between the brokers in ABBA order (on, off, off, on,
   ...), so a drift in other people's load on this shared machine hits both sides. A Lua
   ``request()`` numbers the prompt of every request (with a tag fresh for each wrk run), so
   every call has its own fingerprint: the detectors run in full on honest-looking traffic and
   the loop detector has nothing to find (``policy.monitoring = {"loop": "off"}`` would only
   skip the action, and identical requests are not the traffic being costed). Afterwards the
   load workload's alerts are listed, the monitor's dropped-observation counter is read, and
   the monitored broker's ``monitor_state`` must hold the load workload's baseline (the proof
   its detectors ran) while the other broker's holds none.

Measurements, not tests: nothing is asserted beyond the setup working.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Connection, func, select

from bench import harness
from bench.harness import BrokerUnderTest, Identity, Measurement, Target
from broker.devvault import DevVault
from broker.monitoring.detectors import Detectors, Finding, Observation
from broker.settings.monitoring import MonitoringSettings
from broker.storage.db import Database, make_engine
from broker.storage.models import Alert, AuditEvent, MonitorState, UsageEvent
from tests.traffic import replay, steady_traffic

RESULTS_FILE = Path(__file__).resolve().parent / "RESULTS-monitoring.md"
START, END = "<!-- bench_monitoring:start -->", "<!-- bench_monitoring:end -->"
MODEL = harness.MOCK_MODEL
MOCK_TOML = harness.MOCK_TOML
MONITORING_OFF_TOML = """
[monitoring]
enabled = false
"""
PROMPT = "Say something short about benchmarks."
COUNTER = "@N@"  # where the Lua request() puts the request's number
TARGET_CONTAIN_S = 3.0
TARGET_FINDINGS = 0
TARGET_RATIO = 0.95
POLL_S = 0.01  # the alert watcher's period
CONTAIN_LIMIT_S = 15.0  # an agent not refused by then is reported as not contained

_alert = Alert.__table__  # type: ignore[attr-defined]
_audit = AuditEvent.__table__  # type: ignore[attr-defined]
_usage = UsageEvent.__table__  # type: ignore[attr-defined]
_state = MonitorState.__table__  # type: ignore[attr-defined]


def chat_body(content: str) -> str:
    return json.dumps({"model": MODEL, "max_tokens": 16,
                       "messages": [{"role": "user", "content": content}]})


def _headers(token: str) -> dict[str, str]:
    return {"content-type": "application/json", "authorization": f"Bearer {token}"}


def _open_db(path: Path) -> Database:
    """The broker's SQLite file, read from this process (WAL: beside the broker's writer)."""
    return Database(make_engine(f"sqlite:///{path}", pool_size=2))


# --- 1. time to contain a looping agent ----------------------------------------------------


class AlertWatch:
    """Polls the broker's database for a workload's first alert and stamps (perf_counter) when
    it became visible."""

    def __init__(self, db: Database, workload_id: str):
        self._db = db
        self._workload_id = workload_id
        self.seen_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-alert-watch", daemon=True)

    def __enter__(self) -> AlertWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def wait(self, limit_s: float) -> None:
        self._thread.join(timeout=limit_s)

    def _run(self) -> None:
        query = select(_alert.c.id).where(_alert.c.workload_id == self._workload_id).limit(1)
        while not self._stop.is_set():
            found = self._db.read_transaction(lambda conn: conn.execute(query).first())
            if found is not None:
                self.seen_at = time.perf_counter()
                return
            self._stop.wait(POLL_S)


@dataclass
class Containment:
    first_401_s: float | None  # first request sent -> first 401 received
    alert_seen_s: float | None  # first request sent -> the alert row visible (polled)
    sent: int  # requests sent, the refused one included
    ok: int  # answered 200
    ok_after_alert: int  # answered 200 after the alert row was visible
    monitor_s: float | None  # the answer of the call completing the loop -> the alert visible
    other: dict[str, int]  # other answers, by status and error code
    spent_micros: int  # the agent's usage events
    detector: str | None
    action: str | None
    count: int | None  # the fingerprint count the finding reports
    audit: tuple[str, ...]  # audit actions of the monitor on this agent, in order
    ts_lag_s: float | None  # the alert row's (whole-second) ts minus the wall time at the start


def _agent_record(conn: Connection, workload_id: str) -> tuple[Any, list[str], int]:
    alert = conn.execute(select(_alert.c.id, _alert.c.ts, _alert.c.detector, _alert.c.action,
                                _alert.c.evidence)
                         .where(_alert.c.workload_id == workload_id)
                         .order_by(_alert.c.ts)).first()
    targets = [workload_id] if alert is None else [workload_id, alert.id]
    audit = conn.execute(select(_audit.c.action).where(
        _audit.c.actor == "broker:monitor", _audit.c.target.in_(targets)).order_by(_audit.c.id)).all()
    actions = [str(a[0]) for a in audit]
    spent = conn.execute(select(func.coalesce(func.sum(_usage.c.cost_micros), 0))
                         .where(_usage.c.workload_id == workload_id)).scalar()
    return alert, actions, int(spent or 0)


def _error_code(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return "?"
    if not isinstance(data, dict):
        return "?"
    error = data.get("error")
    code = error.get("code") or error.get("type") if isinstance(error, dict) else error
    return str(code or "?")


def contain_once(broker: BrokerUnderTest, db: Database, tenant: str, rate: float) -> Containment:
    agent = broker.create_workload(tenant, "agent",
                                   harness.bench_policy([MODEL], 10**12, acted_on=True))
    token = broker.token(agent.client_id, agent.client_secret)
    body = chat_body(PROMPT)
    every = 1.0 / rate
    sent = ok = 0
    other: Counter[str] = Counter()
    answered: list[tuple[float, int]] = []  # (received, status)
    first_401: float | None = None
    with httpx.Client(base_url=broker.url, headers=_headers(token), timeout=30) as client, \
            AlertWatch(db, agent.workload_id) as watch:
        wall0 = time.time()
        t0 = time.perf_counter()
        while True:
            due = t0 + sent * every
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            resp = client.post("/v1/chat/completions", content=body)
            at = time.perf_counter()
            status = resp.status_code
            sent += 1
            answered.append((at, status))
            if status == 401:
                first_401 = at - t0
                break
            if status == 200:
                ok += 1
            else:
                other[f"{status} {_error_code(resp)}"] += 1
            if at - t0 > CONTAIN_LIMIT_S:
                break
        watch.wait(5.0)
        seen = watch.seen_at
    alert_seen = None if seen is None else seen - t0
    ok_after = 0 if seen is None else sum(1 for at, s in answered if s == 200 and at > seen)
    threshold = MonitoringSettings().loop.threshold
    monitor_s = None
    if seen is not None and len(answered) >= threshold:
        monitor_s = seen - answered[threshold - 1][0]
    alert, audit, spent = db.read_transaction(lambda conn: _agent_record(conn, agent.workload_id))
    detector = action = None
    count: int | None = None
    lag: float | None = None
    if alert is not None:
        evidence = alert.evidence if isinstance(alert.evidence, dict) else json.loads(alert.evidence)
        detector, action, count = str(alert.detector), str(alert.action), evidence.get("count")
        lag = int(alert.ts) - wall0
    return Containment(first_401, alert_seen, sent, ok, ok_after, monitor_s, dict(other), spent,
                       detector, action, count, tuple(audit), lag)


def measure_containment(broker: BrokerUnderTest, runs: int, rate: float) -> list[Containment]:
    db = _open_db(broker.db_path)
    try:
        tenant = broker.create_tenant()
        out = []
        for i in range(runs):
            c = contain_once(broker, db, tenant, rate)
            out.append(c)
            print(f"  run {i + 1}: alert visible {_s(c.alert_seen_s)} s ({_ms(c.monitor_s)} ms after "
                  f"the loop's last call answered), first 401 {_s(c.first_401_s)} s,"
                  f" {c.ok} calls answered 200 ({c.ok_after_alert} after the alert), "
                  f"{c.spent_micros:,} micro-$; {c.detector}/{c.action} at count {c.count}"
                  f"{'' if not c.other else f', other statuses {c.other}'}", flush=True)
            time.sleep(0.5)
        return out
    finally:
        db.engine.dispose()


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:+.0f}"


# --- 2. false positives on a steady day ----------------------------------------------------


@dataclass
class Replay:
    workloads: int
    hours: float
    seed: int
    observations: int
    usage: int
    refusals: int
    distinct: int
    generate_s: float
    wall_s: float
    cpu_s: float
    findings: list[tuple[Observation, Finding]]


def measure_false_positives(workloads: int, hours: float, seed: int) -> Replay:
    t0 = time.perf_counter()
    observations = list(steady_traffic(workloads, hours, seed))
    generate_s = time.perf_counter() - t0
    detectors = Detectors(MonitoringSettings())
    c0, w0 = time.process_time(), time.perf_counter()
    findings = replay(detectors, observations)
    wall_s, cpu_s = time.perf_counter() - w0, time.process_time() - c0
    usage = sum(1 for o in observations if o.signal == "usage")
    return Replay(workloads, hours, seed, len(observations), usage, len(observations) - usage,
                  len({o.workload_id for o in observations}), generate_s, wall_s, cpu_s, findings)


# --- 3. gateway throughput with monitoring on and off ---------------------------------------


class NumberedTarget(Target):
    """A target whose prompt carries the request's number (``COUNTER`` in ``body``), after a tag
    fresh for each wrk run: no two requests of the benchmark have the same body."""

    def lua(self) -> str:
        head, _, tail = self.body.partition(COUNTER)
        head += secrets.token_hex(4) + "-"
        return super().lua() + f"""
local head, tail, n = {json.dumps(head)}, {json.dumps(tail)}, 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, head .. n .. tail)
end
"""


@dataclass
class Side:
    name: str  # "monitoring on" | "monitoring off"
    broker: BrokerUnderTest
    identity: Identity | None = None
    segments: list[Measurement] = field(default_factory=list)

    def target(self) -> NumberedTarget:
        assert self.identity is not None
        # A fresh token per segment: no run of this benchmark outlives a token.
        token = self.broker.token(self.identity.client_id, self.identity.client_secret)
        body = chat_body(f"{PROMPT} (request {COUNTER})")
        return NumberedTarget(f"chat non-stream, {self.name}", self.broker.url + "/v1/chat/completions",
                              "POST", body, tuple(_headers(token).items()), (self.broker.pid,))

    def check(self) -> None:
        target = self.target()
        body = target.body.replace(COUNTER, "check")
        resp = httpx.post(target.url, content=body, headers=dict(target.headers), timeout=30)
        if resp.status_code != 200 or '"usage"' not in resp.text:
            raise RuntimeError(f"{self.name}: {resp.status_code} {resp.text[:300]}")

    def pooled(self) -> tuple[float, float]:
        """(req/s, req per server CPU-s) over every segment."""
        requests = sum(m.requests for m in self.segments)
        seconds = sum(m.duration_s for m in self.segments)
        cpu = sum(m.server_cpu * m.duration_s for m in self.segments)
        return requests / seconds, (requests / cpu if cpu else 0.0)


@dataclass
class Overhead:
    on: Side
    off: Side
    order: list[Side]  # the segments, in the order run
    alerts: list[tuple[str, str, str, str]]  # the load workload's: (detector, severity, action, summary)
    dropped: float | None  # broker_monitor_dropped_total on the monitored broker
    baseline_rows: dict[str, int]  # monitor_state rows for the load workload, by side
    state_rows_off: int  # every monitor_state row of the broker without monitoring


def _dropped(broker: BrokerUnderTest) -> float | None:
    text = httpx.get(broker.url + "/metrics", timeout=30).text
    m = re.search(r"^broker_monitor_dropped_total\s+(\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def measure_overhead(on: Side, off: Side, args: argparse.Namespace, work: Path) -> Overhead:
    for side in (on, off):
        # Acted on, as deployed: its varied prompts must raise no alert (checked after).
        side.identity = side.broker.create_workload(
            side.broker.create_tenant(), "agent",
            harness.bench_policy([MODEL], 10**12, acted_on=True))
        side.check()
    order: list[Side] = []
    for r in range(args.rounds):
        pair = (on, off) if r % 2 == 0 else (off, on)
        for side in pair:
            side.segments.append(harness.measure(
                side.target(), args.concurrency, warmup_s=args.warmup, duration_s=args.duration,
                workdir=work, quiet_wait_s=args.quiet_wait))
            order.append(side)
    return Overhead(on, off, order, [], _dropped(on.broker), {}, 0)


def _alerts_of(conn: Connection, workload_id: str) -> list[tuple[str, str, str, str]]:
    rows = conn.execute(select(_alert.c.detector, _alert.c.severity, _alert.c.action,
                               _alert.c.summary).where(_alert.c.workload_id == workload_id)).all()
    return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]


def _state_rows(conn: Connection, workload_id: str | None) -> int:
    query = select(func.count()).select_from(_state)
    if workload_id is not None:
        query = query.where(_state.c.workload_id == workload_id)
    return int(conn.execute(query).scalar() or 0)


def overhead_checks(result: Overhead) -> None:
    """After both brokers stopped (the monitor drains its queue and flushes at stop): the load
    workload's alerts, and the baselines each broker wrote."""
    for side in (result.on, result.off):
        assert side.identity is not None
        wid = side.identity.workload_id
        db = _open_db(side.broker.db_path)
        try:
            if side is result.on:
                result.alerts = db.read_transaction(functools.partial(_alerts_of, workload_id=wid))
            result.baseline_rows[side.name] = db.read_transaction(
                functools.partial(_state_rows, workload_id=wid))
            if side is result.off:
                result.state_rows_off = db.read_transaction(
                    functools.partial(_state_rows, workload_id=None))
        finally:
            db.engine.dispose()


# --- report --------------------------------------------------------------------------------


def _spread(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "—"
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def _verdict(ok: bool) -> str:
    return "**MET**" if ok else "**NOT MET**"


@dataclass
class Summary:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, measure: str, result: str, target: str = "", verdict: str = "") -> None:
        self.rows.append((measure, result, target, verdict))

    def text(self) -> str:
        return harness.table(self.rows, ["measure", "result", "target", "verdict"])


def containment_text(runs: list[Containment], args: argparse.Namespace, summary: Summary) -> str:
    rows = []
    for i, c in enumerate(runs):
        finding = f"{c.detector} → {c.action} (count {c.count})" if c.detector else "none"
        rows.append((str(i + 1), _s(c.alert_seen_s), _ms(c.monitor_s), _s(c.first_401_s),
                     str(c.sent), str(c.ok),
                     str(c.ok_after_alert), f"{c.spent_micros:,}", finding,
                     ", ".join(c.audit) or "none",
                     ", ".join(f"{k}: {v}" for k, v in sorted(c.other.items()))))
    table = harness.table(rows, ["run", "alert visible s", "after the loop's last 200, ms",
                                 "first 401 s", "requests sent",
                                 "answered 200", "200 after alert visible", "spent µ$", "finding",
                                 "monitor's audit entries", "other statuses"])
    contained = [c.first_401_s for c in runs if c.first_401_s is not None]
    seen = [c.alert_seen_s for c in runs if c.alert_seen_s is not None]
    ok = len(contained) == len(runs) and max(contained) <= TARGET_CONTAIN_S
    through = [float(c.ok) for c in runs]
    spent = [float(c.spent_micros) for c in runs]
    lags = [c.ts_lag_s for c in runs if c.ts_lag_s is not None]
    monitor = [c.monitor_s * 1000 for c in runs if c.monitor_s is not None]
    threshold = MonitoringSettings().loop.threshold
    summary.add(f"1. time to contain a looping agent at {args.rate:g} req/s: first request → "
                "first 401, s (min / median / max)", _spread(contained, ".2f"),
                f"≤ {TARGET_CONTAIN_S:g} s", _verdict(ok))
    summary.add("1. … first request → alert row + `workload.suspend` audit entry visible, s",
                _spread(seen, ".2f"))
    summary.add(f"1. … the answer of the {threshold}th identical call (the loop's threshold) → "
                "alert visible, ms", _spread(monitor, "+.0f"))
    summary.add("1. … calls answered 200 before the suspension", _spread(through, ".0f"))
    summary.add("1. … micro-dollars spent before the suspension", _spread(spent, ",.0f"))
    not_contained = len(runs) - len(contained)
    refused_otherwise = sum(sum(c.other.values()) for c in runs)
    race = ""
    if refused_otherwise:
        race = (f"\n{refused_otherwise} call(s) were refused otherwise than with 401 before the "
                "first 401 (`other statuses`: status and error code). `429 insufficient_quota` "
                "there is a call that reached the gateway after the suspension had committed "
                "(returning its token's slice) but before the monitor had applied the entry to "
                "this replica's denylist: refused all the same, with another answer.\n")
    return f"""### 1. Time to contain a looping agent

Method: `broker serve` (one uvicorn worker, SQLite WAL), provider `mock` (in-process),
`{MODEL}` priced as in `broker dev`, monitoring on with the default settings (`loop`:
{MonitoringSettings().loop.threshold} identical fingerprints within
{MonitoringSettings().loop.window_s} s; an agent's finding suspends it). {len(runs)} runs, each
with a fresh `agent` workload (policy: `harness.bench_policy`, whose rate limits are far above
{args.rate:g} req/s, so the loop detector is what stops it) and one token. One client sends the
identical non-stream chat request (`max_tokens` 16) at {args.rate:g} req/s, paced on a fixed
schedule over one keep-alive connection, until a call is answered 401. A thread polls the
broker's database every {POLL_S * 1000:.0f} ms for the agent's alert row, which the monitor
writes in one transaction with the suspension (`workload.suspend` and `alert.raise` audit
entries, revocation-log entry). Times run from sending the first request, except the monitor's
own latency: from the answer of the {threshold}th identical call (the one that completes the loop)
to the alert row being visible (negative: the monitor had acted before the client read its
answer; the poll adds up to {POLL_S * 1000:.0f} ms). At {args.rate:g} req/s the {threshold}th
call is sent {(threshold - 1) / args.rate:.2f} s after the first: the floor of the time to
contain at this rate. `spent µ$` is the sum of the agent's usage events' `cost_micros`. The
alert row's own `ts` (whole seconds, truncated) minus the wall clock at the first request:
{_spread(lags, "+.1f")} s (min / median / max), consistent with the polled times.
Not contained within {CONTAIN_LIMIT_S:g} s: {not_contained}.
{race}
**First request → first 401: {_spread(contained, ".2f")} s** (min / median / max, target
≤ {TARGET_CONTAIN_S:g} s: {_verdict(ok)}); alert row visible {_spread(seen, ".2f")} s,
{_spread(monitor, "+.0f")} ms after the loop's last call was answered;
{_spread(through, ".0f")} calls answered 200; {_spread(spent, ",.0f")} micro-dollars spent.

{table}
"""


def replay_text(rep: Replay, summary: Summary) -> str:
    by_detector = Counter(f.detector for _, f in rep.findings)
    by_severity = Counter(f.severity for _, f in rep.findings)
    detectors = ("loop", "failures", "velocity", "new_model", "origin")
    det = ", ".join(f"{d} {by_detector.get(d, 0)}" for d in detectors)
    per_obs_us = rep.wall_s / rep.observations * 1e6 if rep.observations else 0.0
    cpu_us = rep.cpu_s / rep.observations * 1e6 if rep.observations else 0.0
    total = len(rep.findings)
    summary.add(f"2. false positives, {rep.workloads} workloads, {rep.hours:g} simulated h "
                f"({rep.observations:,} observations), findings by detector", f"{total} ({det})",
                str(TARGET_FINDINGS), _verdict(total <= TARGET_FINDINGS))
    summary.add("2. … replay wall time; per observation (wall / CPU)",
                f"{rep.wall_s:.2f} s; {per_obs_us:.1f} / {cpu_us:.1f} µs")
    examples = ""
    if rep.findings:
        shown = [(obs.workload_id, obs.kind, f.detector, f.severity, f.summary)
                 for obs, f in rep.findings[:10]]
        examples = ("\nThe first findings (at most 10):\n\n"
                    + harness.table(shown, ["workload", "kind", "detector", "severity", "summary"])
                    + "\n")
    rows = [(d, str(by_detector.get(d, 0))) for d in detectors]
    return f"""### 2. False positives on a steady day of honest traffic

Method: `tests.traffic.steady_traffic({rep.workloads}, {rep.hours:g}, seed={rep.seed})`:
{rep.distinct} workloads of mixed kinds seen, {rep.observations:,} observations
({rep.usage:,} settled calls, {rep.refusals:,} refusals) over {rep.hours:g} simulated hours,
generated in {rep.generate_s:.2f} s, then replayed in this process through the production
`Detectors` with default `MonitoringSettings()`. The detectors take no clock: each observation
carries its simulated `ts`. Replay alone: {rep.wall_s:.2f} s wall, {rep.cpu_s:.2f} s CPU, so
**{per_obs_us:.1f} µs per observation** ({cpu_us:.1f} µs CPU) on one core of this shared
machine.

**Findings: {total}** (target {TARGET_FINDINGS}: {_verdict(total <= TARGET_FINDINGS)}); by
severity: {dict(by_severity) or "none"}.

{harness.table(rows, ["detector", "findings"])}
{examples}"""


def overhead_text(result: Overhead, args: argparse.Namespace, summary: Summary) -> str:
    on, off = result.on, result.off
    rows = []
    for i, side in enumerate(result.order):
        m = side.segments[[s for s in result.order[: i + 1]].count(side) - 1]
        rows.append((str(i + 1), side.name, f"{m.rps:,.0f}", f"{m.per_cpu_s:,.0f}",
                     f"{m.p50_ms:.1f}", f"{m.p99_ms:.1f}", str(m.errors), m.server_cpu_text,
                     f"{m.wrk_cpu:.2f}", f"{m.other_cpu:.2f}"))
    seg_table = harness.table(rows, ["#", "segment", "req/s", "req per server CPU-s", "p50 ms",
                                     "p99 ms", "errors", "CPU server", "CPU wrk", "CPU other"])
    on_rps, on_cpu = on.pooled()
    off_rps, off_cpu = off.pooled()
    ratio = on_rps / off_rps
    cpu_ratio = on_cpu / off_cpu if off_cpu else 0.0
    pairs = [a.rps / b.rps for a, b in zip(on.segments, off.segments, strict=True)]
    pooled = harness.table([
        (on.name, str(len(on.segments)), f"{on_rps:,.0f}", f"{on_cpu:,.0f}"),
        (off.name, str(len(off.segments)), f"{off_rps:,.0f}", f"{off_cpu:,.0f}"),
        ("on ÷ off", "", f"{ratio:.3f}", f"{cpu_ratio:.3f}"),
    ], ["broker", "segments", "req/s (pooled)", "req per server CPU-s (pooled)"])
    errors = sum(m.errors for s in (on, off) for m in s.segments)
    alerts = ("none" if not result.alerts else
              "; ".join(f"{d} ({sev}, {act}): {text}" for d, sev, act, text in result.alerts))
    dropped = "not found in /metrics" if result.dropped is None else f"{result.dropped:.0f}"
    summary.add(f"3. gateway throughput, monitoring on ÷ off (c={args.concurrency}, pooled req/s)",
                f"{ratio:.1%} ({on_rps:,.0f} vs {off_rps:,.0f} req/s)",
                f"≥ {TARGET_RATIO:.0%}", _verdict(ratio >= TARGET_RATIO))
    summary.add("3. … per round (min / median / max); per server CPU-second",
                f"{_spread(pairs, '.3f')}; {cpu_ratio:.3f}")
    summary.add("3. … alerts on the load workload; observations dropped; wrk errors",
                f"{len(result.alerts)}; {dropped}; {errors}", "0; 0; 0",
                _verdict(not result.alerts and not result.dropped and not errors))
    return f"""### 3. Gateway throughput with monitoring on and off

Method: two `broker serve` processes (one uvicorn worker each, SQLite WAL, one OpenBao dev
server, provider `mock`), identical but for `[monitoring] enabled = false` in one's
configuration (the TOML form of `BROKER_MONITORING_ENABLED=false`); the monitored one also ran
part 1 beforehand. Each has one `agent` load workload with default monitoring (an agent's
finding would suspend it) and `harness.bench_policy`. `wrk` (1 thread, keep-alive,
{args.concurrency} connections) sends non-stream `POST /v1/chat/completions` (`max_tokens` 16);
a Lua `request()` numbers the prompt of every request after a tag fresh for each wrk run, so
no two requests share a fingerprint: the detectors run on every call, as they would on honest
traffic, and the loop detector has nothing to find (`policy.monitoring.loop = "off"` would skip
only the action, and identical requests are not the traffic being costed). {args.rounds}
rounds of one segment per broker in ABBA order (on, off, off, on, ...), each {args.warmup:g} s
discarded warm-up then {args.duration:g} s measured, after waiting up to {args.quiet_wait:g} s
for the rest of the machine (the other broker included, so a monitor still draining its queue
delays the next segment rather than stealing from it) to go quiet.
{harness.CPU_COLUMNS_NOTE}

{pooled}

**Monitoring on ÷ off: {ratio:.1%} of the req/s** (target ≥ {TARGET_RATIO:.0%}:
{_verdict(ratio >= TARGET_RATIO)}), {cpu_ratio:.1%} per server CPU-second; per round
{_spread(pairs, ".3f")} (min / median / max).

Checks after the run (both brokers stopped, so the monitor had drained its queue and written its
baselines): alerts on the load workload: {alerts}. Observations the monitor dropped
(`broker_monitor_dropped_total`): {dropped}. `monitor_state` rows for the load workload:
{result.baseline_rows.get(on.name, 0)} on the monitored broker (its detectors ran),
{result.baseline_rows.get(off.name, 0)} on the other ({result.state_rows_off} rows in all there).

Every segment, in the order run:

{seg_table}
"""


def code_version() -> str:
    """The commit and a digest of the code measured: the monitor, the gateway path that feeds
    it and the detectors' settings (a working tree under edit changes the figures)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=harness.ROOT,
                          capture_output=True, text=True).stdout.strip() or "unknown"
    digest = hashlib.sha256()
    files = sorted((harness.ROOT / "broker" / "monitoring").glob("*.py"))
    files += [harness.ROOT / "broker" / "gateway" / "calls.py", harness.ROOT / "broker" / "settings.py"]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"commit {head} plus the working tree; sha256 of broker/monitoring/*.py, " \
           f"broker/gateway/calls.py and broker/settings.py: {digest.hexdigest()[:12]}"


def report(runs: list[Containment], rep: Replay, over: Overhead, args: argparse.Namespace,
           whole_s: float) -> tuple[str, str]:
    summary = Summary()
    parts = [containment_text(runs, args, summary), replay_text(rep, summary),
             overhead_text(over, args, summary)]
    command = "python -m bench.bench_monitoring " + " ".join(args.argv)
    text = f"""## Runtime monitoring: time to contain, false positives, overhead

Run {harness.now_utc()}: {harness.machine_description()}.
Code: {args.code}.
Command: `{command.strip()}` (whole run {whole_s:.0f} s). Produced by
`bench/bench_monitoring.py`; figures within this section come from this one run, measured side
by side. Measurements, not tests: nothing here is asserted.

{summary.text()}

{parts[0]}
{parts[1]}
{parts[2]}"""
    return text, summary.text()


def write_results(text: str) -> None:
    """Replace the generated section of RESULTS-monitoring.md, keeping what is written by hand
    around it."""
    block = f"{START}\n{text.strip()}\n{END}"
    if RESULTS_FILE.exists():
        old = RESULTS_FILE.read_text()
        pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
        if pattern.search(old):
            RESULTS_FILE.write_text(pattern.sub(lambda _m: block, old))
            return
        RESULTS_FILE.write_text(old.rstrip() + "\n\n" + block + "\n")
        return
    RESULTS_FILE.write_text("# Benchmark results: runtime monitoring\n\n" + block + "\n")


@dataclass
class Brokers:
    on: BrokerUnderTest
    off: BrokerUnderTest

    def stop(self) -> None:
        self.on.stop()
        self.off.stop()


@contextlib.contextmanager
def start_brokers(vault: DevVault, work: Path) -> Iterator[Brokers]:
    (work / "on").mkdir()
    (work / "off").mkdir()
    on = BrokerUnderTest(vault, work / "on", extra_toml=MOCK_TOML)
    off = BrokerUnderTest(vault, work / "off", extra_toml=MOCK_TOML + MONITORING_OFF_TOML)
    brokers = Brokers(on, off)
    try:
        on.start()
        off.start()
        yield brokers
    finally:
        brokers.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_monitoring", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="looping agents to contain (part 1)")
    parser.add_argument("--rate", type=float, default=20.0, help="the looping agent's req/s")
    parser.add_argument("--workloads", type=int, default=500, help="steady traffic's workloads")
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours replayed")
    parser.add_argument("--seed", type=int, default=1, help="steady traffic's seed")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds of one segment per broker (part 3), in ABBA order")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per segment")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds before each")
    parser.add_argument("--quiet-wait", type=float, default=2.0,
                        help="before each segment, wait up to this long for other processes to go quiet")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS_FILE.name}")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, wrk scripts)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.runs < 1 or args.rounds < 1 or args.workloads < 1 or args.rate <= 0 or args.hours <= 0:
        parser.error("--runs, --rounds, --workloads, --rate and --hours must be positive")
    if not harness.wrk_available():
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2
    started = time.monotonic()
    args.code = code_version()  # before the run: the code the servers start from
    # Part 2 first, in this process, before any server takes a core.
    print(f"false positives: {args.workloads} workloads over {args.hours:g} simulated hours", flush=True)
    rep = measure_false_positives(args.workloads, args.hours, args.seed)
    print(f"  {rep.observations:,} observations, {len(rep.findings)} findings, replay "
          f"{rep.wall_s:.2f} s ({rep.wall_s / max(1, rep.observations) * 1e6:.1f} µs each)", flush=True)
    with harness.workspace("bench-monitoring-", keep=args.keep) as work, DevVault() as vault, \
            start_brokers(vault, work) as brokers:
        print(f"time to contain: {args.runs} looping agents at {args.rate:g} req/s", flush=True)
        runs = measure_containment(brokers.on, args.runs, args.rate)
        print(f"overhead: {args.rounds} rounds at concurrency {args.concurrency}", flush=True)
        over = measure_overhead(Side("monitoring on", brokers.on),
                                Side("monitoring off", brokers.off), args, work)
        brokers.stop()  # the monitor drains its queue and writes its baselines at stop
        overhead_checks(over)
    text, table = report(runs, rep, over, args, time.monotonic() - started)
    print(text)
    print("Summary:\n" + table)
    if not args.no_write:
        write_results(text)
        print(f"written to {RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
