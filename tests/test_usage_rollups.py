"""Usage over time: the hourly and daily rollups equal the raw events they came from, exactly once
(also with two replicas rolling up at the same time on PostgreSQL); retention deletes only what
was rolled up and changes no total; totals and hour/day series through the API equal what the
raw events give, over whole and partial hours; and the CSV export streams every field, safe to
open in a spreadsheet, within what the caller may see."""

from __future__ import annotations

import csv
import functools
import io
import random
import secrets
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, func, insert, select, text

from broker.api.views import iso
from broker.identity.identities import Actor
from broker.jobs import scheduled_jobs
from broker.money import rollups, usage
from broker.money.rollups import prune_raw, rollup_once, rollup_pending
from broker.storage.db import MIGRATIONS_DIR, Database, make_engine
from broker.storage.models import UsageEvent
from broker.storage.usage_models import UsageRollup
from tests.conftest import PG_ADMIN_URL, Broker
from tests.fake_provider import FakeProviderServer
from tests.gateway_support import Env, make_env
from tests.support import assert_problem, wait_for

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, a Thursday
HOUR = 3600
DAY = 86_400
MODELS = ("gpt-4o-mini", "claude-3-5-haiku", "o3")
SUMS = ("requests", "prompt_tokens", "completion_tokens", "cost_micros")
EXPORT_HEADER = ["request_id", "ts", "tenant_id", "workload_id", "jti", "model", "provider",
                 "prompt_tokens", "completion_tokens", "cost_micros", "status", "latency_ms",
                 "stream", "client_ip"]

_usage = UsageEvent.__table__  # type: ignore[attr-defined]
_rollup = UsageRollup.__table__  # type: ignore[attr-defined]

ORG = Actor(id="admin", tenant_id="tn_org", roles=frozenset({"org-admin"}))

Event = dict[str, Any]


# --- events and what they sum to ---------------------------------------------------------------


def make_events(owners: list[tuple[str, str]], count: int, start: int, span: int,
                seed: int = 7) -> list[Event]:
    """``count`` events at random seconds of ``[start, start + span)``, of random
    ``(tenant_id, workload_id)`` owners and models."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        tenant_id, workload_id = rng.choice(owners)
        out.append({
            "id": f"hd_{secrets.token_hex(10)}",
            "request_id": f"req_{seed}_{i}",
            "ts": start + rng.randrange(span),
            "tenant_id": tenant_id,
            "workload_id": workload_id,
            "jti": f"jti_{i % 5}",
            "model": rng.choice(MODELS),
            "provider": "openai",
            "prompt_tokens": rng.randrange(5000),
            "completion_tokens": rng.randrange(2000),
            "cost_micros": rng.randrange(10**9),  # up to $1000: sums pass 2**31
            "status": "ok",
            "latency_ms": rng.randrange(3000),
            "stream": rng.random() < 0.3,
            "estimated": False,
            "client_ip": "10.1.2.3",
        })
    return out


FAKE_OWNERS = [(f"tn_{t}", f"wl_{t}{w}") for t in "abc" for w in "123"]


def put(db: Database, events: list[Event]) -> None:
    with db.engine.begin() as conn:
        conn.execute(insert(_usage), events)


COLUMN = {"workload": "workload_id", "tenant": "tenant_id", "model": "model"}


def sums_of(events: list[Event], group_by: str, start: int | None = None,
            end: int | None = None, step: int | None = None) -> dict[tuple[int, str], list[int]]:
    """What the raw events give: (bucket or 0, key) -> [requests, prompt, completion, cost]."""
    out: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for e in events:
        if (start is not None and e["ts"] < start) or (end is not None and e["ts"] >= end):
            continue
        row = out[(e["ts"] // step * step if step else 0, e[COLUMN[group_by]])]
        row[0] += 1
        row[1] += e["prompt_tokens"]
        row[2] += e["completion_tokens"]
        row[3] += e["cost_micros"]
    return dict(out)


def totals_json(events: list[Event], group_by: str, start: int | None = None,
                end: int | None = None) -> list[dict[str, Any]]:
    return [{"key": key, **dict(zip(SUMS, values, strict=True))}
            for (_, key), values in sorted(sums_of(events, group_by, start, end).items())]


def series_json(events: list[Event], group_by: str, step: int, start: int | None = None,
                end: int | None = None) -> list[dict[str, Any]]:
    return [{"bucket": iso(bucket), "key": key, **dict(zip(SUMS, values, strict=True))}
            for (bucket, key), values in sorted(sums_of(events, group_by, start, end, step).items())]


def rollup_rows(conn: Connection, period: str) -> dict[tuple[int, str, str, str], list[int]]:
    r = _rollup.c
    rows = conn.execute(select(r.bucket, r.tenant_id, r.workload_id, r.model, r.requests,
                               r.prompt_tokens, r.completion_tokens, r.cost_micros)
                        .where(r.period == period)).all()
    return {(int(b), t, w, m): [int(v) for v in vals] for b, t, w, m, *vals in rows}


def grouped_raw(conn: Connection, step: int) -> dict[tuple[int, str, str, str], list[int]]:
    """The raw events' GROUP BY sums, in SQL, keyed like the rollups."""
    u = _usage.c
    bucket = u.ts - u.ts % step
    rows = conn.execute(
        select(bucket, u.tenant_id, u.workload_id, u.model, func.count(), func.sum(u.prompt_tokens),
               func.sum(u.completion_tokens), func.sum(u.cost_micros))
        .group_by(bucket, u.tenant_id, u.workload_id, u.model)
    ).all()
    return {(int(b), t, w, m): [int(v) for v in vals] for b, t, w, m, *vals in rows}


def python_grouped(events: list[Event], step: int) -> dict[tuple[int, str, str, str], list[int]]:
    out: dict[tuple[int, str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for e in events:
        row = out[(e["ts"] // step * step, e["tenant_id"], e["workload_id"], e["model"])]
        for i, value in enumerate((1, e["prompt_tokens"], e["completion_tokens"], e["cost_micros"])):
            row[i] += value
    return dict(out)


def unrolled(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(_usage)
                            .where(_usage.c.rolled_up.is_(False))).scalar_one())


def roll_all(db: Database, limit: int = 5000) -> int:
    return rollup_pending(db, limit=limit, max_batches=10_000)


# --- the rollups ---------------------------------------------------------------------------------


def test_rollups_equal_the_raw_events_they_came_from(db: Database) -> None:
    events = make_events(FAKE_OWNERS, 3000, T0 - 2 * DAY + 1234, 4 * DAY)
    put(db, events)
    # Small batches: the sums are built across many transactions.
    assert roll_all(db, limit=257) == 3000
    with db.engine.connect() as conn:
        assert unrolled(conn) == 0
        for period, step in (("hour", HOUR), ("day", DAY)):
            rolled = rollup_rows(conn, period)
            assert rolled == grouped_raw(conn, step) == python_grouped(events, step), period
            assert all(bucket % step == 0 for bucket, *_ in rolled)
        assert len(rollup_rows(conn, "day")) <= 5 * len(FAKE_OWNERS) * len(MODELS)


def test_rolling_up_twice_adds_nothing_and_new_events_are_added_once(db: Database) -> None:
    first = make_events(FAKE_OWNERS, 500, T0, DAY, seed=1)
    put(db, first)
    assert roll_all(db) == 500
    with db.engine.connect() as conn:
        hours, days = rollup_rows(conn, "hour"), rollup_rows(conn, "day")
    assert roll_all(db) == 0
    assert db.transaction(rollup_once) == 0
    with db.engine.connect() as conn:
        assert (rollup_rows(conn, "hour"), rollup_rows(conn, "day")) == (hours, days)

    # Later events in the same hours (and some new ones) are added to the same rows, once.
    second = make_events(FAKE_OWNERS, 300, T0 + DAY // 2, DAY, seed=2)
    put(db, second)
    assert roll_all(db, limit=100) == 300
    assert roll_all(db) == 0
    with db.engine.connect() as conn:
        assert rollup_rows(conn, "hour") == python_grouped(first + second, HOUR)
        assert rollup_rows(conn, "day") == python_grouped(first + second, DAY)


def test_rollups_racing_each_other_count_every_event_once(db_url: str) -> None:
    """Four "replicas" (engines of their own) roll up the same backlog at once."""
    events = make_events(FAKE_OWNERS[:3], 4000, T0, 3 * HOUR, seed=3)  # few keys: shared rows
    dbs = [Database(make_engine(db_url, pool_size=2)) for _ in range(4)]
    try:
        put(dbs[0], events)
        barrier = threading.Barrier(len(dbs))
        folded: list[int] = []
        errors: list[BaseException] = []

        def replica(db: Database) -> None:
            try:
                barrier.wait()
                folded.append(rollup_pending(db, limit=150, max_batches=10_000))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=replica, args=(d,)) for d in dbs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert sum(folded) == 4000, folded
        with dbs[0].engine.connect() as conn:
            assert unrolled(conn) == 0
            assert rollup_rows(conn, "hour") == python_grouped(events, HOUR)
            assert rollup_rows(conn, "day") == python_grouped(events, DAY)
    finally:
        for d in dbs:
            d.dispose()


def _waiting_on_a_lock(admin: Database) -> bool:
    with admin.engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")).scalar_one())


def test_two_concurrent_rollups_on_postgresql_take_disjoint_batches(pg_url: str) -> None:
    """While one rollup's transaction is open, a second one skips the events it marked (no
    wait on them), folds only the others, and waits for the rollup rows both add to; after both
    commit every event is counted exactly once."""
    events = make_events(FAKE_OWNERS[:2], 400, T0, 2 * HOUR, seed=4)
    db = Database(make_engine(pg_url))
    try:
        put(db, events)
        second: list[int] = []
        with db.engine.connect() as conn:
            txn = conn.begin()
            first = rollup_once(conn, limit=150)  # marked, summed, not committed
            assert first == 150
            thread = threading.Thread(
                target=lambda: second.append(db.transaction(
                    functools.partial(rollup_once, limit=1000))))
            thread.start()
            # The second one has taken the 250 others and now waits on the shared rollup rows.
            wait_for(lambda: _waiting_on_a_lock(db) or not thread.is_alive(), timeout=30,
                     what="the second rollup to reach the shared rollup rows")
            txn.commit()
        thread.join(timeout=30)
        assert second == [250]
        assert db.transaction(rollup_once) == 0
        with db.engine.connect() as conn:
            assert rollup_rows(conn, "hour") == python_grouped(events, HOUR)
            assert rollup_rows(conn, "day") == python_grouped(events, DAY)
    finally:
        db.dispose()


def test_an_aborted_rollup_leaves_its_events_for_the_next(db: Database) -> None:
    events = make_events(FAKE_OWNERS, 200, T0, DAY, seed=5)
    put(db, events)

    def fail_after_rollup(conn: Connection) -> None:
        assert rollup_once(conn) == 200
        raise RuntimeError("the transaction dies before its commit")

    with pytest.raises(RuntimeError):
        db.transaction(fail_after_rollup)
    with db.engine.connect() as conn:
        assert unrolled(conn) == 200 and rollup_rows(conn, "hour") == {}
    assert roll_all(db) == 200
    with db.engine.connect() as conn:
        assert rollup_rows(conn, "day") == python_grouped(events, DAY)


# --- retention -----------------------------------------------------------------------------------


def _totals(db: Database, group_by: usage.GroupBy, start: int | None = None,
            end: int | None = None, actor: Actor = ORG) -> list[dict[str, Any]]:
    rows = db.read_transaction(lambda conn: usage.totals(conn, actor, group_by, start, end))
    return [{"key": t.key, "requests": t.requests, "prompt_tokens": t.prompt_tokens,
             "completion_tokens": t.completion_tokens, "cost_micros": t.cost_micros} for t in rows]


def test_retention_deletes_only_events_that_were_rolled_up(db: Database) -> None:
    cutoff = T0 + 10 * DAY
    old_rolled = make_events(FAKE_OWNERS, 300, T0, 5 * DAY, seed=6)
    recent = make_events(FAKE_OWNERS, 200, cutoff, 3 * DAY, seed=7)
    put(db, old_rolled + recent)
    assert roll_all(db) == 500
    old_unrolled = make_events(FAKE_OWNERS, 100, T0 + DAY, 5 * DAY, seed=8)
    put(db, old_unrolled)
    everything = old_rolled + recent + old_unrolled
    ranges = [(None, None), (T0, cutoff), (T0 + 2 * DAY, T0 + 12 * DAY), (cutoff, None)]
    before = {(g, r): _totals(db, g, *r) for g in usage.GROUPS for r in ranges}
    assert before[("workload", (None, None))] == totals_json(everything, "workload")

    assert db.transaction(lambda conn: prune_raw(conn, cutoff, limit=120)) == 120  # in batches
    assert db.transaction(lambda conn: prune_raw(conn, cutoff)) == 180
    assert db.transaction(lambda conn: prune_raw(conn, cutoff)) == 0
    with db.engine.connect() as conn:
        left = {r.id for r in conn.execute(select(_usage.c.id))}
    assert left == {e["id"] for e in recent + old_unrolled}
    assert {(g, r): _totals(db, g, *r) for g in usage.GROUPS for r in ranges} == before

    # Once rolled up, the late ones go too; the totals stay.
    assert roll_all(db) == 100
    assert db.transaction(lambda conn: prune_raw(conn, cutoff)) == 100
    with db.engine.connect() as conn:
        assert {r.id for r in conn.execute(select(_usage.c.id))} == {e["id"] for e in recent}
    assert {(g, r): _totals(db, g, *r) for g in usage.GROUPS for r in ranges} == before


def test_the_prune_job_keeps_the_retention_to_the_hour(db: Database) -> None:
    now = T0 + 100 * DAY + 1800  # half past midnight
    events = make_events(FAKE_OWNERS, 400, T0 + 8 * DAY, 4 * DAY, seed=9)
    put(db, events)
    roll_all(db)
    cutoff = rollups.retention_cutoff(now, 90)
    assert cutoff == T0 + 10 * DAY
    assert rollups.prune_expired(db, 90, now=now, limit=50) == sum(e["ts"] < cutoff for e in events)
    with db.engine.connect() as conn:
        assert int(conn.execute(select(func.min(_usage.c.ts))).scalar_one()) >= cutoff
    assert _totals(db, "tenant") == totals_json(events, "tenant")


def test_past_the_retention_a_partial_hour_is_answered_at_hour_resolution(db: Database) -> None:
    """Deleted raw events cannot split an hour: the hour counts whole when its start is in
    the range, not at all otherwise. Hours whose raw events are kept stay exact."""
    hour = T0 + 10 * HOUR
    pruned = [dict(e, ts=hour + minute * 60)
              for e, minute in zip(make_events(FAKE_OWNERS[:1], 3, 0, 1, seed=10), (10, 30, 50),
                                   strict=True)]
    kept = [dict(e, ts=hour + HOUR + minute * 60)
            for e, minute in zip(make_events(FAKE_OWNERS[:1], 3, 0, 1, seed=11), (10, 30, 50),
                                 strict=True)]
    put(db, pruned + kept)
    roll_all(db)
    assert db.transaction(lambda conn: prune_raw(conn, hour + HOUR)) == 3

    def requests(start: int | None, end: int | None) -> int:
        return sum(t["requests"] for t in _totals(db, "model", start, end))

    assert requests(None, None) == 6
    assert requests(hour + 20 * 60, hour + 3 * HOUR) == 3  # the pruned hour starts before from
    assert requests(hour - HOUR, hour + 20 * 60) == 3  # ... and inside this range: whole
    assert requests(hour + 20 * 60, hour + 40 * 60) == 0  # inside it, not from its start
    assert requests(hour, hour + 20 * 60) == 3
    # The kept hour is exact to the second.
    assert requests(hour + HOUR + 20 * 60, None) == 2
    assert requests(hour + HOUR + 20 * 60, hour + HOUR + 40 * 60) == 1
    assert requests(None, hour + HOUR + 20 * 60) == 4


def test_a_rollup_committed_while_a_report_reads_changes_nothing(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report reads the raw events not rolled up, then the rollups: a rollup that commits in
    between must neither hide those events nor count them twice (one snapshot)."""
    events = make_events(FAKE_OWNERS, 600, T0, 2 * DAY, seed=20)
    put(db, events)
    db.transaction(functools.partial(rollup_once, limit=200))
    real = usage._Reader.rollups
    raced: list[int] = []

    def racing(self: Any, *args: Any, **kwargs: Any) -> None:
        if not raced:
            raced.append(roll_all(db))  # another transaction, committed now
        real(self, *args, **kwargs)

    monkeypatch.setattr(usage._Reader, "rollups", racing)
    assert _totals(db, "model") == totals_json(events, "model")
    assert raced == [400]
    raced.clear()
    late = make_events(FAKE_OWNERS, 50, T0, DAY, seed=21)
    put(db, late)
    start, end = T0 + 1234, T0 + DAY + 99
    series = db.read_transaction(lambda conn: usage.series(conn, ORG, "tenant", "hour", start, end))
    assert raced == [50]
    assert [(p.bucket, p.key, p.requests, p.prompt_tokens, p.completion_tokens, p.cost_micros)
            for p in series] == [(bucket, key, *values) for (bucket, key), values in sorted(
                sums_of(events + late, "tenant", start, end, HOUR).items())]


# --- totals and series through the API -------------------------------------------------------------


def _get(broker: Broker, headers: dict[str, str] | None = None, /, **params: Any) -> Any:
    resp = broker.client.get("/v1/admin/usage", params=params, headers=headers or broker.admin())
    assert resp.status_code == 200, resp.text
    return resp.json()


def _range(start: int | None, end: int | None) -> dict[str, str]:
    return {**({"from": iso(start)} if start is not None else {}),
            **({"to": iso(end)} if end is not None else {})}


# Whole days, whole hours across midnight, ragged edges, inside one hour, open ends.
RANGES: list[tuple[int | None, int | None]] = [
    (None, None),
    (T0, T0 + 2 * DAY),
    (T0 + 5 * HOUR, T0 + 30 * HOUR),
    (T0 + 1234, T0 + 2 * DAY + 777),
    (T0 - DAY + 59, T0 + DAY - 1),
    (T0 + 100, T0 + 2000),
    (T0 + HOUR, T0 + HOUR + 59),
    (T0 + 5000, None),
    (None, T0 + DAY + 1),
    (T0 + DAY + 10, T0 + DAY + 2 * HOUR),
]


def _seed_partly_rolled(broker: Broker) -> tuple[list[Event], list[str]]:
    """Events of two tenants over three days: half rolled up, half not, in the same hours."""
    a, b = broker.create_tenant(), broker.create_tenant()
    owners = [(t["id"], broker.create_workload(t["id"])["id"]) for t in (a, a, b)]
    first = make_events(owners, 400, T0 - DAY, 3 * DAY, seed=12)
    second = make_events(owners, 400, T0 - DAY, 3 * DAY, seed=13)
    db = broker.services.db
    put(db, first)
    assert roll_all(db, limit=100) == 400
    put(db, second)
    assert db.transaction(functools.partial(rollup_once, limit=150)) == 150
    return first + second, [a["id"], b["id"]]


def test_totals_and_series_through_the_api_equal_the_raw_events(broker: Broker) -> None:
    events, _ = _seed_partly_rolled(broker)
    for start, end in RANGES:
        for group_by in usage.GROUPS:
            body = _get(broker, group_by=group_by, **_range(start, end))
            assert body == {"data": totals_json(events, group_by, start, end), "next_cursor": None,
                            "group_by": group_by, "from": iso(start) if start else None,
                            "to": iso(end) if end else None}, (start, end, group_by)
            for interval, step in (("hour", HOUR), ("day", DAY)):
                series = _get(broker, group_by=group_by, interval=interval, **_range(start, end))
                assert series["interval"] == interval and series["group_by"] == group_by
                assert series["data"] == series_json(events, group_by, step, start, end), (
                    start, end, group_by, interval)
    # Every event rolled up (and even the raw ones deleted): the same answers.
    roll_all(broker.services.db)
    broker.services.db.transaction(lambda conn: prune_raw(conn, T0 + 3 * DAY))
    for group_by in usage.GROUPS:
        assert _get(broker, group_by=group_by)["data"] == totals_json(events, group_by)
        for interval, step in (("hour", HOUR), ("day", DAY)):
            assert _get(broker, group_by=group_by, interval=interval)["data"] == series_json(
                events, group_by, step)
        whole = (T0, T0 + DAY + 5 * HOUR)
        assert _get(broker, group_by=group_by, **_range(*whole))["data"] == totals_json(
            events, group_by, *whole)


def test_series_buckets_are_the_utc_starts_of_hours_and_days(broker: Broker) -> None:
    tenant = broker.create_tenant()
    workload = broker.create_workload(tenant["id"])
    owner = [(tenant["id"], workload["id"])]
    at = [T0 + 13 * HOUR + 5, T0 + 13 * HOUR + 3599, T0 + 14 * HOUR, T0 + DAY + 1]
    events = [dict(e, ts=ts, model="m")
              for e, ts in zip(make_events(owner, 4, 0, 1, seed=14), at, strict=True)]
    put(broker.services.db, events)
    broker.services.db.transaction(functools.partial(rollup_once, limit=2))
    hourly = _get(broker, group_by="model", interval="hour")
    assert [(p["bucket"], p["requests"]) for p in hourly["data"]] == [
        ("2026-01-01T13:00:00Z", 2), ("2026-01-01T14:00:00Z", 1), ("2026-01-02T00:00:00Z", 1)]
    # An offset is converted; the buckets stay UTC.
    daily = _get(broker, group_by="model", interval="day", **{"from": "2026-01-01T14:00:00+01:00"})
    assert daily["from"] == "2026-01-01T13:00:00Z"
    assert [(p["bucket"], p["key"], p["requests"]) for p in daily["data"]] == [
        ("2026-01-01T00:00:00Z", "m", 3), ("2026-01-02T00:00:00Z", "m", 1)]
    assert set(daily["data"][0]) == {"bucket", "key", *SUMS}


def test_a_tenant_admin_sees_only_its_tenants_totals_and_series(broker: Broker) -> None:
    events, (tenant_a, _) = _seed_partly_rolled(broker)
    mine = [e for e in events if e["tenant_id"] == tenant_a]
    ident = broker.create_workload(tenant_a, kind="admin", roles=["tenant-admin"])
    headers = {"authorization": f"Bearer {broker.token(ident['client_id'], ident['client_secret'])}"}
    start, end = T0 + 1234, T0 + DAY + 777
    for group_by in usage.GROUPS:
        assert _get(broker, headers, group_by=group_by, **_range(start, end))["data"] == \
            totals_json(mine, group_by, start, end)
        assert _get(broker, headers, group_by=group_by, interval="hour")["data"] == \
            series_json(mine, group_by, HOUR)


def test_bad_intervals_and_oversized_series_are_400(broker: Broker,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    headers = broker.admin()
    for bad in ("week", "HOUR", "1h", "", "hour\x00"):
        resp = broker.client.get("/v1/admin/usage", params={"interval": bad}, headers=headers)
        body = assert_problem(resp, 400, "invalid_request")
        if "\x00" not in bad:
            assert "hour, day" in body["detail"], body
    # More hours than a series may hold: refused before any read.
    resp = broker.client.get("/v1/admin/usage", headers=headers, params={
        "interval": "hour", "from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"})
    assert "10000" in assert_problem(resp, 400, "invalid_request")["detail"]
    resp = broker.client.get("/v1/admin/usage", headers=headers, params={
        "interval": "day", "from": "0001-01-01T00:00:00Z", "to": "9999-12-31T23:59:59Z"})
    assert_problem(resp, 400, "invalid_request")
    # A daily series of those years is fine, and so are totals over any range.
    assert _get(broker, interval="day", **{"from": "2020-01-01T00:00:00Z",
                                           "to": "2026-01-01T00:00:00Z"})["data"] == []
    assert _get(broker, **{"from": "0001-01-01T00:00:00Z", "to": "9999-12-31T23:59:59Z"})["data"] == []

    # Few buckets but too many keys (or no range at all): refused once the rows pass the cap.
    events, _ = _seed_partly_rolled(broker)
    monkeypatch.setattr(usage, "MAX_SERIES_ROWS", 20)
    assert len(series_json(events, "workload", HOUR)) > 20
    resp = broker.client.get("/v1/admin/usage", headers=headers,
                             params={"interval": "hour", "group_by": "workload"})
    assert_problem(resp, 400, "invalid_request")
    small = _get(broker, interval="day", group_by="tenant")
    assert small["data"] == series_json(events, "tenant", DAY)


# --- export --------------------------------------------------------------------------------------


def _export(broker: Broker, headers: dict[str, str] | None = None, /,
            **params: str) -> httpx.Response:
    resp: httpx.Response = broker.client.get(
        "/v1/admin/usage/export", params={"format": "csv", **params},
        headers=headers or broker.admin())
    return resp


def _csv_rows(resp: httpx.Response) -> list[list[str]]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "text/csv; charset=utf-8"
    disposition = resp.headers["content-disposition"]
    assert disposition.startswith("attachment; filename=\"usage-") and disposition.endswith('.csv"')
    rows = list(csv.reader(io.StringIO(resp.text)))
    assert rows[0] == EXPORT_HEADER
    return rows[1:]


def _text(value: str) -> str:
    """A text cell as exported: one a spreadsheet would run as a formula gets a leading "'"
    (a random jti may well start with "-")."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _expected_row(e: Event) -> list[str]:
    return [_text(e["request_id"]), iso(e["ts"]), _text(e["tenant_id"]), _text(e["workload_id"]),
            _text(e["jti"]), _text(e["model"]), _text(e["provider"]), str(e["prompt_tokens"]),
            str(e["completion_tokens"]), str(e["cost_micros"]), _text(e["status"]),
            str(e["latency_ms"]), "true" if e["stream"] else "false", _text(e["client_ip"] or "")]


def _oldest_first(events: list[Event]) -> list[Event]:
    return sorted(events, key=lambda e: (e["ts"], e["id"]))


def test_export_has_the_header_and_every_event_in_column_order(
        broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    events, _ = _seed_partly_rolled(broker)
    events[0]["client_ip"] = None
    with broker.services.db.engine.begin() as conn:
        conn.execute(_usage.update().where(_usage.c.id == events[0]["id"]).values(client_ip=None))
    # Read in pages (never all at once): count them.
    pages: list[int] = []
    real_page = usage.export_page

    def counting_page(conn: Connection, **kw: Any) -> list[Any]:
        rows = real_page(conn, **kw)
        pages.append(len(rows))
        return rows

    monkeypatch.setattr(usage, "EXPORT_PAGE", 64)
    monkeypatch.setattr(usage, "export_page", counting_page)
    rows = _csv_rows(_export(broker))
    assert rows == [_expected_row(e) for e in _oldest_first(events)]
    assert len(pages) == len(events) // 64 + 1 and max(pages) == 64

    start, end = T0 + 1234, T0 + DAY + 777
    ranged = _csv_rows(_export(broker, **_range(start, end)))
    assert ranged == [_expected_row(e) for e in _oldest_first(events) if start <= e["ts"] < end]
    assert _csv_rows(_export(broker, **_range(T0 + 10 * DAY, None))) == []


def test_export_is_streamed(make_live_broker: Callable[..., Broker], sqlite_url: str) -> None:
    broker = make_live_broker(sqlite_url)
    events = make_events(FAKE_OWNERS, 3000, T0, DAY, seed=15)
    put(broker.services.db, events)
    assert broker.url is not None
    with httpx.Client(base_url=broker.url, timeout=30) as client, client.stream(
            "GET", "/v1/admin/usage/export", params={"format": "csv"},
            headers=broker.admin()) as resp:
        assert resp.status_code == 200
        assert resp.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in resp.headers
        chunks = list(resp.iter_raw())
    text_ = b"".join(chunks).decode()
    assert len(list(csv.reader(io.StringIO(text_)))) == 3001


def test_export_neutralises_formula_injection(broker: Broker) -> None:
    tenant = broker.create_tenant()
    workload = broker.create_workload(tenant["id"])
    base = make_events([(tenant["id"], workload["id"])], 1, T0, 1, seed=16)[0]
    nasty = {
        "model": "=HYPERLINK(\"http://evil\",\"x\")",
        "request_id": "+cmd|' /C calc'!A0",
        "jti": "-2+3",
        "provider": "@SUM(1,1)",
        "status": "\tok",
        "client_ip": "\r=1",
    }
    put(broker.services.db, [dict(base, **nasty)])
    [row] = _csv_rows(_export(broker))
    cells = dict(zip(EXPORT_HEADER, row, strict=True))
    for name, value in nasty.items():
        assert cells[name] == "'" + value, name
    # Plain values and numbers are left as they are.
    assert cells["tenant_id"] == tenant["id"] and cells["prompt_tokens"] == str(base["prompt_tokens"])


def test_a_tenant_admins_export_holds_only_its_tenant(broker: Broker) -> None:
    events, (tenant_a, _) = _seed_partly_rolled(broker)
    ident = broker.create_workload(tenant_a, kind="admin", roles=["tenant-admin"])
    headers = {"authorization": f"Bearer {broker.token(ident['client_id'], ident['client_secret'])}"}
    rows = _csv_rows(_export(broker, headers))
    mine = [e for e in events if e["tenant_id"] == tenant_a]
    assert mine and len(mine) < len(events)
    assert rows == [_expected_row(e) for e in _oldest_first(mine)]


def test_export_refuses_other_formats_and_bad_ranges(broker: Broker) -> None:
    headers = broker.admin()
    for params in ({"format": "json"}, {"format": "CSV"}, {}, {"format": "csv\x00"},
                   {"format": "csv", "from": "yesterday"},
                   {"format": "csv", "from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}):
        resp = broker.client.get("/v1/admin/usage/export", params=params, headers=headers)
        assert_problem(resp, 400, "invalid_request")
    assert_problem(broker.client.get("/v1/admin/usage/export", params={"format": "csv"}), 401,
                   "invalid_token")


def test_the_new_usage_routes_are_in_openapi(sqlite_broker: Broker) -> None:
    spec = sqlite_broker.client.get("/openapi.json").json()
    assert "get" in spec["paths"]["/v1/admin/usage/export"]


# --- the jobs, and calls through the gateway -------------------------------------------------------


def test_the_jobs_are_scheduled_and_roll_up_and_prune(broker: Broker) -> None:
    svc = broker.services
    jobs = {job.name: job for job in scheduled_jobs(svc)}
    assert jobs["usage.rollup"].interval_s == svc.settings.usage.rollup_interval_s
    assert jobs["usage.prune_raw"].interval_s == 3600
    old = make_events(FAKE_OWNERS, 50, T0 - 3 * 365 * DAY, DAY, seed=17)  # past any retention
    put(svc.db, old)
    jobs["usage.prune_raw"].run()
    with svc.db.engine.connect() as conn:
        assert unrolled(conn) == 50  # not rolled up: kept
    jobs["usage.rollup"].run()
    jobs["usage.prune_raw"].run()
    with svc.db.engine.connect() as conn:
        assert int(conn.execute(select(func.count()).select_from(_usage)).scalar_one()) == 0
    assert _get(broker, group_by="workload")["data"] == totals_json(old, "workload")


def test_calls_through_the_gateway_are_rolled_up(make_live_broker: Callable[..., Broker],
                                                 db_url: str, fake: FakeProviderServer) -> None:
    env: Env = make_env(make_live_broker, db_url, fake)
    token = env.token()
    assert env.broker.url is not None
    for model, max_tokens in (("gpt-test", 5), ("gpt-test", 7), ("compat-test", 3)):
        resp = httpx.post(f"{env.broker.url}/v1/chat/completions",
                          headers={"authorization": f"Bearer {token}"}, timeout=30,
                          json={"model": model, "max_tokens": max_tokens,
                                "messages": [{"role": "user", "content": "Say hi."}]})
        assert resp.status_code == 200, resp.text
    events = env.wait_for_events(3)
    assert roll_all(env.broker.services.db) == 3
    with env.broker.services.db.engine.connect() as conn:
        assert rollup_rows(conn, "hour") == python_grouped(events, HOUR)
    for group_by in usage.GROUPS:
        assert _get(env.broker, group_by=group_by)["data"] == totals_json(events, group_by)
    rows = _csv_rows(_export(env.broker))
    assert rows == [_expected_row(e) for e in _oldest_first(events)]


# --- the migration -------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/empty.db"
        return
    name = f"broker_m_{secrets.token_hex(4)}"
    admin_url = PG_ADMIN_URL.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _upgrade(db: Database, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def test_the_migration_rolls_up_the_events_already_recorded(empty_db_url: str) -> None:
    db = Database(make_engine(empty_db_url))
    try:
        _upgrade(db, "0011")
        events = make_events(FAKE_OWNERS, 700, T0, 3 * DAY, seed=18)
        columns = [c for c in events[0] if c != "rolled_up"]
        with db.engine.begin() as conn:  # the table as 0011 left it: no rolled_up column
            conn.execute(text(f"INSERT INTO usage_event ({', '.join(columns)}) "
                              f"VALUES ({', '.join(':' + c for c in columns)})"), events)
        _upgrade(db, "head")
        with db.engine.connect() as conn:
            assert unrolled(conn) == 0
            assert rollup_rows(conn, "hour") == python_grouped(events, HOUR)
            assert rollup_rows(conn, "day") == python_grouped(events, DAY)
        assert db.transaction(rollup_once) == 0
        # Written after the migration (as the ledger does, not naming the column): not rolled up.
        late = make_events(FAKE_OWNERS, 5, T0, DAY, seed=19)
        with db.engine.begin() as conn:
            conn.execute(text(f"INSERT INTO usage_event ({', '.join(columns)}) "
                              f"VALUES ({', '.join(':' + c for c in columns)})"), late)
        assert db.transaction(rollup_once) == 5
        assert _totals(db, "model") == totals_json(events + late, "model")
    finally:
        db.dispose()
