"""The event bus: a message published in a transaction reaches every subscriber of its type at
commit (on SQLite the buses of this process, on PostgreSQL every replica's, the publisher's own
included), never when the transaction rolls back; catch-ups and periodic tasks run every
interval; a failing handler or task, an unknown type or a malformed payload stops nothing."""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Connection, func, select

from broker.storage.audit import record
from broker.storage.bus import EventBus, MalformedMessage, Message, publish
from broker.storage.db import Database, make_engine
from broker.storage.models import AuditEvent
from tests.support import wait_for

_audit = AuditEvent.__table__  # type: ignore[attr-defined]

Factory = Callable[..., Database]


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as resources:
        yield resources


@pytest.fixture
def database(stack: contextlib.ExitStack) -> Factory:
    """Opens a Database (a replica's connection pool) on a URL, closed after the test."""

    def open_database(url: str) -> Database:
        db = Database(make_engine(url))
        stack.callback(db.dispose)
        return db

    return open_database


def _bus(stack: contextlib.ExitStack, db: Database, interval_s: float = 60.0) -> EventBus:
    bus = EventBus(db, interval_s)
    stack.callback(bus.stop)
    return bus


class Inbox:
    """What a handler received, and whether the change published with it was visible then."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.messages: list[Message] = []
        self.saw_commit: list[bool] = []
        self._lock = threading.Lock()

    def __call__(self, message: Message) -> None:
        target = message.get_str("target")
        seen = self._db.read_transaction(lambda c: c.execute(
            select(func.count()).select_from(_audit).where(_audit.c.target == target)).scalar_one())
        with self._lock:
            self.messages.append(message)
            self.saw_commit.append(seen == 1)

    def targets(self) -> list[str]:
        with self._lock:
            return [m.get_str("target") for m in self.messages]

    def has(self, target: str) -> bool:
        return target in self.targets()


def _change(conn: Connection, message_type: str, target: str) -> None:
    """A change and its message in one transaction, as a domain operation makes them."""
    record(conn, "test", "bus.test", target, {}, int(time.time()))
    publish(conn, message_type, {"target": target, "n": 1})


def _replicas(url: str, database: Factory) -> tuple[Database, list[Database]]:
    """The publisher's Database and the Databases whose buses must hear it: on SQLite the
    publisher's own (one process); on PostgreSQL another replica's too."""
    publisher = database(url)
    if publisher.is_sqlite:
        return publisher, [publisher]
    return publisher, [publisher, database(url)]


def test_a_message_reaches_the_subscribers_of_its_type_after_commit(
    db_url: str, database: Factory, stack: contextlib.ExitStack
) -> None:
    publisher, listeners = _replicas(db_url, database)
    inboxes, others = [], []
    for db in listeners:
        inbox, other = Inbox(db), Inbox(db)
        bus = _bus(stack, db)
        bus.on("grant", inbox)
        bus.on("alert", other)
        bus.start()
        assert wait_for(bus.listening.is_set) < 10
        inboxes.append(inbox)
        others.append(other)

    publisher.transaction(lambda c: _change(c, "grant", "g1"))
    for inbox, other in zip(inboxes, others, strict=True):
        wait_for(functools.partial(inbox.has, "g1"), what="the grant message")
        assert inbox.targets() == ["g1"]
        assert inbox.saw_commit == [True]  # delivered after the commit, never before
        message = inbox.messages[0]
        assert message.type == "grant" and message.fields == {"target": "g1", "n": 1}
        assert message.get_int("n") == 1
        assert other.messages == []


def test_a_rolled_back_transaction_announces_nothing(
    db_url: str, database: Factory, stack: contextlib.ExitStack
) -> None:
    publisher, listeners = _replicas(db_url, database)
    inboxes = []
    for db in listeners:
        inbox = Inbox(db)
        bus = _bus(stack, db)
        bus.on("grant", inbox)
        bus.start()
        assert wait_for(bus.listening.is_set) < 10
        inboxes.append(inbox)

    def fails(conn: Connection) -> None:
        _change(conn, "grant", "lost")
        raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        publisher.transaction(fails)
    publisher.transaction(lambda c: _change(c, "grant", "kept"))
    # Messages arrive in commit order: once the later one is in, the earlier would have been.
    for inbox in inboxes:
        wait_for(functools.partial(inbox.has, "kept"), what="the committed message")
        assert inbox.targets() == ["kept"]


def test_a_batch_subscriber_gets_the_waiting_messages_at_once_in_order(
    db_url: str, database: Factory, stack: contextlib.ExitStack
) -> None:
    publisher, listeners = _replicas(db_url, database)
    count = 300
    subscribers = []
    for db in listeners:
        batches: list[list[int]] = []
        singles: list[int] = []
        bus = _bus(stack, db)
        bus.on_batch("grant", functools.partial(_numbers_into, batches))
        bus.on("grant", functools.partial(_number_into, singles))
        bus.start()
        assert wait_for(bus.listening.is_set) < 10
        subscribers.append((batches, singles))

    def burst(conn: Connection) -> None:
        for n in range(count):
            publish(conn, "grant", {"n": n})

    publisher.transaction(burst)
    for batches, singles in subscribers:
        wait_for(lambda: sum(map(len, batches)) == count, what="the whole burst")
        assert [n for batch in batches for n in batch] == list(range(count))
        # A subscriber registered with ``on`` still gets every message, one by one.
        wait_for(lambda: len(singles) == count, what="the burst, one by one")
        assert singles == list(range(count))
        if publisher.is_sqlite:
            assert len(batches) == 1  # one transaction's messages are queued together
        else:
            # PostgreSQL sends them as they fit in its packets: a few batches, not 300.
            assert len(batches) < count // 10, [len(b) for b in batches]


def _numbers_into(batches: list[list[int]], messages: list[Message]) -> None:
    batches.append([m.get_int("n") for m in messages])


def _number_into(singles: list[int], message: Message) -> None:
    singles.append(message.get_int("n"))


def test_a_message_published_before_the_bus_started_is_not_delivered_later(
    sqlite_url: str, database: Factory, stack: contextlib.ExitStack
) -> None:
    db = database(sqlite_url)
    inbox = Inbox(db)
    bus = _bus(stack, db)
    bus.on("grant", inbox)
    db.transaction(lambda c: _change(c, "grant", "before"))  # nobody in this process listens
    bus.start()
    db.transaction(lambda c: _change(c, "grant", "after"))
    wait_for(lambda: "after" in inbox.targets(), what="the message published once started")
    assert inbox.targets() == ["after"]


def test_catch_ups_and_periodic_tasks_run_every_interval(
    db_url: str, database: Factory, stack: contextlib.ExitStack
) -> None:
    db = database(db_url)
    ran: list[str] = []
    bus = _bus(stack, db, interval_s=0.05)
    bus.on("revocation", lambda _message: None, catch_up=lambda: ran.append("catch-up"))
    bus.every_interval(lambda: ran.append("task"))
    bus.start()
    wait_for(lambda: ran.count("task") >= 3, what=lambda: f"three ticks (ran {ran})")
    # Each tick runs the catch-ups first: a task may rely on what they read.
    assert ran[:6] == ["catch-up", "task"] * 3


def test_a_subscriber_added_after_start_is_served(
    sqlite_url: str, database: Factory, stack: contextlib.ExitStack
) -> None:
    db = database(sqlite_url)
    bus = _bus(stack, db)
    bus.start()
    inbox = Inbox(db)
    bus.on("grant", inbox)
    db.transaction(lambda c: _change(c, "grant", "late"))
    wait_for(lambda: inbox.targets() == ["late"], what="the message to a late subscriber")


def test_a_failing_handler_or_task_does_not_stop_the_bus(
    db_url: str, database: Factory, stack: contextlib.ExitStack
) -> None:
    db = database(db_url)
    inbox = Inbox(db)
    ticks: list[float] = []

    def broken(_message: Message) -> None:
        raise RuntimeError("a handler's bug")

    def broken_task() -> None:
        raise RuntimeError("the database is down")

    bus = _bus(stack, db, interval_s=0.05)
    bus.on("grant", broken)
    bus.on("grant", inbox)  # the next handler of the same message still runs
    bus.every_interval(broken_task)
    bus.every_interval(lambda: ticks.append(time.monotonic()))
    bus.start()
    assert wait_for(bus.listening.is_set) < 10
    db.transaction(lambda c: _change(c, "grant", "first"))
    db.transaction(lambda c: _change(c, "grant", "second"))
    wait_for(lambda: inbox.targets() == ["first", "second"], what="both messages")
    seen = len(ticks)
    wait_for(lambda: len(ticks) >= seen + 2, what="ticks after the failures")


def test_malformed_messages_a_wrong_field_and_unknown_types_are_ignored(
    sqlite_url: str, database: Factory
) -> None:
    db = database(sqlite_url)
    got: list[int] = []
    bus = EventBus(db, 60.0)
    bus.on("revocation", lambda message: got.append(message.get_int("id")))
    for payload in ("not json", "[1, 2]", '{"id": 1}', '{"type": 7, "id": 1}',
                    json.dumps({"type": "grant", "id": 1}),  # nobody subscribed to grants
                    json.dumps({"type": "revocation", "id": "1; DROP TABLE"}),
                    json.dumps({"type": "revocation", "id": True}),
                    json.dumps({"type": "revocation", "id": 5})):
        bus.dispatch(payload)
    assert got == [5]


def test_message_fields_are_checked_when_read() -> None:
    message = Message("grant", {"id": "7", "flag": True, "n": 3, "name": "x"})
    assert message.get_int("n") == 3 and message.get_str("name") == "x"
    for read, name in ((message.get_int, "id"), (message.get_int, "flag"),
                       (message.get_int, "missing"), (message.get_str, "n")):
        with pytest.raises(MalformedMessage):
            read(name)


def test_publish_refuses_what_postgresql_would_not_carry(db_url: str, database: Factory) -> None:
    db = database(db_url)
    with pytest.raises(ValueError, match="type"):
        db.transaction(lambda c: publish(c, "grant", {"type": "alert"}))
    with pytest.raises(ValueError, match="larger"):
        db.transaction(lambda c: publish(c, "grant", {"blob": "x" * 8000}))


def test_stop_ends_the_thread_at_once_and_clears_listening(
    db_url: str, database: Factory
) -> None:
    db = database(db_url)
    bus = EventBus(db, 60.0)
    bus.start()
    assert wait_for(bus.listening.is_set) < 10
    started = time.monotonic()
    bus.stop()
    assert time.monotonic() - started < 2
    assert not bus.listening.is_set()
