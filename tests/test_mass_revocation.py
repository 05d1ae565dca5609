"""Mass revocation stays cheap: suspending a workload with 100,000 live tokens takes the acting
replica a constant number of statements (set-based, not several per token), and 100,000 token
revocations in the log cost every other replica a few reads (the bus hands its follower the
notifications in batches), while every one of those tokens is refused there.

The set-based release is also compared, on a small state with every kind of slice (open holds,
delegation chains, a grant's children, a job, an overrun), with the ledger's own release of one
slice after another: both must leave the same rows behind.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from sqlalchemy import Connection, Engine, event, text, update

from broker.money import ledger
from broker.money.ledger import BudgetRef
from broker.revocation import actions
from broker.revocation.denylist import Denylist
from broker.revocation.sync import FETCH_CHUNK
from broker.storage.db import Database
from broker.storage.models import TokenSlice
from broker.tokens import tokens
from tests.conftest import Broker, BrokerFactory
from tests.support import wait_for
from tests.test_replicas import start_replica

_slice = TokenSlice.__table__  # type: ignore[attr-defined]

MASS = 100_000
BUDGET = 1_000
STATEMENTS_BOUND = 40  # the suspension's own transaction; measured: about 15


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as resources:
        yield resources


# --- statement counting --------------------------------------------------------------------


class Statements:
    """Every statement run on an engine from now on, with the connection and thread that ran
    it (the broker's background threads share the engine with the request under test)."""

    def __init__(self, engine: Engine, stack: contextlib.ExitStack) -> None:
        self.seen: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._record)
        stack.callback(event.remove, engine, "before_cursor_execute", self._record)

    def _record(self, conn: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
        with self._lock:
            self.seen.append((id(conn), threading.current_thread().name, statement))

    def reads_by_thread(self, name: str) -> list[str]:
        with self._lock:
            return [s for _c, t, s in self.seen if t == name and _is_select(s)]

    def of_the_transaction_that_ran(self, needle: str) -> list[str]:
        """The statements of the connection that ran the statement containing ``needle``."""
        with self._lock:
            owner = next(c for c, _t, s in self.seen if needle in s)
            return [s for c, _t, s in self.seen if c == owner]


def _is_select(statement: str) -> bool:
    return statement.lstrip().upper().startswith("SELECT")


# --- helpers -------------------------------------------------------------------------------


def _two_replicas(make_broker: BrokerFactory, pg_url: str,
                  stack: contextlib.ExitStack) -> tuple[Broker, Broker]:
    first = make_broker(pg_url)
    # A catch-up too slow to matter: what the second replica learns, it learns from NOTIFY.
    second = start_replica(stack, first.settings, revocation={"catchup_interval_s": 60})
    bus = second.services.bus
    assert bus is not None
    wait_for(bus.listening.is_set, what="the second replica's LISTEN")
    return first, second


def _agent(broker: Broker) -> dict[str, Any]:
    tenant = broker.create_tenant(budgets=[{"period": "day", "limit_micros": 10**15}])
    return broker.create_workload(tenant["id"], policy={
        "models": ["gpt-4o-mini"], "token_budget_micros": BUDGET,
        "budgets": [{"period": "hour", "limit_micros": 10**15}]})


def _gate(broker: Broker) -> Denylist:
    gate = broker.services.token_gate
    assert isinstance(gate, Denylist)
    return gate


def _verified(broker: Broker, token: str) -> tokens.VerifiedToken:
    return tokens.verify(token, broker.services.keyring, issuer=broker.settings.issuer.url,
                         audience=broker.settings.issuer.audience)


def _refused_over_http(broker: Broker, token: str) -> bool:
    resp = broker.client.post("/v1/introspect", data={"token": token}, headers=broker.admin())
    assert resp.status_code == 200, resp.text
    return resp.json()["active"] is False


def _jti(token: str) -> str:
    jti: str = jwt.decode(token, options={"verify_signature": False})["jti"]
    return jti


def _sql(db: Database, statement: str, **params: Any) -> Any:
    return db.transaction(lambda conn: conn.execute(text(statement), params).all())


def _add_live_slices(db: Database, workload: dict[str, Any], like_jti: str, count: int) -> None:
    """``count`` live token slices of ``workload``, reserved from the same budget counters as
    the real token ``like_jti``, written as issuance would leave them (set-based: building the
    state one token at a time would take minutes)."""
    now = int(time.time())
    db.transaction(lambda conn: [conn.execute(text(s), {
        "w": workload["id"], "t": workload["tenant_id"], "n": count, "b": BUDGET, "now": now,
        "like": like_jti}) for s in (
        # The rows are consistent by construction, and checking each link's foreign keys one
        # by one took three quarters of the setup.
        "SET LOCAL session_replication_role = replica",
        """INSERT INTO token_slice (jti, kind, parent_jti, workload_id, tenant_id, budget_micros,
                                    spent_micros, held_micros, issued_at, expires_at)
           SELECT 'mass-' || g, 'token', NULL, :w, :t, :b, 0, 0, :now - 1, :now + 600
           FROM generate_series(1, :n) g""",
        """INSERT INTO slice_counter (jti, counter_id)
           SELECT 'mass-' || g, l.counter_id
           FROM generate_series(1, :n) g CROSS JOIN slice_counter l WHERE l.jti = :like""",
        """UPDATE budget_counter SET reserved_micros = reserved_micros + CAST(:n AS bigint) * :b
           WHERE id IN (SELECT counter_id FROM slice_counter WHERE jti = :like)""",
        "UPDATE live_slices SET count = count + :n WHERE workload_id = :w",
    )])


def _counters_balance(db: Database, workload_id: str) -> list[tuple[int, int, int]]:
    """(counter, reserved, budgets of the unreleased root slices linked to it) for every
    counter above the workload: the two agree whenever the ledger is consistent."""
    rows = _sql(db, """
        SELECT c.id, c.reserved_micros,
               (SELECT COALESCE(SUM(s.budget_micros), 0) FROM slice_counter l
                JOIN token_slice s ON s.jti = l.jti
                WHERE l.counter_id = c.id AND s.released_at IS NULL AND s.parent_jti IS NULL)
        FROM budget_counter c
        WHERE c.id IN (SELECT l.counter_id FROM slice_counter l JOIN token_slice s
                       ON s.jti = l.jti WHERE s.workload_id = :w)
        ORDER BY c.id""", w=workload_id)
    return [(int(r[0]), int(r[1]), int(r[2])) for r in rows]


# --- a workload with 100,000 live tokens is suspended --------------------------------------


def test_suspending_a_workload_with_100k_live_tokens_takes_a_bounded_number_of_statements(
    make_broker: BrokerFactory, pg_url: str, stack: contextlib.ExitStack,
) -> None:
    first, second = _two_replicas(make_broker, pg_url, stack)
    agent = _agent(first)
    real = [first.token(agent["client_id"], agent["client_secret"]) for _ in range(3)]
    db = first.services.db
    started = time.monotonic()
    _add_live_slices(db, agent, _jti(real[0]), MASS)
    print(f"\n{MASS} live slices written in {time.monotonic() - started:.1f} s")
    balanced = _counters_balance(db, agent["id"])
    assert balanced and all(r == b for _c, r, b in balanced)
    verified = [_verified(second, t) for t in real]
    assert all(_gate(second).is_live(v) for v in verified)

    acting = Statements(db.engine, stack)
    follower = Statements(second.services.db.engine, stack)
    started = time.monotonic()
    resp = first.client.post(f"/v1/admin/workloads/{agent['id']}/suspend", headers=first.admin(),
                             json={"reason": "mass suspension"})
    took = time.monotonic() - started
    assert resp.status_code == 200, resp.text
    propagated = wait_for(lambda: not any(_gate(second).is_live(v) for v in verified))
    suspension = acting.of_the_transaction_that_ran("UPDATE workload SET suspended_at")
    reads = follower.reads_by_thread("broker-bus")
    print(f"suspension of {MASS + len(real)} live tokens: {took:.2f} s, "
          f"{len(suspension)} statements in its transaction; the other replica refused them "
          f"{propagated * 1000:.0f} ms later after {len(reads)} reads")
    assert len(suspension) <= STATEMENTS_BOUND, suspension
    assert len(reads) <= 10, reads

    # The money came back exactly: every slice released, the counters hold nothing of them.
    open_slices = _sql(db, "SELECT count(*) FROM token_slice WHERE workload_id = :w "
                           "AND released_at IS NULL", w=agent["id"])
    assert open_slices[0][0] == 0
    assert all(r == b for _c, r, b in _counters_balance(db, agent["id"]))
    live = _sql(db, "SELECT count FROM live_slices WHERE workload_id = :w", w=agent["id"])
    assert live[0][0] == 0
    # Refused over HTTP on both replicas.
    assert all(_refused_over_http(b, t) for b in (first, second) for t in real)


# --- 100,000 token revocations in the log ---------------------------------------------------


def _revoke_in_log(db: Database, tenant_id: str, jtis: list[str], mass: int) -> None:
    """``jtis`` and ``mass`` other tokens revoked in one transaction, each entry announced as
    :func:`broker.revocation.log.append` announces it (one NOTIFY per entry)."""
    now = int(time.time())
    statement = """
        WITH added AS (
            INSERT INTO revocation (kind, action, target, tenant_id, cutoff, expires_at,
                                    relevant_until, created_at, actor, reason)
            SELECT 'token', 'revoke', jti, :t, NULL, :now + 600, :now + 630, :now, 'wl_test',
                   'mass revocation'
            FROM unnest(CAST(:jtis AS text[]) || ARRAY(SELECT 'mass-' || g
                                                     FROM generate_series(1, :n) g)) AS jti
            RETURNING id)
        SELECT count(pg_notify('broker_events',
                               json_build_object('type', 'revocation', 'id', id)::text))
        FROM added"""
    rows = _sql(db, statement, t=tenant_id, now=now, jtis=jtis, n=mass)
    assert rows[0][0] == mass + len(jtis)


def test_100k_revocations_in_the_log_cost_the_other_replica_a_few_reads(
    make_broker: BrokerFactory, pg_url: str, stack: contextlib.ExitStack,
) -> None:
    first, second = _two_replicas(make_broker, pg_url, stack)
    agent = _agent(first)
    real = [first.token(agent["client_id"], agent["client_secret"]) for _ in range(3)]
    spared = first.token(agent["client_id"], agent["client_secret"])
    verified = [_verified(second, t) for t in real]
    follower = Statements(second.services.db.engine, stack)
    acting = Statements(first.services.db.engine, stack)

    started = time.monotonic()
    _revoke_in_log(first.services.db, agent["tenant_id"], [_jti(t) for t in real], MASS)
    committed = time.monotonic()
    wait_for(lambda: len(_gate(second)) >= MASS + len(real), timeout=20,
             what=lambda: f"the revocations on the other replica ({len(_gate(second))} seen)")
    applied = time.monotonic()
    wait_for(lambda: len(_gate(first)) >= MASS + len(real), timeout=20,
             what="the revocations on the first replica")
    reads = follower.reads_by_thread("broker-bus")
    print(f"\n{MASS + len(real)} revocations written in {committed - started:.2f} s, "
          f"applied by the other replica {applied - committed:.2f} s after the commit "
          f"with {len(reads)} reads; the writing replica read "
          f"{len(acting.reads_by_thread('broker-bus'))} times")
    assert len(reads) <= 10 + MASS // FETCH_CHUNK, reads
    assert len(reads) <= 10  # what batching achieves: the first batch reads the whole burst
    assert not any(_gate(second).is_live(v) for v in verified)
    assert _gate(second).is_live(_verified(second, spared))


def test_tokens_revoked_in_a_mass_revocation_are_refused_by_the_other_replica(
    make_broker: BrokerFactory, pg_url: str, stack: contextlib.ExitStack,
) -> None:
    first, second = _two_replicas(make_broker, pg_url, stack)
    agent = _agent(first)
    real = [first.token(agent["client_id"], agent["client_secret"]) for _ in range(5)]
    spared = first.token(agent["client_id"], agent["client_secret"])
    _revoke_in_log(first.services.db, agent["tenant_id"], [_jti(t) for t in real], 20_000)
    wait_for(lambda: all(_refused_over_http(second, t) for t in real),
             what="the revoked tokens refused by the other replica")
    assert not _refused_over_http(second, spared)
    probe = second.client.get("/v1/models", headers={"authorization": f"Bearer {real[0]}"})
    assert probe.status_code in (401, 404)


# --- the set-based release leaves what the ledger's one-by-one release leaves ---------------


def _one_by_one(conn: Connection, column: str, ident: str, cutoff: int, now: int) -> int:
    """The release as it was before it was set-based: the ledger's, slice after slice."""
    s = _slice.c
    rows = conn.execute(
        update(_slice)
        .where(s[column] == ident, s.kind == "token", s.released_at.is_(None),
               s.revoked_at.is_(None), s.issued_at <= cutoff)
        .values(revoked_at=now).returning(s.jti, s.issued_at)).all()
    ledger.revoke_descendants(conn, [str(r[0]) for r in rows], now)
    ordered = sorted(rows, key=lambda r: (-int(r[1]), str(r[0])))
    return sum(ledger.release_slice(conn, str(r[0]), now) for r in ordered)


def _state(conn: Connection) -> list[list[tuple[Any, ...]]]:
    return [[tuple(r) for r in conn.execute(text(q))] for q in (
        "SELECT jti, released_at, revoked_at, budget_micros, spent_micros, held_micros, kind,"
        " parent_jti, workload_id FROM token_slice ORDER BY jti",
        "SELECT id, scope, scope_id, period, window_start, reserved_micros, spent_micros"
        " FROM budget_counter ORDER BY id",
        "SELECT workload_id, count FROM live_slices ORDER BY workload_id",
    )]


def _event(hold: str, jti: str, cost: int, now: int) -> dict[str, Any]:
    return {"id": hold, "request_id": hold, "ts": now, "tenant_id": "tn", "workload_id": "wl",
            "jti": jti, "model": "m", "provider": "p", "cost_micros": cost, "status": "ok"}


def _every_kind_of_slice(conn: Connection, tag: str, now: int) -> None:
    """The workload ``wl_<tag>``'s slices: plain, spent, overrun, empty, with an open hold,
    delegated to another workload (two levels, one child still holding), delegated to itself,
    carved from a grant, funding a job; and one issued after the cut-off."""
    wl, other = f"wl_{tag}", f"ot_{tag}"
    budgets = [BudgetRef("org", "org", "hour", 10**12), BudgetRef("tenant", "tn", "day", 10**12),
               BudgetRef("workload", wl, "total", 10**12)]

    def root(jti: str, amount: int, issued_at: int = now - 10, kind: str = "token") -> None:
        ledger.reserve_slice(conn, jti=jti, workload_id=wl, tenant_id="tn", amount=amount,
                             budgets=budgets, issued_at=issued_at, expires_at=now + 600,
                             kind=kind)

    def child(jti: str, parent: str, amount: int, workload: str = other,
              issued_at: int = now - 5) -> None:
        assert ledger.reserve_child_slice(conn, jti=jti, parent=parent, workload_id=workload,
                                          tenant_id="tn", amount=amount, issued_at=issued_at,
                                          expires_at=now + 600)

    def spend(jti: str, cost: int, hold_amount: int | None = None) -> None:
        hold = f"h-{jti}-{secrets.token_hex(3)}"
        ledger.place_hold(conn, hold_id=hold, jti=jti, amount=hold_amount or cost, now=now)
        ledger.settle_hold(conn, hold_id=hold, cost=cost, event=_event(hold, jti, cost, now))

    for i, amount in enumerate((1_000, 2_000, 0, 700)):
        root(f"r{i}", amount)
    spend("r1", 300)
    spend("r3", 900, hold_amount=700)  # an overrun: the provider billed past the slice
    root("held", 1_000)
    ledger.place_hold(conn, hold_id="open-hold", jti="held", amount=50, now=now)
    root("deleg", 5_000)
    child("c1", "deleg", 2_000)
    # Issued after its parent, as delegation is: the one-by-one release relies on that order
    # (the set-based one does not).
    child("g1", "c1", 500, issued_at=now - 4)
    spend("g1", 120)
    child("c2", "deleg", 1_000)
    ledger.place_hold(conn, hold_id="open-child-hold", jti="c2", amount=10, now=now)
    root("self", 3_000)
    child("self-child", "self", 800, workload=wl, issued_at=now - 3)
    spend("self-child", 100)
    root("grant", 10_000, kind="grant")
    child("from-grant", "grant", 1_500, workload=wl)
    root("jobs", 4_000)
    assert ledger.reserve_job_slice(conn, jti="job", parent="jobs", workload_id=wl,
                                    tenant_id="tn", amount=1_000, now=now,
                                    expires_at=now + 86_400)
    root("after", 1_000, issued_at=now + 5)


def test_the_set_based_release_leaves_what_the_one_by_one_release_leaves(db: Database) -> None:
    now = int(time.time())
    tag = secrets.token_hex(3)
    db.transaction(lambda conn: _every_kind_of_slice(conn, tag, now))
    ran: dict[str, tuple[int, list[list[tuple[Any, ...]]]]] = {}
    releases: dict[str, Callable[[Connection, str, str, int, int], int]] = {
        "one by one": _one_by_one, "set-based": actions._revoke_slices}
    for name, release in releases.items():
        with db.engine.connect() as conn:
            transaction = conn.begin()
            returned = release(conn, "workload_id", f"wl_{tag}", now, now + 1)
            ran[name] = (returned, _state(conn))
            transaction.rollback()
    assert ran["set-based"] == ran["one by one"]
    returned, (slices, _counters, _live) = ran["set-based"]
    released = {row[0] for row in slices if row[1] is not None}
    # What could be released was; what still holds money (an open hold, a job) waits.
    assert {"r0", "r1", "r2", "r3", "g1", "c1", "self", "self-child", "from-grant"} <= released
    assert not {"held", "deleg", "c2", "jobs", "job", "grant", "after"} & released
    assert returned > 0


def test_a_tenant_suspension_takes_the_same_set_based_path(db: Database) -> None:
    now = int(time.time())
    tag = secrets.token_hex(3)
    db.transaction(lambda conn: _every_kind_of_slice(conn, tag, now))
    results = []
    for release in (_one_by_one, actions._revoke_slices):
        with db.engine.connect() as conn:
            transaction = conn.begin()
            results.append((release(conn, "tenant_id", "tn", now, now + 1), _state(conn)))
            transaction.rollback()
    assert results[0] == results[1]
