"""Revocation benchmark: how fast a revocation reaches another replica, and what a large denylist
costs the gateway.

    python -m bench.bench_revocation [--revocations 200] [--entries 100000] [--rounds 3] [--duration 8]

1. Propagation. Two real ``broker serve`` processes, configured only by environment variables,
   on one fresh PostgreSQL database and one OpenBao dev server (same Vault prefix), started one
   after the other. For each revocation: a token is issued on replica A, replica B is seen to
   accept it, its jti is revoked on A, then B's ``/v1/introspect`` is polled back to back until it
   answers ``active: false``. The time counted runs from A's revoke response to B's first inactive
   answer. A separate ``LISTEN`` connection in this process stamps when PostgreSQL delivers each
   revocation's notification, which splits that time into delivery and the replica's own work.

2. Denylist size. One ``broker serve`` (SQLite WAL) with the in-process ``mock`` provider; ``wrk``
   drives non-stream ``/v1/chat/completions`` at concurrency 16 in segments that alternate on the
   same process: empty denylist, 100,000 live entries, empty, ... The entries go straight into the
   broker's ``revocation`` log table (the table every replica replays; 100,000 HTTP revocations
   would take minutes) and reach memory through the broker's own periodic catch-up read, with no
   restart. One of them is the jti of a real token, which the gateway must start refusing: the
   proof the entries were loaded. They expire just after their segment, the broker's prune drops
   them, and the rows are deleted, so the next segment is empty again. Loaded segments are
   "settled" (created over a minute ago, so the catch-up's 60 s overlap re-reads none of them)
   or "fresh" (all created in the last minute, as right after a mass revocation: every catch-up
   re-reads all of them until they age out).

Measurements, not tests: nothing is asserted beyond the setup working.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import jwt
import psycopg
from sqlalchemy import delete, func, insert, select

from bench import harness
from bench.harness import BrokerUnderTest, Measurement, ServerProcess, Target
from broker.devvault import DevVault, free_port
from broker.revocation import sync
from broker.revocation.denylist import Denylist
from broker.revocation.sync import CATCHUP_OVERLAP_S
from broker.storage.bus import CHANNEL
from broker.storage.db import Database, make_engine
from broker.storage.models import Revocation
from broker.tokens.tokens import LEEWAY_S, VerifiedToken, new_jti

RESULTS_FILE = Path(__file__).resolve().parent / "RESULTS-revocation.md"
PG_ADMIN_URL = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
MODEL = harness.MOCK_MODEL
MOCK_TOML = harness.MOCK_TOML
T = TypeVar("T")
POLL_LIMIT_S = 10.0  # a revocation not seen by then is reported as lost, and the run goes on


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_", "BAO_"))}


# --- 1. propagation across two replicas ----------------------------------------------------


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards."""
    name = f"bench_rv_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class NotificationClock:
    """Stamps (perf_counter) when PostgreSQL delivers each revocation notification to a listener
    like the one every replica runs: the delivery part of the propagation time."""

    def __init__(self, url: str):
        self._url = url
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-listen", daemon=True)

    def __enter__(self) -> NotificationClock:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("could not LISTEN on the benchmark database")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with psycopg.connect(self._url, autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self._ready.set()
            while not self._stop.is_set():
                for note in conn.notifies(timeout=0.2):
                    at = time.perf_counter()
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        message = json.loads(note.payload)
                        if message.get("type") == "revocation":
                            self.seen[int(message["id"])] = at


@dataclass
class Sample:
    propagation_s: float  # A's revoke response -> B's first inactive answer
    revoke_rtt_s: float  # the revoke request itself, on A
    polls: int  # introspections of B until inactive (1: already inactive at the first)
    notified_s: float | None  # A's revoke response -> the notification reached a listener


@dataclass
class Propagation:
    samples: list[Sample] = field(default_factory=list)
    lost: int = 0
    poll_rtts: list[float] = field(default_factory=list)  # B's introspection round trips


def _token(client: httpx.Client, client_id: str, secret: str) -> str:
    resp = client.post("/v1/token", data={"grant_type": "client_credentials",
                                          "client_id": client_id, "client_secret": secret})
    if resp.status_code != 200:
        raise RuntimeError(f"token: {resp.status_code} {resp.text[:300]}")
    token: str = resp.json()["access_token"]
    return token


def _active(client: httpx.Client, token: str, admin: dict[str, str]) -> bool:
    resp = client.post("/v1/introspect", data={"token": token}, headers=admin)
    if resp.status_code != 200:
        raise RuntimeError(f"introspect: {resp.status_code} {resp.text[:300]}")
    return bool(resp.json()["active"])


def measure_propagation(vault: DevVault, work: Path, count: int) -> Propagation:
    out = Propagation()
    admin_secret = "bench-" + secrets.token_urlsafe(32)
    empty_config = work / "empty.toml"  # defaults + environment only (no config/broker.toml)
    empty_config.write_text("")
    with fresh_database() as db_url:
        env = _child_env()
        env.update({
            "BROKER_DATABASE_URL": db_url,
            "BROKER_VAULT_ADDR": vault.addr,
            "BROKER_VAULT_TOKEN": vault.root_token,
            "BROKER_VAULT_PREFIX": f"bench-rv-{secrets.token_hex(4)}",
            "BROKER_BOOTSTRAP_ADMIN_SECRET": admin_secret,
            "BROKER_ISSUER_URL": "http://broker.bench",
            "BROKER_SERVER_HOST": "127.0.0.1",
        })
        subprocess.run([harness.PYTHON, "-m", "broker.cli", "migrate", "--config", str(empty_config)],
                       cwd=harness.ROOT, env=env, check=True, capture_output=True)
        replicas: list[ServerProcess] = []
        try:
            # One after the other: the first creates the signing key and the bootstrap admin.
            for name in ("replica-a", "replica-b"):
                port = free_port()
                argv = [harness.PYTHON, "-m", "broker.cli", "serve", "--config", str(empty_config)]
                replicas.append(ServerProcess(
                    name, argv, port, env={**env, "BROKER_SERVER_PORT": str(port)},
                    ready_path="/healthz", log_dir=work,
                ).start())
            a_srv, b_srv = replicas
            with httpx.Client(base_url=a_srv.url, timeout=30) as a, \
                    httpx.Client(base_url=b_srv.url, timeout=30) as b, \
                    NotificationClock(db_url) as clock:
                _run_revocations(a, b, admin_secret, count, clock, out)
        finally:
            for proc in replicas:
                proc.stop()
    return out


def _run_revocations(a: httpx.Client, b: httpx.Client, admin_secret: str, count: int,
                     clock: NotificationClock, out: Propagation) -> None:
    admin_issued = time.monotonic()
    admin = {"authorization": "Bearer " + _token(a, "admin", admin_secret)}
    tenant = a.post("/v1/admin/tenants", json={"name": f"bench-{secrets.token_hex(3)}"}, headers=admin)
    if tenant.status_code != 201:
        raise RuntimeError(f"tenant: {tenant.status_code} {tenant.text[:300]}")
    agent = a.post("/v1/admin/workloads", headers=admin, json={
        "tenant_id": tenant.json()["id"], "name": f"bench-agent-{secrets.token_hex(3)}",
        "kind": "agent", "policy": {"models": [MODEL], "token_budget_micros": 1000}})
    if agent.status_code != 201:
        raise RuntimeError(f"workload: {agent.status_code} {agent.text[:300]}")
    client_id, client_secret = agent.json()["client_id"], agent.json()["client_secret"]
    for i in range(count):
        if time.monotonic() - admin_issued > 300:  # well inside any admin token's lifetime
            admin = {"authorization": "Bearer " + _token(a, "admin", admin_secret)}
            admin_issued = time.monotonic()
        token = _token(a, client_id, client_secret)
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        if not _active(b, token, admin):
            raise RuntimeError("replica B refused a fresh token before its revocation")
        t0 = time.perf_counter()
        resp = a.post(f"/v1/admin/tokens/{jti}/revoke", headers=admin,
                      json={"reason": f"bench {i}"})
        t1 = time.perf_counter()
        if resp.status_code != 200:
            raise RuntimeError(f"revoke: {resp.status_code} {resp.text[:300]}")
        entry_id = int(str(resp.json()["id"]).removeprefix("rv_"))
        polls = 0
        while True:
            polls += 1
            p0 = time.perf_counter()
            active = _active(b, token, admin)
            p1 = time.perf_counter()
            out.poll_rtts.append(p1 - p0)
            if not active:
                break
            if p1 - t1 > POLL_LIMIT_S:
                out.lost += 1
                break
        if active:
            continue
        notified = clock.seen.get(entry_id)
        out.samples.append(Sample(p1 - t1, t1 - t0, polls,
                                  None if notified is None else notified - t1))
    if _active(a, token, admin):
        raise RuntimeError("replica A still accepts a token it revoked")


# --- 2. gateway throughput against the denylist's size -------------------------------------

BULK_ACTOR = "bench-bulk"  # marks the inserted log rows, so a cycle can delete its own
# Time allowed from the insert to the entries being in memory (the insert, then the next
# catch-up tick, every 3 s); the entries are made to expire once the measurement after it is over.
LOAD_BUDGET_S = 8.0


@dataclass
class Segment:
    kind: str  # empty | settled | fresh
    m: Measurement
    insert_s: float = 0.0  # the insert of the entries (loaded segments)
    load_s: float = 0.0  # insert committed -> the gateway refuses the known jti


@dataclass
class Costs:
    """The broker's revocation code timed in this process on the broker's own database file,
    while the entries are live (CPU time of one thread): what each part of the work costs."""

    rows: int  # read by the first catch-up into an empty denylist (as a replica's load)
    first_read_ms: float
    reread_rows: int  # read by the next catch-up, as every 3 s in the broker
    reread_ms: float
    prune_ms: float  # the prune that follows each catch-up, nothing yet expired
    lookup_empty_ns: float  # Denylist.is_live, per call
    lookup_full_ns: float


@dataclass
class DenylistRun:
    segments: list[Segment]
    entries: int
    rss_empty_mb: float
    rss_full_mb: float
    unload_s: list[float] = field(default_factory=list)  # expiry -> the known jti accepted again
    costs: dict[str, Costs] = field(default_factory=dict)  # by kind of loaded segment


def _cpu_ms(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.thread_time()
    out = fn()
    return (time.thread_time() - started) * 1000, out


def _lookup_ns(denylist: Denylist, token: VerifiedToken, calls: int = 200_000) -> float:
    started = time.thread_time()
    for _ in range(calls):
        denylist.is_live(token)
    return (time.thread_time() - started) * 1e9 / calls


def measure_costs(db_path: Path) -> Costs:
    db = Database(make_engine(f"sqlite:///{db_path}"))
    try:
        denylist = Denylist()
        first_ms, rows = _cpu_ms(lambda: db.transaction(
            lambda conn: sync.catch_up(conn, denylist, int(time.time()))))
        reread_ms, reread = _cpu_ms(lambda: db.transaction(
            lambda conn: sync.catch_up(conn, denylist, int(time.time()))))
        prune_ms, _ = _cpu_ms(lambda: denylist.prune(int(time.time())))
        now = int(time.time())
        token = VerifiedToken(sub="w", tenant="t", kind="agent", jti=new_jti(), iat=now,
                              exp=now + 900, models=(), budget_micros=0, roles=(), act=None,
                              claims={})
        return Costs(rows, first_ms, reread, reread_ms, prune_ms,
                     _lookup_ns(Denylist(), token), _lookup_ns(denylist, token))
    finally:
        db.dispose()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Gateway:
    """The chat call the load generator repeats, and single calls to check what the gateway
    accepts."""

    def __init__(self, broker: BrokerUnderTest, token: str, known: str):
        self.url = broker.url + "/v1/chat/completions"
        self.body = json.dumps({"model": MODEL, "max_tokens": 16, "messages": [
            {"role": "user", "content": "Say something short about benchmarks."}]})
        self.token, self.known, self.pid = token, known, broker.pid

    def status(self, token: str) -> int:
        resp = httpx.post(self.url, content=self.body, timeout=30, headers={
            "content-type": "application/json", "authorization": f"Bearer {token}"})
        if resp.status_code == 200 and '"usage"' not in resp.text:
            raise RuntimeError(f"gateway: no usage in {resp.text[:300]}")
        return resp.status_code

    def wait_for_known(self, status: int, limit_s: float) -> float:
        """Seconds until the known token's call answers ``status`` (bounded)."""
        started = time.perf_counter()
        while self.status(self.known) != status:
            if time.perf_counter() - started > limit_s:
                raise RuntimeError(f"the known token did not answer {status} within {limit_s:g} s")
            time.sleep(0.05)
        return time.perf_counter() - started

    def target(self, kind: str) -> Target:
        headers = (("content-type", "application/json"), ("authorization", f"Bearer {self.token}"))
        return Target(f"chat non-stream, {kind}", self.url, "POST", self.body, headers, (self.pid,))


class Bulk:
    """``count`` live token revocations written straight into the broker's log table, one of
    them the known token's jti; the same jtis each cycle."""

    def __init__(self, db_path: Path, tenant_id: str, known_jti: str, count: int):
        self.jtis = [new_jti() for _ in range(count - 1)]
        self.jtis.insert(len(self.jtis) // 2, known_jti)
        self.tenant_id = tenant_id
        self.engine = make_engine(f"sqlite:///{db_path}")
        self.table = Revocation.__table__  # type: ignore[attr-defined]

    def insert(self, *, fresh: bool, until: int) -> float:
        """Settled rows were created 61 s to 14 min ago (outside the catch-up's re-read window);
        fresh rows now. All are relevant until ``until``."""
        now = int(time.time())
        rng = random.Random(7)
        rows = [{
            "kind": "token", "action": "revoke", "target": jti, "tenant_id": self.tenant_id,
            "cutoff": None, "expires_at": until - LEEWAY_S, "relevant_until": until,
            "created_at": now if fresh else now - CATCHUP_OVERLAP_S - 1 - rng.randrange(780),
            "actor": BULK_ACTOR, "reason": None,
        } for jti in self.jtis]
        started = time.perf_counter()
        with self.engine.begin() as conn:
            for start in range(0, len(rows), 10_000):
                conn.execute(insert(self.table), rows[start:start + 10_000])
        return time.perf_counter() - started

    def delete(self) -> None:
        """Delete this cycle's rows (all expired) but the newest: SQLite numbers a new row after
        the highest id present, and the catch-up finds settled rows only by an id above the
        highest it has seen."""
        c = self.table.c
        newest = select(func.max(c.id)).scalar_subquery()
        with self.engine.begin() as conn:
            conn.execute(delete(self.table).where(c.actor == BULK_ACTOR, c.id < newest))

    def close(self) -> None:
        self.engine.dispose()


def measure_denylist(vault: DevVault, work: Path, args: argparse.Namespace) -> DenylistRun:
    broker = BrokerUnderTest(vault, work, extra_toml=MOCK_TOML).start()
    bulk: Bulk | None = None
    try:
        tenant = broker.create_tenant()
        agent = broker.create_workload(tenant, "agent", harness.bench_policy([MODEL], 10**12))
        known = broker.token(agent.client_id, agent.client_secret)
        gw = Gateway(broker, broker.token(agent.client_id, agent.client_secret), known)
        if gw.status(gw.token) != 200 or gw.status(known) != 200:
            raise RuntimeError("the gateway refused a fresh token")
        known_jti = jwt.decode(known, options={"verify_signature": False})["jti"]
        bulk = Bulk(broker.db_path, tenant, known_jti, args.entries)
        c, quiet, warm, dur = args.concurrency, args.quiet_wait, args.warmup, args.duration

        def run(label: str) -> Measurement:
            return harness.measure(gw.target(label), c, warmup_s=warm, duration_s=dur,
                                   workdir=work, quiet_wait_s=quiet)

        print(f"gateway at concurrency {c}:", flush=True)
        segments = [Segment("empty", run("empty denylist"))]
        rss_empty = _rss_mb(broker.pid)
        rss_full = 0.0
        unload: list[float] = []
        costs: dict[str, Costs] = {}
        for kind in args.kinds * args.rounds:
            # The entries expire once this segment's measurement is over, so that the next
            # empty segment runs on the same process with nothing in memory again.
            until = int(time.time() + LOAD_BUDGET_S + quiet + warm + dur + 2)
            insert_s = bulk.insert(fresh=kind == "fresh", until=until)
            load_s = gw.wait_for_known(401, LOAD_BUDGET_S)
            if time.time() + quiet + warm + dur + 1 > until:
                raise RuntimeError("loading the entries took too long to measure before they expire")
            if gw.status(gw.token) != 200:
                raise RuntimeError("the load token was refused along with the inserted entries")
            rss_full = rss_full or _rss_mb(broker.pid)
            m = run(f"{args.entries:,} entries, {kind}")
            if gw.status(known) != 401:
                raise RuntimeError("the entries expired during the measurement")
            segments.append(Segment(kind, m, insert_s, load_s))
            if kind not in costs and until - time.time() > 5:  # the entries are still live
                costs[kind] = measure_costs(broker.db_path)
            print(f"    (entries inserted in {insert_s:.2f} s, in memory {load_s:.2f} s later)",
                  flush=True)
            remaining = max(0.0, until - time.time())
            unload.append(gw.wait_for_known(200, remaining + 20) - remaining)
            bulk.delete()
            segments.append(Segment("empty", run("empty denylist")))
    finally:
        if bulk is not None:
            bulk.close()
        broker.stop()
    return DenylistRun(segments, args.entries, rss_empty, rss_full, unload, costs)


# --- report --------------------------------------------------------------------------------


def _row(label: str, values: list[float]) -> tuple[str, ...]:
    return (label, _ms(_pct(values, 50)), _ms(_pct(values, 99)), _ms(max(values)),
            _ms(statistics.fmean(values)))


def _pooled(segs: list[Segment]) -> tuple[float, float]:
    """(req/s, req per server CPU-s) over several segments of one kind."""
    requests = sum(s.m.requests for s in segs)
    seconds = sum(s.m.duration_s for s in segs)
    cpu = sum(s.m.server_cpu * s.m.duration_s for s in segs)
    return requests / seconds, (requests / cpu if cpu else 0.0)


def propagation_text(prop: Propagation, args: argparse.Namespace) -> str:
    times = [s.propagation_s for s in prop.samples]
    notified = [s.notified_s for s in prop.samples if s.notified_s is not None]
    after = [s.propagation_s - s.notified_s for s in prop.samples if s.notified_s is not None]
    rows = [_row("A's revoke response → B's first `active: false`", times)]
    if notified:
        rows.append(_row("A's revoke response → notification delivered to a listener", notified))
        rows.append(_row("notification delivered → B's first `active: false`", after))
    rows.append(_row("one poll: B's `/v1/introspect` round trip", prop.poll_rtts))
    rows.append(_row("the revoke request on A (round trip)", [s.revoke_rtt_s for s in prop.samples]))
    polls = [s.polls for s in prop.samples]
    first = sum(1 for p in polls if p == 1)
    return f"""### Propagation of a token revocation from replica A to replica B

Method: two `broker serve` processes (one uvicorn worker each) configured only by environment
variables, on one fresh PostgreSQL database (`broker migrate`) and one OpenBao dev server with one
Vault prefix, started one after the other. {args.revocations} revocations, one at a time: a token
issued on A, B seen to accept it, its jti revoked on A (`POST /v1/admin/tokens/{{jti}}/revoke`),
then B's `/v1/introspect` (admin bearer) polled back to back over one keep-alive connection until
`active` is false. The time runs from A's revoke response to B's first inactive answer, so it
includes part of a poll round trip. A `LISTEN` connection in the benchmark process stamps when
PostgreSQL delivers each revocation's `NOTIFY` (sent at commit, before A answers: a negative time
means the notification was out before the revoke response). B's catch-up read (every 3 s) is
only a backstop; at these times the notification carried every change.
Not seen by B within {POLL_LIMIT_S:g} s: {prop.lost}.

**p50 {_ms(_pct(times, 50))} ms, p99 {_ms(_pct(times, 99))} ms, max {_ms(max(times))} ms**
(n = {len(times)}).

{harness.table(rows, ["interval", "p50 ms", "p99 ms", "max ms", "mean ms"])}

Polls of B per revocation: median {statistics.median(polls):g}, max {max(polls)}; {first} of
{len(polls)} revocations were already refused by B at the first poll.
"""


def denylist_text(deny: DenylistRun, args: argparse.Namespace) -> str:
    segs = deny.segments
    rows = []
    for i, s in enumerate(segs):
        bracket = ""
        if s.kind != "empty":
            around = [segs[j].m.rps for j in (i - 1, i + 1) if 0 <= j < len(segs)]
            bracket = f"{s.m.rps / statistics.fmean(around):.3f}"
        m = s.m
        rows.append((str(i + 1), m.target, f"{m.rps:,.0f}", bracket, f"{m.per_cpu_s:,.0f}",
                     f"{m.p50_ms:.1f}", f"{m.p99_ms:.1f}", str(m.errors), m.server_cpu_text,
                     f"{m.wrk_cpu:.2f}", f"{m.other_cpu:.2f}"))
    seg_table = harness.table(rows, [
        "#", "segment", "req/s", "÷ empty either side", "req per server CPU-s", "p50 ms", "p99 ms",
        "errors", "CPU server", "CPU wrk", "CPU other"])
    by_kind = {k: [s for s in segs if s.kind == k] for k in ("empty", "settled", "fresh")}
    e_rps, e_cpu = _pooled(by_kind["empty"])
    summary_rows = []
    ratios: dict[str, tuple[float, float]] = {}
    for kind, label in (("empty", "empty denylist"),
                        ("settled", f"{deny.entries:,} entries, settled"),
                        ("fresh", f"{deny.entries:,} entries, fresh (< 60 s old)")):
        if not by_kind[kind]:
            continue
        rps, cpu = _pooled(by_kind[kind])
        ratios[kind] = (rps / e_rps, cpu / e_cpu if e_cpu else 0.0)
        summary_rows.append((label, str(len(by_kind[kind])), f"{rps:,.0f}", f"{rps / e_rps:.3f}",
                             f"{cpu:,.0f}", f"{ratios[kind][1]:.3f}"))
    summary = harness.table(summary_rows, ["denylist", "segments", "req/s (pooled)", "÷ empty",
                                           "req per server CPU-s (pooled)", "÷ empty"])
    headline = "; ".join(f"{r:.3f} {kind} (per server CPU-second {c:.3f})"
                         for kind, (r, c) in ratios.items() if kind != "empty")
    loaded = [s for s in segs if s.kind != "empty"]
    loads = ", ".join(f"{s.load_s:.2f}" for s in loaded)
    inserts = ", ".join(f"{s.insert_s:.2f}" for s in loaded)
    unloads = ", ".join(f"{u:.1f}" for u in deny.unload_s)
    return f"""### Gateway throughput: a {deny.entries:,}-entry denylist against an empty one

Method: one `broker serve` (one uvicorn worker, SQLite WAL in a temp dir), provider `mock` (the
in-process fake provider), `{MODEL}` priced as in `broker dev`. `wrk` (1 thread, keep-alive,
{args.concurrency} connections) sends non-stream `POST /v1/chat/completions` (`max_tokens` 16) with
one agent token; each segment is {args.warmup:g} s discarded warm-up then {args.duration:g} s
measured (after waiting up to {args.quiet_wait:g} s for the rest of the machine to go quiet).
Segments alternate on the same process, empty / loaded / empty / ..., so drift in the load from
other people's work on this shared machine hits both sides.

Loading: {deny.entries:,} token revocations (random jtis) are inserted into the broker's
`revocation` log table in one transaction (took {inserts} s) and reach memory through the broker's
own periodic catch-up read (every 3 s), with no restart. One of them is the jti of a real token
that was never revoked through the API: the gateway refused it {loads} s after each insert
committed (the proof that the entries are in memory; it includes the wait for the next catch-up
tick) and still served the load token. The entries expire just after their segment, after which
the broker's prune drops them (the known token was served again {unloads} s after the expiry)
and the rows are deleted, so the next segment runs with an empty denylist again. Broker RSS:
{deny.rss_empty_mb:.0f} MB before the first load, {deny.rss_full_mb:.0f} MB with
{deny.entries:,} entries in memory.

Two kinds of loaded segment: **settled**, entries created 61 s to 14 min earlier, outside the
60 s window the catch-up re-reads, so what remains is the per-request lookup and the periodic
prune's scan of the dictionary; **fresh**, all created at the insert (as right after a mass
revocation), so every catch-up during the segment re-reads all {deny.entries:,} rows. A steady
state of {deny.entries:,} live entries (~{deny.entries / 900:,.0f} revocations/s with 15-minute
tokens) keeps about {CATCHUP_OVERLAP_S / 900:.0%} of them in that window: between the two.
{harness.CPU_COLUMNS_NOTE}

{summary}

**Throughput ratio, {deny.entries:,} entries ÷ empty: {headline}**.

{costs_text(deny)}
Every segment, in the order run (`÷ empty either side`: req/s over the mean of the empty segments
just before and after it):

{seg_table}
"""


def costs_text(deny: DenylistRun) -> str:
    if not deny.costs:
        return ""
    rows = []
    for kind, c in deny.costs.items():
        rows.append((f"`Denylist.is_live`, per call ({kind} entries / empty)",
                     f"{c.lookup_full_ns:.0f} ns / {c.lookup_empty_ns:.0f} ns"))
        rows.append((f"catch-up into an empty denylist ({c.rows:,} rows: a replica's start or "
                     "first catch-up)", f"{c.first_read_ms:,.0f} ms"))
        rows.append((f"the next catch-up ({kind}: re-reads {c.reread_rows:,} rows), every 3 s",
                     f"{c.reread_ms:,.1f} ms ({c.reread_ms / 30:.1f} % of a core)"))
        rows.append((f"the prune after it ({kind}), every 3 s",
                     f"{c.prune_ms:,.1f} ms ({c.prune_ms / 30:.1f} % of a core)"))
    table = harness.table(rows, ["work (CPU time, one thread, in the benchmark process)", "cost"])
    return f"""Where the time goes: the broker's own revocation code
(`broker.revocation.sync.catch_up`, `Denylist.prune`, `Denylist.is_live`) run in the
benchmark process against the broker's database
file while the entries were live, just after the first segment of each kind. In the broker the
catch-up and the prune run in the event-bus thread, whose time competes for the GIL with the
worker serving requests.

{table}
"""


def report(prop: Propagation, deny: DenylistRun, args: argparse.Namespace) -> str:
    return f"""## Revocation: propagation across replicas, and the gateway against a large denylist

Run {harness.now_utc()}: {harness.machine_description()}.
Produced by `python -m bench.bench_revocation` (one run, both parts). Measurements, not tests:
nothing here is asserted.

{propagation_text(prop, args)}
{denylist_text(deny, args)}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_revocation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revocations", type=int, default=200)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of loaded segments (one of each kind), each between empty ones")
    parser.add_argument("--kinds", default="settled,fresh",
                        help="the kinds of loaded segment in a round: settled, fresh or both")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per segment")
    parser.add_argument("--warmup", type=float, default=1.0, help="discarded seconds before each")
    parser.add_argument("--quiet-wait", type=float, default=2.0,
                        help="before each segment, wait up to this long for other processes to go quiet")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS_FILE.name}")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    if args.revocations < 1 or args.entries < 1 or args.rounds < 1:
        parser.error("--revocations, --entries and --rounds must be positive")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not args.kinds or set(args.kinds) - {"settled", "fresh"}:
        parser.error("--kinds takes settled, fresh or settled,fresh")
    if args.quiet_wait + args.warmup + args.duration + LOAD_BUDGET_S > CATCHUP_OVERLAP_S - 5:
        parser.error("a fresh segment must fit in the catch-up's 60 s re-read window")
    if not harness.wrk_available():
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2
    started = time.monotonic()
    with harness.workspace("bench-revocation-", keep=args.keep) as work, DevVault() as vault:
        print(f"propagation: {args.revocations} revocations across two replicas", flush=True)
        prop = measure_propagation(vault, work, args.revocations)
        if not prop.samples:
            print("no revocation reached replica B", file=sys.stderr)
            return 1
        times = [s.propagation_s for s in prop.samples]
        print(f"  p50 {_ms(_pct(times, 50))} ms  p99 {_ms(_pct(times, 99))} ms  "
              f"max {_ms(max(times))} ms  lost {prop.lost}", flush=True)
        (work / "denylist").mkdir()
        deny = measure_denylist(vault, work / "denylist", args)
    text = report(prop, deny, args)
    print(text)
    print(f"whole run: {time.monotonic() - started:.0f} s")
    if not args.no_write:
        RESULTS_FILE.write_text(text)
        print(f"written to {RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
