"""One in-process scheduler for the jobs that must run somewhere, but only once: sweeping,
signing-key rotation and retirement, provider-key rotation, pruning the revocation log.

Every replica runs a scheduler; only the leader runs jobs. Leadership is a PostgreSQL session
advisory lock held on a dedicated connection: it is released when the leader stops or its
connection dies, and a follower takes it at its next tick. On SQLite (one process) the
scheduler always leads.

Each run is also claimed in the ``scheduled_job`` table by a conditional UPDATE on its last-run
time, so a job runs at most once per interval even if two replicas believed they led, and
after a restart it waits out the rest of its interval instead of running again at once. Jobs
themselves are idempotent: a run cut short by a crash is simply repeated.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from broker.storage.db import Database
from broker.storage.models import ScheduledJob

log = logging.getLogger("broker.scheduler")

_job = ScheduledJob.__table__  # type: ignore[attr-defined]

# pg_advisory_lock key shared by every replica of one database ("broker" in ASCII).
LEADER_LOCK_KEY = 0x62726F6B6572


@dataclass(frozen=True)
class Job:
    name: str
    interval_s: float
    run: Callable[[], object]


def _now_ms() -> int:
    return int(time.time() * 1000)


def claim(conn: Connection, name: str, interval_ms: int, now_ms: int, runner: str) -> bool:
    """Take this period's run of ``name``: True for exactly one caller per interval. A job seen
    for the first time counts as just run, so its first run comes one interval after the
    first start (a fresh deployment does not rotate a key it created a moment ago)."""
    ins: Any = pg_insert(_job) if conn.dialect.name == "postgresql" else sqlite_insert(_job)
    conn.execute(
        ins.values(name=name, last_run_ms=now_ms, last_status="new", last_runner=runner,
                   last_duration_ms=0).on_conflict_do_nothing()
    )
    c = _job.c
    row = conn.execute(
        update(_job)
        .where(c.name == name, c.last_run_ms <= now_ms - interval_ms)
        .values(last_run_ms=now_ms, last_status="running", last_runner=runner)
        .returning(c.name)
    ).first()
    return row is not None


def finish(conn: Connection, name: str, status: str, duration_ms: int) -> None:
    c = _job.c
    conn.execute(
        update(_job).where(c.name == name).values(last_status=status, last_duration_ms=duration_ms)
    )


def job_states(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(select(_job).order_by(_job.c.name)).all()
    return [
        {"name": r.name, "last_run_ms": r.last_run_ms, "last_status": r.last_status,
         "last_runner": r.last_runner, "last_duration_ms": r.last_duration_ms}
        for r in rows
    ]


class Scheduler:
    def __init__(self, db: Database, tick_s: float, runner: str | None = None):
        self._db = db
        self._tick = tick_s
        self.runner = runner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._jobs: dict[str, Job] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None  # the PostgreSQL session that holds (or tries for) the lock
        self._leader = db.is_sqlite
        self.runs: dict[str, int] = {}  # runs made by this replica, by job name

    @property
    def is_leader(self) -> bool:
        return self._leader

    def add(self, job: Job) -> None:
        self._jobs[job.name] = job

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="broker-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop running jobs and give up leadership (closing the session drops the lock)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._drop_connection()

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a dead session may fail; it is gone
                self._conn.close()
        self._conn = None
        self._leader = self._db.is_sqlite

    def try_lead(self) -> bool:
        """Keep or take leadership; False while another replica holds it."""
        if self._db.is_sqlite:
            return True
        try:
            if self._conn is None:
                self._conn = self._db.connect_dedicated()
            if self._leader:
                self._conn.execute("SELECT 1")  # still our session, so still our lock
            else:
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,))
                self._leader = bool(row.fetchone()[0])
                if self._leader:
                    log.info("scheduler %s is now the leader", self.runner)
        except Exception as exc:
            log.warning("scheduler lost its database session: %s", type(exc).__name__)
            self._drop_connection()
            return False
        return self._leader

    def run_pending(self) -> list[str]:
        """Run every job that is due and that this replica claims; returns their names."""
        ran: list[str] = []
        for job in list(self._jobs.values()):
            if self._stop.is_set():
                break
            now_ms = _now_ms()
            interval_ms = int(job.interval_s * 1000)
            try:
                claimed = self._db.transaction(
                    functools.partial(claim, name=job.name, interval_ms=interval_ms,
                                      now_ms=now_ms, runner=self.runner)
                )
            except Exception as exc:
                log.warning("could not claim job %s: %s", job.name, type(exc).__name__)
                continue
            if not claimed:
                continue
            started = time.monotonic()
            status = "ok"
            try:
                job.run()
            except Exception as exc:  # a failed run is retried at its next interval
                status = "error"
                log.warning("scheduled job %s failed: %s", job.name, type(exc).__name__)
            self.runs[job.name] = self.runs.get(job.name, 0) + 1
            ran.append(job.name)
            took = int((time.monotonic() - started) * 1000)
            try:
                self._db.transaction(
                    functools.partial(finish, name=job.name, status=status, duration_ms=took)
                )
            except Exception as exc:  # only bookkeeping: the claim already recorded the run
                log.warning("could not record job %s: %s", job.name, type(exc).__name__)
        return ran

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.try_lead():
                self.run_pending()
            self._stop.wait(min([self._tick, *(j.interval_s for j in self._jobs.values())]))
