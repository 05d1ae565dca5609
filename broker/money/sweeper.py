"""Background sweeping: return the unspent part of expired slices, settle orphaned holds, and
delete slices released longer ago than ``sweeper.slice_retention_s``.

Every step is idempotent (a conditional UPDATE that matches once), so two replicas sweeping at
the same time, or a sweep interrupted by a crash, never return or charge money twice.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from sqlalchemy import Connection

from broker.metrics import Metrics
from broker.money import ledger
from broker.money.outcome import Outcome
from broker.settings import SweeperSettings
from broker.storage.db import Database


def sweep_once(db: Database, settings: SweeperSettings, metrics: Metrics,
               now: int | None = None) -> tuple[int, int]:
    """(slices released, orphaned holds settled) in this pass."""
    now = int(time.time()) if now is None else now
    orphans = db.transaction(
        lambda conn: ledger.orphaned_holds(conn, now - settings.max_request_s)
    )
    settled = 0
    for hold_id, _jti, amount in orphans:
        # The provider may have billed the whole request: charge the full hold, once.
        event = {"request_id": hold_id, "ts": now, "model": "", "provider": "",
                 "status": Outcome.ORPHANED.value, "estimated": True}

        def settle(conn: Connection, hold_id: str = hold_id, amount: int = amount,
                   event: dict[str, Any] = event) -> bool:
            return ledger.settle_hold(conn, hold_id=hold_id, cost=amount, event=event) is not None

        if db.transaction(settle):
            settled += 1
    released = 0
    for jti in db.transaction(lambda conn: ledger.expired_open_slices(conn, now)):
        amount = db.transaction(partial(ledger.release_slice, jti=jti, now=now))
        released += 1
        if amount:
            metrics.released.inc(amount)
    before = now - settings.slice_retention_s
    db.transaction(lambda conn: ledger.prune_released_slices(conn, before))
    return released, settled
