"""How a replica's denylist keeps in step with the revocation log: filled by :func:`load` at
start, told of each new entry by the event bus, and corrected by :func:`catch_up` every
interval for any message it missed.

The replica that makes a change also applies it at once
(:func:`broker.revocation.denylist.apply_here`), so its own message finds the entry applied and
reads nothing; the messages of others are taken in batches (:func:`apply_notified`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, func, select

from broker.revocation import log as revocation_log
from broker.revocation.denylist import Denylist
from broker.revocation.log import Entry
from broker.storage.bus import EventBus, MalformedMessage, Message
from broker.storage.db import Database
from broker.storage.models import Revocation, Tenant, Workload

_log = Revocation.__table__  # type: ignore[attr-defined]
_workload = Workload.__table__  # type: ignore[attr-defined]
_tenant = Tenant.__table__  # type: ignore[attr-defined]
_logger = logging.getLogger("broker.revocation")

# The catch-up re-checks this much recent log, so an entry whose transaction committed after a
# later one (PostgreSQL sequence ids are not commit-ordered) is still seen.
CATCHUP_OVERLAP_S = 60
# Ids per ``IN (...)`` when the catch-up fetches the entries it lacks (under SQLite's old limit
# of 999 bound parameters).
FETCH_CHUNK = 900


def load(conn: Connection, denylist: Denylist, now: int) -> None:
    """Fill a fresh denylist: every log entry that still matters, then the suspensions in
    force according to the identity tables (which outlive pruned log entries)."""
    denylist.applied_since(now - CATCHUP_OVERLAP_S)
    # Through the index on ``relevant_until``, not the whole day of log kept; in any order, as
    # applying is (see Denylist.apply).
    rows = conn.execute(select(_log).where(_log.c.relevant_until > now)).all()
    denylist.apply_all([Entry.from_row(row) for row in rows])
    top = conn.execute(select(_log.c.id).order_by(_log.c.id.desc()).limit(1)).first()
    if top is not None:
        denylist.last_id = max(denylist.last_id, int(top[0]))
    suspended: dict[tuple[str, str], int] = {}
    for kind, table in (("workload", _workload), ("tenant", _tenant)):
        for ident, at in conn.execute(
            select(table.c.id, table.c.suspended_at).where(table.c.suspended_at.isnot(None))
        ).all():
            suspended[(kind, str(ident))] = int(at)
    denylist.reset_suspended(suspended)


def catch_up(conn: Connection, denylist: Denylist, now: int) -> int:
    """Apply log entries this replica may have missed; returns how many were read.

    Two kinds can be missing: entries numbered above the highest one applied (read by primary
    key), and entries of the last :data:`CATCHUP_OVERLAP_S` numbered below it, whose
    transactions committed after a later-numbered one was applied. For the second kind the
    database counts and sums the window's ids through the index on ``created_at``, and the
    denylist compares them with the ids it applied from that window: when they agree nothing
    is missing (every id applied is of a committed row), so a mass revocation is not read
    again on every tick. Only when they differ are the window's ids read, and only the entries
    missing from memory fetched.
    """
    c = _log.c
    rows = conn.execute(select(_log).where(c.id > denylist.last_id).order_by(c.id)).all()
    denylist.apply_all([Entry.from_row(row) for row in rows])
    since = now - CATCHUP_OVERLAP_S
    count, total, last_id = denylist.applied_since(since)
    window = (c.created_at >= since, c.id <= last_id)
    found = conn.execute(select(func.count(), func.coalesce(func.sum(c.id), 0)).where(*window)).one()
    # The sum too: a row deleted by hand and a late one arriving in the same tick would
    # balance the count alone.
    if (int(found[0]), int(found[1])) == (count, total):
        return len(rows)
    missing = [i for i in conn.execute(select(c.id).where(*window)).scalars()
               if not denylist.has_applied(i)]
    late: list[Any] = []
    for start in range(0, len(missing), FETCH_CHUNK):
        late.extend(conn.execute(select(_log).where(c.id.in_(missing[start:start + FETCH_CHUNK]))))
    denylist.apply_all([Entry.from_row(row) for row in late])
    return len(rows) + len(late)


def apply_notified(conn: Connection, denylist: Denylist, ids: Iterable[int]) -> int:
    """Apply the entries of the notified ``ids`` that this replica lacks; returns how many
    rows were read.

    An id already applied (our own change, or the catch-up was first) costs nothing. Those
    numbered above :attr:`Denylist.last_id` are read with everything else above it, as the
    catch-up does: one statement, which also takes the entries committed whose messages are
    still on their way, so that a burst is read by its first batch and the messages after it
    find their entries applied. Those numbered below it (their transactions committed after a
    later-numbered one was applied) are read by id, one statement per :data:`FETCH_CHUNK`."""
    c = _log.c
    last_id = denylist.last_id
    missing = sorted({i for i in ids if not denylist.has_applied(i)})
    below = [i for i in missing if i <= last_id]
    rows: list[Any] = []
    if len(below) < len(missing):
        rows.extend(conn.execute(select(_log).where(c.id > last_id).order_by(c.id)).all())
    for start in range(0, len(below), FETCH_CHUNK):
        rows.extend(conn.execute(
            select(_log).where(c.id.in_(below[start:start + FETCH_CHUNK]))).all())
    denylist.apply_all([Entry.from_row(row) for row in rows])
    return len(rows)


def follow(bus: EventBus, db: Database, denylist: Denylist) -> None:
    """Subscribe ``denylist`` to the log's messages on ``bus``, with the catch-up (and the
    prune of what can refuse nothing any more) every interval."""

    def on_messages(messages: list[Message]) -> None:
        ids = []
        for message in messages:
            try:
                ids.append(message.get_int("id"))
            except MalformedMessage:  # a forged message: the others of the batch still count
                _logger.warning("ignored a revocation message without an id")
        if any(not denylist.has_applied(i) for i in ids):
            db.read_transaction(lambda conn: apply_notified(conn, denylist, ids))

    def catch_up_now() -> None:
        now = int(time.time())
        db.read_transaction(lambda conn: catch_up(conn, denylist, now))
        denylist.prune(now)

    bus.on_batch(revocation_log.MESSAGE_TYPE, on_messages, catch_up=catch_up_now)
