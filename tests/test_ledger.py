"""The ledger's invariants, as properties: whatever sequence of reservations, holds,
settlements and releases happens, money is conserved and no cap is ever passed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, text

from broker.errors import BudgetExhausted, InsufficientQuota
from broker.money import ledger
from broker.money.ledger import BudgetRef
from broker.storage.db import Database, make_engine, migrate

LIMIT = 1_000
NOW = 1_800_000_000


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Database:
    path = Path(tmp_path_factory.mktemp("ledger")) / "ledger.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    return Database(engine)


def _wipe(conn: Connection) -> None:
    for table in ("usage_event", "hold", "slice_counter", "token_slice", "budget_counter",
                  "live_slices"):
        conn.execute(text(f"DELETE FROM {table}"))


def _totals(conn: Connection) -> tuple[int, int]:
    row = conn.execute(text("SELECT reserved_micros, spent_micros FROM budget_counter")).first()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


Op = tuple[str, int, int]
ops = st.lists(
    st.tuples(st.sampled_from(["issue", "hold", "settle", "release"]),
              st.integers(0, 7), st.integers(0, 600)),
    max_size=40,
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops)
def test_money_is_conserved_and_caps_hold(db: Database, sequence: list[Op]) -> None:
    db.transaction(_wipe)
    budget = [BudgetRef("workload", "wl_p", "total", LIMIT)]
    slices: dict[str, int] = {}
    holds: dict[str, tuple[str, int]] = {}
    excess: dict[str, int] = {}  # by slice: what was charged above the holds (overruns)

    for i, (op, who, amount) in enumerate(sequence):
        jti = f"j{who}"
        if op == "issue" and jti not in slices:
            try:
                db.transaction(lambda c: ledger.reserve_slice(
                    c, jti=jti, workload_id="wl_p", tenant_id="tn_p", amount=amount,
                    budgets=budget, issued_at=NOW, expires_at=NOW + 60))
                slices[jti] = amount
            except BudgetExhausted:
                pass
        elif op == "hold" and jti in slices:
            hid = f"h{i}"
            try:
                db.transaction(lambda c: ledger.place_hold(
                    c, hold_id=hid, jti=jti, amount=amount, now=NOW))
                holds[hid] = (jti, amount)
            except InsufficientQuota:
                pass
        elif op == "settle" and holds:
            hid = sorted(holds)[who % len(holds)]
            event: dict[str, Any] = {"request_id": hid, "ts": NOW, "model": "m", "provider": "p",
                                     "status": "ok"}
            out = db.transaction(lambda c: ledger.settle_hold(
                c, hold_id=hid, cost=amount, event=event))
            assert out is not None
            held_jti, held = holds.pop(hid)
            assert out.excess == max(0, amount - held)
            excess[held_jti] = excess.get(held_jti, 0) + out.excess
        elif op == "release" and jti in slices:
            db.transaction(lambda c: ledger.release_slice(c, jti, NOW + 61))

        def check(c: Connection) -> None:
            reserved, spent = _totals(c)
            # A cap is passed only by what providers billed above the holds, and by no more.
            assert reserved >= 0 and spent >= 0
            assert reserved + spent <= LIMIT + sum(excess.values())
            rows = c.execute(text(
                "SELECT jti, budget_micros, spent_micros, held_micros, released_at "
                "FROM token_slice")).all()
            for jti, b, s, h, _released in rows:
                assert s >= 0 and h >= 0 and s + h <= b + excess.get(jti, 0)
            # A live slice's whole budget stays reserved; its spending reaches the counter's
            # spent when it is released, and not before.
            assert reserved == sum(int(b) for _j, b, _s, _h, rel in rows if rel is None)
            assert spent == sum(int(s) for _j, _b, s, _h, rel in rows if rel is not None)
            counted = c.execute(text("SELECT count FROM live_slices")).scalar()
            assert (counted or 0) == sum(1 for *_x, rel in rows if rel is None)
            events = c.execute(text("SELECT COALESCE(SUM(cost_micros), 0) FROM usage_event")).scalar_one()
            # Every micro-dollar spent has its usage event.
            assert int(events) == sum(int(s) for _j, _b, s, _h, _rel in rows)

        db.transaction(check)


def test_a_settled_hold_is_never_charged_twice(db: Database) -> None:
    db.transaction(_wipe)
    db.transaction(lambda c: ledger.reserve_slice(
        c, jti="jx", workload_id="wl_p", tenant_id="tn_p", amount=500,
        budgets=[BudgetRef("workload", "wl_p", "total", LIMIT)], issued_at=NOW, expires_at=NOW + 60))
    db.transaction(lambda c: ledger.place_hold(c, hold_id="hx", jti="jx", amount=300, now=NOW))
    event = {"request_id": "r", "ts": NOW, "model": "m", "provider": "p", "status": "ok"}
    first = db.transaction(lambda c: ledger.settle_hold(c, hold_id="hx", cost=100, event=event))
    second = db.transaction(lambda c: ledger.settle_hold(c, hold_id="hx", cost=300, event=event))
    assert first is not None and (first.remaining, first.excess) == (400, 0) and second is None
    # The counter is not touched by a settlement: the slice's budget stays reserved until its
    # release moves what it spent into spent.
    assert db.transaction(_totals) == (500, 0)
    assert db.transaction(lambda c: ledger.release_slice(c, "jx", NOW + 61)) == 400
    assert db.transaction(_totals) == (0, 100)


def test_cost_above_the_hold_is_charged_in_full_and_passes_the_caps_visibly(db: Database) -> None:
    db.transaction(_wipe)
    db.transaction(lambda c: ledger.reserve_slice(
        c, jti="jy", workload_id="wl_p", tenant_id="tn_p", amount=500,
        budgets=[BudgetRef("workload", "wl_p", "total", LIMIT)], issued_at=NOW, expires_at=NOW + 60))
    db.transaction(lambda c: ledger.place_hold(c, hold_id="hy", jti="jy", amount=50, now=NOW))
    event = {"request_id": "r", "ts": NOW, "model": "m", "provider": "p", "status": "overrun"}
    out = db.transaction(lambda c: ledger.settle_hold(c, hold_id="hy", cost=10_000, event=event))
    assert out is not None and (out.remaining, out.excess) == (-9_500, 9_950)
    # Releasing the slice returns nothing (it has nothing left); its whole reservation became
    # spending, and the rest shows as spent beyond the cap.
    assert db.transaction(lambda c: ledger.release_slice(c, "jy", NOW + 61)) == 0
    assert db.transaction(_totals) == (0, 10_000)


def test_an_open_hold_delays_release_until_it_settles(db: Database) -> None:
    db.transaction(_wipe)
    db.transaction(lambda c: ledger.reserve_slice(
        c, jti="jz", workload_id="wl_p", tenant_id="tn_p", amount=500,
        budgets=[BudgetRef("workload", "wl_p", "total", LIMIT)], issued_at=NOW, expires_at=NOW + 60))
    db.transaction(lambda c: ledger.place_hold(c, hold_id="hz", jti="jz", amount=200, now=NOW))
    assert db.transaction(lambda c: ledger.release_slice(c, "jz", NOW + 61)) == 0
    event = {"request_id": "r", "ts": NOW, "model": "m", "provider": "p", "status": "ok"}
    db.transaction(lambda c: ledger.settle_hold(c, hold_id="hz", cost=120, event=event))
    assert db.transaction(lambda c: ledger.release_slice(c, "jz", NOW + 61)) == 380
    assert db.transaction(_totals) == (0, 120)


def test_settlements_lock_budgets_in_the_order_issuance_reserves_them(db: Database) -> None:
    # A workload budget whose counter exists before its tenant's (a tenant budget added later)
    # has the lower id; locking by id would take the two in the opposite order from issuance,
    # which PostgreSQL answers with a deadlock.
    db.transaction(_wipe)
    workload = [BudgetRef("workload", "wl_p", "total", LIMIT)]
    db.transaction(lambda c: ledger.reserve_slice(
        c, jti="j_old", workload_id="wl_p", tenant_id="tn_p", amount=1, budgets=workload,
        issued_at=NOW, expires_at=NOW + 60))
    both = [*workload, BudgetRef("tenant", "tn_p", "total", LIMIT)]
    db.transaction(lambda c: ledger.reserve_slice(
        c, jti="j_new", workload_id="wl_p", tenant_id="tn_p", amount=1, budgets=both,
        issued_at=NOW, expires_at=NOW + 60))

    def scopes(c: Connection) -> list[str]:
        ids = ledger._counter_ids(c, "j_new")
        by_id: dict[int, str] = {int(row[0]): str(row[1]) for row in
                                 c.execute(text("SELECT id, scope FROM budget_counter"))}
        return [by_id[i] for i in ids]

    assert db.transaction(scopes) == ["tenant", "workload"]


# --- grant slices: children carved out of a parent ------------------------------------------


def _grant_and_child(db: Database, grant: int, child: int) -> None:
    db.transaction(_wipe)
    db.transaction(lambda c: ledger.reserve_slice(
        c, jti="gr_1", workload_id="wl_p", tenant_id="tn_p", amount=grant,
        budgets=[BudgetRef("tenant", "tn_p", "total", LIMIT)], issued_at=NOW,
        expires_at=NOW + 600, kind="grant"))
    assert db.transaction(lambda c: ledger.reserve_child_slice(
        c, jti="jc", parent="gr_1", workload_id="wl_p", tenant_id="tn_p", amount=child,
        issued_at=NOW, expires_at=NOW + 900))


def _slice(db: Database, jti: str) -> dict[str, Any]:
    row = db.transaction(lambda c: c.execute(text(
        "SELECT budget_micros, spent_micros, held_micros, released_at, expires_at, kind "
        "FROM token_slice WHERE jti = :j"), {"j": jti}).one())
    return dict(row._mapping)


def test_a_child_slice_is_held_in_its_parent_and_its_spend_reaches_the_budgets(
        db: Database) -> None:
    _grant_and_child(db, grant=800, child=300)
    # The grant holds the child's whole slice; the tenant budget holds the grant's.
    assert _slice(db, "gr_1")["held_micros"] == 300
    assert _slice(db, "jc")["expires_at"] == NOW + 600  # never past its parent
    assert db.transaction(_totals) == (800, 0)
    # The grant is not a token: it takes no live-token place.
    assert db.transaction(lambda c: c.execute(text("SELECT count FROM live_slices")).scalar()) == 1
    db.transaction(lambda c: ledger.place_hold(c, hold_id="h1", jti="jc", amount=200, now=NOW))
    event = {"request_id": "r", "ts": NOW, "model": "m", "provider": "p", "status": "ok"}
    db.transaction(lambda c: ledger.settle_hold(c, hold_id="h1", cost=120, event=event))
    assert (_slice(db, "gr_1")["spent_micros"], _slice(db, "gr_1")["held_micros"]) == (120, 180)
    assert db.transaction(_totals) == (800, 0)  # the counter learns at the grant's release
    # The parent cannot be released while a child lives; the child returns its rest to it.
    assert db.transaction(lambda c: ledger.release_slice(c, "gr_1", NOW + 601)) == 0
    assert db.transaction(lambda c: ledger.release_slice(c, "jc", NOW + 601)) == 180
    assert _slice(db, "gr_1")["held_micros"] == 0
    assert db.transaction(lambda c: ledger.release_slice(c, "gr_1", NOW + 601)) == 680
    assert db.transaction(_totals) == (0, 120)
    assert db.transaction(lambda c: c.execute(text("SELECT count FROM live_slices")).scalar()) == 0


def test_a_child_cannot_be_carved_beyond_its_parent_nor_from_an_ended_one(db: Database) -> None:
    _grant_and_child(db, grant=500, child=400)

    def carve(amount: int, now: int = NOW) -> bool:
        return db.transaction(lambda c: ledger.reserve_child_slice(
            c, jti=f"j{amount}-{now}", parent="gr_1", workload_id="wl_p", tenant_id="tn_p",
            amount=amount, issued_at=now, expires_at=now + 60))

    assert not carve(101)
    assert carve(100)
    assert not carve(1)
    db.transaction(_wipe)
    _grant_and_child(db, grant=500, child=100)
    assert not carve(10, now=NOW + 600)  # the grant has expired
    db.transaction(lambda c: c.execute(text(
        "UPDATE token_slice SET revoked_at = :n WHERE jti = 'gr_1'"), {"n": NOW}))
    assert not carve(10)


def test_many_simultaneous_carves_never_pass_the_grant(db_url: str) -> None:
    import concurrent.futures

    engine = make_engine(db_url)
    database = Database(engine)
    try:
        database.transaction(lambda c: ledger.reserve_slice(
            c, jti="gr_race", workload_id="wl_r", tenant_id="tn_r", amount=100_000, budgets=[],
            issued_at=NOW, expires_at=NOW + 600, kind="grant"))

        def carve(n: int) -> bool:
            return database.transaction(lambda c: ledger.reserve_child_slice(
                c, jti=f"jr{n}", parent="gr_race", workload_id="wl_r", tenant_id="tn_r",
                amount=7_000, issued_at=NOW, expires_at=NOW + 60))

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            won = sum(pool.map(carve, range(64)))
        assert won == 100_000 // 7_000
        held = database.transaction(lambda c: c.execute(text(
            "SELECT held_micros FROM token_slice WHERE jti = 'gr_race'")).scalar())
        assert held == won * 7_000
    finally:
        engine.dispose()
