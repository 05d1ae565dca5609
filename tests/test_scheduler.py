"""The scheduler: one leader among the replicas runs each job, at most once per interval, and a
restart neither repeats a job early nor forgets it."""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

from broker.storage.db import Database, make_engine
from broker.storage.scheduler import Job, Scheduler, claim, job_states
from tests.conftest import Broker
from tests.support import wait_for
from tests.test_replicas import replicas, start_replica  # noqa: F401  (fixture)


def _now_ms() -> int:
    return int(time.time() * 1000)


def test_a_run_is_claimed_once_per_interval(db_url: str) -> None:
    db = Database(make_engine(db_url))
    try:
        now = _now_ms()
        # First sight counts as a run, so nothing fires at the first start.
        assert not db.transaction(lambda c: claim(c, "job", 1000, now, "r1"))
        assert not db.transaction(lambda c: claim(c, "job", 1000, now + 999, "r1"))
        assert db.transaction(lambda c: claim(c, "job", 1000, now + 1000, "r1"))
        assert not db.transaction(lambda c: claim(c, "job", 1000, now + 1000, "r2"))
        assert db.transaction(lambda c: claim(c, "job", 1000, now + 2500, "r2"))
        (state,) = [s for s in db.transaction(job_states) if s["name"] == "job"]
        assert state["last_runner"] == "r2" and state["last_run_ms"] == now + 2500
    finally:
        db.dispose()


def test_a_restarted_scheduler_does_not_repeat_a_job_early(sqlite_url: str) -> None:
    db = Database(make_engine(sqlite_url))
    runs: list[str] = []
    try:
        first = Scheduler(db, tick_s=0.05, runner="before")
        first.add(Job("hourly", 3600, lambda: runs.append("x")))
        db.transaction(lambda c: claim(c, "hourly", 3_600_000, _now_ms() - 3_600_000, "old"))
        assert first.run_pending() == ["hourly"]  # due: it had not run for an hour
        restarted = Scheduler(db, tick_s=0.05, runner="after")
        restarted.add(Job("hourly", 3600, lambda: runs.append("y")))
        assert restarted.run_pending() == []
        assert runs == ["x"]
        (state,) = [s for s in db.transaction(job_states) if s["name"] == "hourly"]
        assert state["last_status"] == "ok" and state["last_runner"] == "before"
    finally:
        db.dispose()


def test_a_failing_job_is_recorded_and_does_not_stop_the_others(sqlite_url: str) -> None:
    db = Database(make_engine(sqlite_url))
    ran: list[str] = []

    def boom() -> None:
        raise RuntimeError("provider down")

    try:
        scheduler = Scheduler(db, tick_s=0.05)
        scheduler.add(Job("a-fails", 0.01, boom))
        scheduler.add(Job("b-works", 0.01, lambda: ran.append("b")))
        a_minute_ago = _now_ms() - 60_000  # both last ran a minute ago: both are due now
        for name in ("a-fails", "b-works"):
            db.transaction(functools.partial(claim, name=name, interval_ms=10,
                                             now_ms=a_minute_ago, runner="seed"))
        assert scheduler.run_pending() == ["a-fails", "b-works"]
        assert ran == ["b"]
        states = {s["name"]: s["last_status"] for s in db.transaction(job_states)}
        assert states["a-fails"] == "error" and states["b-works"] == "ok"
    finally:
        db.dispose()


def _scheduler(broker: Broker) -> Scheduler:
    scheduler = broker.services.scheduler
    assert scheduler is not None, "the app starts a scheduler"
    return scheduler


def test_only_one_of_two_replicas_runs_a_scheduled_job(
    make_broker: Any, pg_url: str, replicas: contextlib.ExitStack,  # noqa: F811
) -> None:
    first: Broker = make_broker(pg_url, scheduler={"tick_s": 0.05})
    second = start_replica(replicas, first.settings)
    schedulers = [_scheduler(first), _scheduler(second)]
    counts = [0, 0]

    def counter(i: int) -> Any:
        def run() -> None:
            counts[i] += 1
        return run

    for i, scheduler in enumerate(schedulers):
        scheduler.add(Job("test.count", 0.1, counter(i)))
    wait_for(lambda: sum(counts) >= 5, timeout=30)
    leaders = [s.is_leader for s in schedulers]
    assert leaders.count(True) == 1
    leader = leaders.index(True)
    assert counts[1 - leader] == 0 and counts[leader] >= 5
    # The sweeper is one of the jobs, so it too runs on the leader only.
    assert schedulers[1 - leader].runs.get("sweep", 0) == 0

    # When the leader stops, the other takes over.
    schedulers[leader].stop()
    follower_before = counts[1 - leader]
    wait_for(lambda: counts[1 - leader] > follower_before + 2, timeout=30)
    assert schedulers[1 - leader].is_leader
