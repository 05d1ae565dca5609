"""Background sweeping: return the unspent part of expired slices, settle orphaned holds, and
delete slices released longer ago than ``sweeper.slice_retention_s``.

Every step is idempotent (a conditional UPDATE that matches once), so two replicas sweeping at
the same time, or a sweep interrupted by a crash, never return or charge money twice.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import Connection

from broker.money import ledger
from broker.services import Services

log = logging.getLogger("broker.sweeper")


def sweep_once(svc: Services, now: int | None = None) -> tuple[int, int]:
    """(slices released, orphaned holds settled) in this pass."""
    now = int(time.time()) if now is None else now
    orphans = svc.db.transaction(
        lambda conn: ledger.orphaned_holds(conn, now - svc.settings.sweeper.max_request_s)
    )
    settled = 0
    for hold_id, _jti, amount in orphans:
        # The provider may have billed the whole request: charge the full hold, once.
        event = {"request_id": hold_id, "ts": now, "model": "", "provider": "",
                 "status": "orphaned", "estimated": True}

        def settle(conn: Connection, hold_id: str = hold_id, amount: int = amount,
                   event: dict[str, Any] = event) -> bool:
            return ledger.settle_hold(conn, hold_id=hold_id, cost=amount, event=event) is not None

        if svc.db.transaction(settle):
            settled += 1
    released = 0
    for jti in svc.db.transaction(lambda conn: ledger.expired_open_slices(conn, now)):
        amount = svc.db.transaction(partial(ledger.release_slice, jti=jti, now=now))
        released += 1
        metrics = svc.extras.get("metrics")
        if metrics is not None and amount:
            metrics.released.inc(amount)
    before = now - svc.settings.sweeper.slice_retention_s
    svc.db.transaction(lambda conn: ledger.prune_released_slices(conn, before))
    return released, settled


async def run_sweeper(svc: Services) -> None:
    interval = svc.settings.sweeper.interval_s
    while True:
        try:
            await anyio.to_thread.run_sync(sweep_once, svc)
        except Exception as exc:  # the sweeper must outlive a database hiccup
            log.warning("sweep failed: %s", type(exc).__name__)
        await anyio.sleep(interval)
