"""A stateful model of the ledger: any interleaving of reservations, carved (delegated and job)
slices, holds, settlements, releases and revocations keeps every cent accounted for.

After every step, read straight from the database:

- every charge (the usage events) is in the spending of a root slice; the budget counter's
  ``reserved`` is the whole budget of the unreleased root slices, and its ``spent`` what the
  released ones spent (a slice's spending moves to the counter once, at its release);
- every slice holds exactly its open holds plus what its unreleased children have left, and
  ``spent + held <= budget``;
- the counter never passes its limit (charges here stay within their holds: no overrun).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from sqlalchemy import Connection, text

from broker.errors import BudgetExhausted, InsufficientQuota, SlowDown
from broker.money import ledger
from broker.money.ledger import BudgetRef
from broker.storage.db import Database, make_engine, migrate

LIMIT = 5_000
NOW = 1_800_000_000
BUDGETS = [BudgetRef("org", "org", "total", LIMIT)]
_ids = itertools.count()


def _db() -> Database:
    path = Path(_DIR[0]) / "model.db"
    if not path.exists():
        migrate(make_engine(f"sqlite:///{path}"))
    return Database(make_engine(f"sqlite:///{path}"))


_DIR: list[str] = []


def _wipe(conn: Connection) -> None:
    for table in ("usage_event", "hold", "slice_counter", "token_slice", "budget_counter",
                  "live_slices"):
        conn.execute(text(f"DELETE FROM {table}"))


class LedgerModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.db = _db()
        self.db.transaction(_wipe)
        self.slices: list[str] = []
        self.holds: dict[str, int] = {}  # open hold -> amount
        self.charged = 0

    def teardown(self) -> None:
        self.db.dispose()

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(_ids)}"

    @rule(amount=st.integers(0, 2_000))
    def reserve(self, amount: int) -> None:
        jti = self._id("t")

        def txn(conn: Connection) -> None:
            ledger.reserve_slice(conn, jti=jti, workload_id="wl", tenant_id="tn", amount=amount,
                                 budgets=BUDGETS, issued_at=NOW, expires_at=NOW + 300)

        try:
            self.db.transaction(txn)
        except (BudgetExhausted, SlowDown):
            return
        self.slices.append(jti)

    @rule(data=st.data(), amount=st.integers(0, 1_000), job=st.booleans())
    def carve(self, data: st.DataObject, amount: int, job: bool) -> None:
        if not self.slices:
            return
        parent = data.draw(st.sampled_from(self.slices))
        jti = self._id("j" if job else "c")

        def txn(conn: Connection) -> bool:
            if job:
                return ledger.reserve_job_slice(conn, jti=jti, parent=parent, workload_id="wl",
                                                tenant_id="tn", amount=amount, now=NOW,
                                                expires_at=NOW + 86_400)
            return ledger.reserve_child_slice(conn, jti=jti, parent=parent, workload_id="wl",
                                              tenant_id="tn", amount=amount, issued_at=NOW,
                                              expires_at=NOW + 300)

        try:
            made = self.db.transaction(txn)
        except SlowDown:
            return
        if made:
            self.slices.append(jti)

    @rule(data=st.data(), amount=st.integers(1, 800))
    def hold(self, data: st.DataObject, amount: int) -> None:
        if not self.slices:
            return
        jti = data.draw(st.sampled_from(self.slices))
        hold_id = self._id("h")
        try:
            self.db.transaction(lambda conn: ledger.place_hold(
                conn, hold_id=hold_id, jti=jti, amount=amount, now=NOW))
        except InsufficientQuota:
            return
        self.holds[hold_id] = amount

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        if not self.holds:
            return
        hold_id = data.draw(st.sampled_from(sorted(self.holds)))
        cost = data.draw(st.integers(0, self.holds[hold_id]))
        done = self.db.transaction(lambda conn: ledger.settle_hold(
            conn, hold_id=hold_id, cost=cost, event={"request_id": hold_id, "ts": NOW,
                                                     "model": "m", "provider": "p",
                                                     "status": "ok"}))
        assert done is not None and done.excess == 0
        del self.holds[hold_id]
        self.charged += cost

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if self.slices:
            jti = data.draw(st.sampled_from(self.slices))
            self.db.transaction(lambda conn: ledger.release_slice(conn, jti, NOW + 1))

    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        if not self.slices:
            return
        jti = data.draw(st.sampled_from(self.slices))

        def txn(conn: Connection) -> None:
            conn.execute(text("UPDATE token_slice SET revoked_at = :now WHERE jti = :jti "
                              "AND revoked_at IS NULL"), {"now": NOW + 1, "jti": jti})
            ledger.revoke_descendants(conn, [jti], NOW + 1)

        self.db.transaction(txn)

    # --- what must hold after every step ---------------------------------------------------

    def _rows(self, sql: str) -> list[Any]:
        return list(self.db.transaction(lambda conn: conn.execute(text(sql)).all()))

    @invariant()
    def the_counter_holds_live_roots_and_what_released_roots_spent(self) -> None:
        counter = self._rows("SELECT reserved_micros, spent_micros FROM budget_counter")
        reserved, spent = (int(counter[0][0]), int(counter[0][1])) if counter else (0, 0)
        events = self._rows("SELECT COALESCE(SUM(cost_micros), 0) FROM usage_event")
        roots_spent = self._rows("SELECT COALESCE(SUM(spent_micros), 0) FROM token_slice "
                                 "WHERE parent_jti IS NULL")
        assert int(roots_spent[0][0]) == int(events[0][0]) == self.charged
        # A live root's whole budget stays reserved; a released one's spending is in spent.
        live = self._rows("SELECT COALESCE(SUM(budget_micros), 0) FROM token_slice "
                          "WHERE parent_jti IS NULL AND released_at IS NULL")
        assert reserved == int(live[0][0])
        released = self._rows("SELECT COALESCE(SUM(spent_micros), 0) FROM token_slice "
                              "WHERE parent_jti IS NULL AND released_at IS NOT NULL")
        assert spent == int(released[0][0])
        assert reserved >= 0 and reserved + spent <= LIMIT

    @invariant()
    def every_slice_holds_its_holds_and_its_live_children(self) -> None:
        slices = self._rows("SELECT jti, budget_micros, spent_micros, held_micros FROM token_slice")
        holds = dict(self._rows("SELECT jti, SUM(amount_micros) FROM hold GROUP BY jti"))
        children = dict(self._rows(
            "SELECT parent_jti, SUM(budget_micros - spent_micros) FROM token_slice "
            "WHERE parent_jti IS NOT NULL AND released_at IS NULL GROUP BY parent_jti"))
        for jti, budget, spent, held in slices:
            assert held == int(holds.get(jti, 0)) + int(children.get(jti, 0)), jti
            assert spent >= 0 and spent + held <= budget, jti


@pytest.fixture(autouse=True)
def _workdir(tmp_path: Path) -> None:
    _DIR[:] = [str(tmp_path)]


TestLedgerModel = LedgerModel.TestCase
TestLedgerModel.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
