"""The event bus between replicas: a change made in one transaction is announced to every
subscriber of every replica, the publisher's own included, once (and only if) it commits.

On PostgreSQL a message is a ``NOTIFY`` on :data:`CHANNEL`, sent by :func:`publish` inside the
transaction that makes the change (PostgreSQL delivers it at commit), and each replica's
:class:`EventBus` ``LISTEN``\\s on a dedicated connection. A notification can still be missed (a
listener reconnecting, a lossy network), so each subscriber may give a catch-up that re-reads
what it may have missed; catch-ups run after every (re)connect and every interval.

On SQLite (one process) the message goes to the buses of this process instead: held with the
connection until its transaction commits, then queued to each bus, whose thread runs the
handlers, as the listening thread does on PostgreSQL. Catch-ups run every interval there too.

Messages carry ids, not state: anyone who can connect to PostgreSQL may ``NOTIFY``, so a
subscriber reads what changed from the database, and a forged message can make a replica read,
but never change, what it holds. Subscribers register by message type; this module knows none.

The thread takes every message already waiting at once (about :data:`MAX_BATCH` at most), and a
subscriber that registered with :meth:`EventBus.on_batch` gets them as one list: a burst of
100,000 revocations then costs it a read per batch, not one per message. While it reads, the
next messages pile up and come as the next batch, so the reads stay bounded however fast they
arrive.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, event, text

from broker.storage.db import Database

log = logging.getLogger("broker.bus")

CHANNEL = "broker_events"
# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more; SQLite is held to the same limit so
# that a message that works in development works in production.
MAX_PAYLOAD_BYTES = 7999
# The most messages handed over at once: bounds the memory one dispatch holds (a message is a
# few dozen bytes) while a burst of any realistic size still comes in a few batches.
MAX_BATCH = 50_000

Scalar = str | int | float | bool | None


class MalformedMessage(ValueError):
    """A message lacks a field its handler needs, or has one of the wrong type."""


@dataclass(frozen=True)
class Message:
    """One message as a subscriber receives it: its type and its other fields, unchecked (a
    forged message can hold anything): read them with :meth:`get_int` and :meth:`get_str`."""

    type: str
    fields: Mapping[str, object]

    def get_int(self, name: str) -> int:
        value = self.fields.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise MalformedMessage(f"{self.type} message: {name} is not an integer")
        return value

    def get_str(self, name: str) -> str:
        value = self.fields.get(name)
        if not isinstance(value, str):
            raise MalformedMessage(f"{self.type} message: {name} is not a string")
        return value


Handler = Callable[[Message], None]
BatchHandler = Callable[[list[Message]], None]
Task = Callable[[], None]


def publish(conn: Connection, message_type: str, fields: Mapping[str, Scalar] | None = None) -> None:
    """Announce a message to every subscriber of ``message_type`` on every replica when the
    transaction on ``conn`` commits; nothing is sent if it rolls back."""
    fields = fields or {}
    if "type" in fields:
        raise ValueError("a message's fields cannot include 'type'")
    payload = json.dumps({"type": message_type, **fields})
    if len(payload.encode()) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"a {message_type} message is larger than {MAX_PAYLOAD_BYTES} bytes")
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_notify(:channel, :payload)"),
                     {"channel": CHANNEL, "payload": payload})
    else:
        _hold(conn, payload)


# --- in-process delivery (SQLite) ----------------------------------------------------------
#
# SQLAlchemy's "commit" event fires before the commit, and a handler that reads the database
# must see the change: so messages wait on the connection's record until the pool takes the
# connection back, which is after the commit.

_PENDING = "broker_bus_pending"  # published in the transaction under way
_COMMITTED = "broker_bus_committed"  # its transaction committed; delivered at check-in


class _LocalBuses:
    """The started buses of one engine, and the pool events that feed them."""

    def __init__(self, engine: Engine) -> None:
        self._lock = threading.Lock()
        self.buses: tuple[EventBus, ...] = ()
        event.listen(engine, "begin", self._forget)
        event.listen(engine, "rollback", self._forget)
        event.listen(engine, "commit", self._committing)
        event.listen(engine, "checkin", self._checked_in)

    def add(self, bus: EventBus) -> None:
        with self._lock:
            self.buses = (*self.buses, bus)

    def remove(self, bus: EventBus) -> None:
        with self._lock:
            self.buses = tuple(b for b in self.buses if b is not bus)

    @staticmethod
    def _forget(conn: Connection) -> None:
        conn.info.pop(_PENDING, None)

    @staticmethod
    def _committing(conn: Connection) -> None:
        pending = conn.info.pop(_PENDING, None)
        if pending:
            conn.info.setdefault(_COMMITTED, []).extend(pending)

    def _checked_in(self, _dbapi_conn: Any, record: Any) -> None:
        if record is None:
            return
        committed: list[str] | None = record.info.pop(_COMMITTED, None)
        if committed:
            for bus in self.buses:
                bus.deliver(*committed)


_local: weakref.WeakKeyDictionary[Engine, _LocalBuses] = weakref.WeakKeyDictionary()
_local_lock = threading.Lock()


def _local_buses(engine: Engine) -> _LocalBuses:
    with _local_lock:
        found = _local.get(engine)
        if found is None:
            found = _local[engine] = _LocalBuses(engine)
        return found


def _hold(conn: Connection, payload: str) -> None:
    local = _local.get(conn.engine)
    if local is not None and local.buses:  # else nobody in this process would hear it
        conn.info.setdefault(_PENDING, []).append(payload)


# --- the bus -------------------------------------------------------------------------------


class EventBus:
    """A background thread that hands each message to the subscribers of its type, and runs
    the catch-ups and periodic tasks every ``interval_s`` (and on PostgreSQL after each
    (re)connect). A failing handler or task is logged and the thread goes on.

    Subscribing is safe at any time, before or after :meth:`start`.
    """

    POLL_S = 0.25  # how quickly a stop request is noticed while listening on PostgreSQL

    def __init__(self, db: Database, interval_s: float) -> None:
        self._db = db
        self._interval = interval_s
        self._lock = threading.Lock()
        self._handlers: dict[str, tuple[Handler, ...]] = {}
        self._batch_handlers: dict[str, tuple[BatchHandler, ...]] = {}
        self._catch_ups: tuple[Task, ...] = ()
        self._tasks: tuple[Task, ...] = ()
        # SQLite: the payloads of each transaction committed in this process; None wakes the
        # thread to stop.
        self._inbox: queue.SimpleQueue[tuple[str, ...] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Set while messages published elsewhere reach this bus: on PostgreSQL while the LISTEN
        # connection is up, on SQLite from start to stop.
        self.listening = threading.Event()

    def on(self, message_type: str, handler: Handler, *, catch_up: Task | None = None) -> None:
        """Call ``handler`` with every message of ``message_type``; ``catch_up``, if given,
        re-reads what a missed message would have told and runs before the periodic tasks."""
        with self._lock:
            self._handlers[message_type] = (*self._handlers.get(message_type, ()), handler)
            if catch_up is not None:
                self._catch_ups = (*self._catch_ups, catch_up)

    def on_batch(self, message_type: str, handler: BatchHandler, *,
                 catch_up: Task | None = None) -> None:
        """Like :meth:`on`, but ``handler`` gets every message of ``message_type`` that arrived
        together, in order, as one list (never empty): for a subscriber whose work per message
        is a database read it can share."""
        with self._lock:
            self._batch_handlers[message_type] = (
                *self._batch_handlers.get(message_type, ()), handler)
            if catch_up is not None:
                self._catch_ups = (*self._catch_ups, catch_up)

    def every_interval(self, task: Task) -> None:
        with self._lock:
            self._tasks = (*self._tasks, task)

    def start(self) -> None:
        self._stop.clear()
        if self._db.is_sqlite:
            _local_buses(self._db.engine).add(self)
            self.listening.set()
        self._thread = threading.Thread(target=self._run, name="broker-bus", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._db.is_sqlite:
            _local_buses(self._db.engine).remove(self)
            self.listening.clear()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def deliver(self, *payloads: str) -> None:
        """Queue the messages of a committed transaction for this bus's thread (SQLite's
        in-process delivery)."""
        self._inbox.put(payloads)

    def dispatch(self, *payloads: str) -> None:
        """Hand raw messages to the handlers of their types, in order; other types are
        ignored. The messages of one type go to each batch handler as one list."""
        by_type: dict[str, list[Message]] = {}
        for payload in payloads:
            message = _decode(payload)
            if message is not None:
                by_type.setdefault(message.type, []).append(message)
        for message_type, messages in by_type.items():
            for batch_handler in self._batch_handlers.get(message_type, ()):
                _guarded(message_type, batch_handler, messages)
            for handler in self._handlers.get(message_type, ()):
                for message in messages:
                    _guarded(message_type, handler, message)

    def tick(self) -> None:
        """Run every catch-up, then every periodic task."""
        for task in (*self._catch_ups, *self._tasks):
            try:
                task()
            except Exception as exc:  # the next tick retries; the thread must outlive outages
                log.warning("periodic bus task failed: %s", type(exc).__name__)

    def _run(self) -> None:
        if self._db.is_sqlite:
            self._run_local()
            return
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception as exc:
                self.listening.clear()
                log.warning("the event bus lost its connection: %s", type(exc).__name__)
                self._stop.wait(1.0)

    def _run_local(self) -> None:
        due = time.monotonic() + self._interval
        while not self._stop.is_set():
            try:
                first = self._inbox.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                first = None
            if first is not None:
                self.dispatch(*self._drain_inbox(first))
            if time.monotonic() >= due and not self._stop.is_set():
                self.tick()
                due = time.monotonic() + self._interval

    def _drain_inbox(self, first: tuple[str, ...]) -> list[str]:
        """``first`` and whatever else is queued already, without waiting."""
        batch = list(first)
        while len(batch) < MAX_BATCH:
            try:
                payloads = self._inbox.get_nowait()
            except queue.Empty:
                break
            if payloads is None:  # a stop request: ``_stop`` is set, the loop ends after this
                break
            batch.extend(payloads)
        return batch

    def _listen(self) -> None:
        with self._db.connect_dedicated() as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self.listening.set()
            # Anything committed while we were not listening is for the catch-ups to find.
            self.tick()
            due = time.monotonic() + self._interval
            while not self._stop.is_set():
                wait = max(0.0, min(self.POLL_S, due - time.monotonic()))
                batch = [note.payload for note in conn.notifies(timeout=wait, stop_after=1)]
                if batch:
                    self.dispatch(*_drain_notifies(conn, batch))
                if time.monotonic() >= due:
                    self.tick()
                    due = time.monotonic() + self._interval
        self.listening.clear()


def _drain_notifies(conn: Any, batch: list[str]) -> list[str]:
    """``batch`` and every notification received already, without waiting: each poll with no
    timeout reads what the socket holds, until it holds nothing."""
    while len(batch) < MAX_BATCH:
        more = [note.payload for note in conn.notifies(timeout=0)]
        if not more:
            break
        batch.extend(more)
    return batch


def _decode(payload: str) -> Message | None:
    try:
        decoded = json.loads(payload)
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict) or not isinstance(decoded.get("type"), str):
        log.warning("ignored a malformed notification")
        return None
    message_type = decoded.pop("type")
    return Message(message_type, decoded)


def _guarded(message_type: str, handler: Callable[[Any], None], argument: object) -> None:
    try:
        handler(argument)
    except Exception as exc:  # one bad handler must not stop the others, nor the bus
        log.warning("%s handler failed: %s", message_type, type(exc).__name__)
