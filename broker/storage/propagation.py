"""How every replica's memory keeps in step with the others: a background thread on a
PostgreSQL ``LISTEN`` connection that dispatches notifications by type, plus periodic tasks (the
catch-up read of the revocation log first). On SQLite, one process, only the periodic tasks run.
See :mod:`broker.revocation.revocation` for what the notifications carry and why only ids.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from broker.revocation import revocation
from broker.revocation.revocation import CHANNEL, Denylist
from broker.storage.db import Database

log = logging.getLogger("broker.propagation")

Handler = Callable[[dict[str, Any]], None]


class Propagator:
    """A background thread that keeps this replica's memory in step with the others.

    On PostgreSQL it waits on ``LISTEN`` and dispatches each message by its ``type``; every
    ``interval_s`` (and after each reconnect) it runs the periodic tasks, the first of which
    is the catch-up read of the revocation log. On SQLite only the periodic tasks run.
    """

    POLL_S = 0.25  # how quickly a stop request is noticed

    def __init__(self, db: Database, denylist: Denylist, interval_s: float):
        self._db = db
        self._denylist = denylist
        self._interval = interval_s
        self._handlers: dict[str, list[Handler]] = {"revocation": [self._on_revocation]}
        self._periodic: list[Callable[[], None]] = [self.catch_up]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = threading.Event()  # set while a LISTEN connection is up

    def on(self, message_type: str, handler: Handler) -> None:
        self._handlers.setdefault(message_type, []).append(handler)

    def every_interval(self, task: Callable[[], None]) -> None:
        self._periodic.append(task)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="broker-propagation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def catch_up(self) -> None:
        now = int(time.time())
        self._db.read_transaction(lambda conn: revocation.catch_up(conn, self._denylist, now))
        self._denylist.prune(now)

    def _on_revocation(self, message: dict[str, Any]) -> None:
        entry_id = int(message["id"])
        if self._denylist.has_applied(entry_id):  # our own change, or the catch-up was first
            return
        entry = self._db.read_transaction(lambda conn: revocation.read_entry(conn, entry_id))
        if entry is not None:
            self._denylist.apply(entry)

    def dispatch(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            handlers = self._handlers.get(str(message.get("type")), [])
        except (ValueError, AttributeError):
            log.warning("ignored a malformed notification")
            return
        for handler in handlers:
            try:
                handler(message)
            except Exception as exc:  # one bad handler must not stop propagation
                log.warning("notification handler failed: %s", type(exc).__name__)

    def _tick(self) -> None:
        for task in self._periodic:
            try:
                task()
            except Exception as exc:  # the next tick retries; the thread must outlive outages
                log.warning("periodic propagation task failed: %s", type(exc).__name__)

    def _run(self) -> None:
        if self._db.is_sqlite:
            while not self._stop.wait(self._interval):
                self._tick()
            return
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception as exc:
                self.listening.clear()
                log.warning("revocation listener lost its connection: %s", type(exc).__name__)
                self._stop.wait(1.0)

    def _listen(self) -> None:
        with self._db.connect_dedicated() as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self.listening.set()
            # Anything committed while we were not listening is in the log.
            self._tick()
            due = time.monotonic() + self._interval
            while not self._stop.is_set():
                wait = max(0.0, min(self.POLL_S, due - time.monotonic()))
                for note in conn.notifies(timeout=wait):
                    self.dispatch(note.payload)
                if time.monotonic() >= due:
                    self._tick()
                    due = time.monotonic() + self._interval
        self.listening.clear()
